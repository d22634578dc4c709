"""Choosing a knowledge base's hybrid fusion on development questions (`rag index hybrid`).

The hybrid retriever's candidates for each question (both top lists, rag.fusion.Candidates) are
judged once, by DPR's has_answer on the passage text (the recall@k of rag eval); then every fusion
method and weight of rag.fusion.choose_fusion is scored on them and the best recall@k is stored in
the knowledge base (KB/hybrid.json) with the questions it was chosen on. Give development questions
only: never a reserved fifth (rag.tasks.split_reserved) or a test set.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag import metrics as MT
from rag.config import FusionConfig
from rag.fusion import Candidates, choose_fusion, save_fusion
from rag.retriever import HybridRetriever
from rag.tasks import Example


@dataclass(frozen=True)
class FusionChoice:
    config: FusionConfig
    tried: list[dict[str, Any]]  # every (method, weight) with its recall@1/k/20 on the questions
    questions: int
    path: Path | None  # the hybrid.json written (None when not saved)


def _concat(parts: list[Candidates]) -> Candidates:
    """Stack candidate batches of different widths (padding with row -1) into one (B, C)."""
    width = max(p.rows.shape[1] for p in parts)

    def pad(a: np.ndarray, fill: Any) -> np.ndarray:
        return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=fill)

    return Candidates(*(np.concatenate([pad(getattr(p, f), -1 if f == "rows" else 0) for p in parts])
                        for f in ("rows", "dense", "bm25", "dense_rank", "bm25_rank")))  # fmt: skip


def relevance(retriever: HybridRetriever, examples: Sequence[Example], candidates: Candidates) -> np.ndarray:
    """(B, C) bool: the candidate's text holds an answer of its question (DPR's has_answer)."""
    words: dict[int, set[str]] = {}  # row -> its DPR tokens: a cheap filter before has_answer
    out = np.zeros(candidates.rows.shape, dtype=bool)
    for b, example in enumerate(examples):
        needles = [set(MT.dpr_tokens(unicodedata.normalize("NFD", a))) for a in example.answers]
        for c, row in enumerate(candidates.rows[b].tolist()):
            if row < 0:
                continue
            text = retriever.passages[row].text
            if row not in words:
                words[row] = set(MT.dpr_tokens(unicodedata.normalize("NFD", text)))
            if example.answer_is_regex or any(n and n <= words[row] for n in needles):
                out[b, c] = MT.has_answer(example.answers, text, regex_answers=example.answer_is_regex)
    return out


def choose_hybrid_fusion(retriever: HybridRetriever, examples: Sequence[Example], k: int = 5,
                         batch_size: int = 64, kb_dir: Path | str | None = None,
                         provenance: dict[str, Any] | None = None) -> FusionChoice:  # fmt: skip
    """The fusion with the best recall@k on `examples` (development questions); stored in kb_dir's
    hybrid.json when kb_dir is given, with `provenance` (what the questions were) beside it."""
    if not examples:
        raise ValueError("choose_hybrid_fusion: no questions")
    parts = []
    depth = max(20, k, retriever.fusion.depth)
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        parts.append(retriever.candidates([ex.input for ex in batch], depth, batch_size))
    candidates = _concat(parts)
    config, tried = choose_fusion(candidates, relevance(retriever, examples, candidates), retriever.fusion, k)
    path = None
    if kb_dir is not None:
        best = next(t for t in tried if t["method"] == config.method and t["weight"] == config.weight)
        record = {**(provenance or {}), "questions": len(examples), "objective": f"recall@{k}", "result": best}
        path = save_fusion(kb_dir, config, record)
    return FusionChoice(config, tried, len(examples), path)
