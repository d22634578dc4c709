"""Hybrid retrieval's maths: fusing a dense and a BM25 ranking, and choosing the fusion on dev data.

Both retrievers propose their top `depth` passages; the candidates of a question are the union, each
with both exact scores (q(x).d(z) from the stored d(z), BM25 from the full score vector) and its rank
in each list (0: not in that list). Two fusions, each with the dense side's weight w:
- reciprocal-rank fusion (Cormack et al. 2009): w / (rrf_k + rank_dense) + (1 - w) / (rrf_k + rank_bm25),
  a list the candidate is absent from adds nothing;
- score interpolation (a convex combination): w * minmax(dense) + (1 - w) * minmax(bm25), each score
  min-max scaled over the question's candidates, because BM25's range grows with the query's length
  while a cosine's does not.
The method and w are chosen on development questions (`choose_fusion`) and stored in the knowledge
base as hybrid.json. Shapes: B questions, C candidates per question (padded; `valid` marks real ones).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag.config import FusionConfig, from_dict, to_dict
from rag.io import atomic_write_text, output_lock, read_format_json
from rag.manifest import update_manifest

FORMAT = "rag-hybrid-fusion"
FUSION_FILE = "hybrid.json"
WEIGHTS = tuple(round(w, 2) for w in np.linspace(0.0, 1.0, 21))  # the grid choose_fusion searches


@dataclass(frozen=True)
class Candidates:
    """The union of both retrievers' top `depth` for each question (B, C), padded with row -1."""

    rows: np.ndarray  # (B, C) int64 passage rows; -1 = padding
    dense: np.ndarray  # (B, C) float32 q(x).d(z), exact for every candidate
    bm25: np.ndarray  # (B, C) float32 BM25 score, exact for every candidate
    dense_rank: np.ndarray  # (B, C) int64 1-based rank in the dense top list, 0 = not in it
    bm25_rank: np.ndarray  # (B, C) int64 1-based rank in the BM25 top list, 0 = not in it

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0  # (B, C)


def union_candidates(dense_rows: np.ndarray, bm25_rows: np.ndarray, bm25_ranked: np.ndarray) -> tuple[
        np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Per question the union of two top lists, dense first: (B, Dd) and (B, Db) rows, bm25_ranked (B, Db)
    False where a BM25 "hit" scored 0 (no query term: not ranked) -> rows (B, C), dense rank (B, C),
    BM25 rank (B, C), C = Dd + Db, padded with -1 / 0."""
    batch, width = dense_rows.shape[0], dense_rows.shape[1] + bm25_rows.shape[1]
    rows = np.full((batch, width), -1, dtype=np.int64)
    d_rank = np.zeros((batch, width), dtype=np.int64)
    b_rank = np.zeros((batch, width), dtype=np.int64)
    for b in range(batch):
        position = {int(r): i for i, r in enumerate(dense_rows[b])}
        rows[b, : len(position)] = dense_rows[b]
        d_rank[b, : len(position)] = np.arange(1, len(position) + 1)
        for rank, (row, ranked) in enumerate(zip(bm25_rows[b].tolist(), bm25_ranked[b].tolist(), strict=True), 1):
            if not ranked:
                continue
            if row not in position:
                position[row] = len(position)
                rows[b, position[row]] = row
            b_rank[b, position[row]] = rank
    return rows, d_rank, b_rank


def rrf_scores(dense_rank: np.ndarray, bm25_rank: np.ndarray, weight: float, rrf_k: int) -> np.ndarray:
    """Weighted reciprocal-rank fusion: ranks (B, C), 0 = absent -> (B, C)."""
    def part(rank: np.ndarray) -> np.ndarray:
        return np.where(rank > 0, 1.0 / (rrf_k + np.maximum(rank, 1)), 0.0)

    return weight * part(dense_rank) + (1.0 - weight) * part(bm25_rank)


def minmax(scores: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Scale each row's valid entries to [0, 1] (a constant row -> 0): (B, C) -> (B, C)."""
    high = np.where(valid, scores, -np.inf).max(axis=1, keepdims=True)  # (B, 1)
    low = np.where(valid, scores, np.inf).min(axis=1, keepdims=True)  # (B, 1)
    span = high - low
    scaled = np.where(span > 0, (scores - low) / np.where(span > 0, span, 1.0), 0.0)
    return np.where(valid, scaled, 0.0)


def interpolated_scores(dense: np.ndarray, bm25: np.ndarray, valid: np.ndarray, weight: float) -> np.ndarray:
    """w * minmax(dense) + (1 - w) * minmax(bm25) over each question's candidates: (B, C) -> (B, C)."""
    return weight * minmax(dense, valid) + (1.0 - weight) * minmax(bm25, valid)


def fused_scores(candidates: Candidates, config: FusionConfig) -> np.ndarray:
    """The fusion's score of every candidate, -inf for padding: (B, C)."""
    if config.method == "rrf":
        scores = rrf_scores(candidates.dense_rank, candidates.bm25_rank, config.weight, config.rrf_k)
    elif config.method == "interpolation":
        scores = interpolated_scores(candidates.dense, candidates.bm25, candidates.valid, config.weight)
    else:
        raise ValueError(f"FusionConfig.method: expected 'rrf' or 'interpolation', got {config.method!r}")
    return np.where(candidates.valid, scores, -np.inf)


def fuse(candidates: Candidates, config: FusionConfig, k: int) -> np.ndarray:
    """Positions (B, K) into the candidate axis of the k best fused candidates, best first (ties: the
    earlier candidate, i.e. the dense list's order)."""
    scores = fused_scores(candidates, config)  # (B, C)
    if k > int(candidates.valid.sum(axis=1).min()):
        raise ValueError(f"k = {k} exceeds the candidates of some question ({int(candidates.valid.sum(1).min())})")
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


# ------------------------------------------------------------------------ choosing on dev questions


def recall_at(order: np.ndarray, relevant: np.ndarray, k: int) -> float:
    """Share of questions with a relevant candidate among the first k of `order`: (B, K'), (B, C)."""
    return float(np.take_along_axis(relevant, order[:, :k], 1).any(axis=1).mean())


def choose_fusion(candidates: Candidates, relevant: np.ndarray, base: FusionConfig | None = None,
                  k: int = 5) -> tuple[FusionConfig, list[dict[str, Any]]]:  # fmt: skip
    """The method and weight with the best recall@k on these (development) questions; relevant (B, C)
    marks candidates holding an answer. Ties go to the larger recall@1 + recall@20, then to the weight
    nearest 0.5. Returns the choice and every (method, weight, recall@1/k/20) tried."""
    base = base or FusionConfig()
    tried = []
    for method in ("rrf", "interpolation"):
        for weight in WEIGHTS:
            config = FusionConfig(method=method, weight=weight, rrf_k=base.rrf_k, depth=base.depth)
            order = fuse(candidates, config, min(20, int(candidates.valid.sum(1).min())))
            tried.append({"method": method, "weight": weight, "recall_at_1": recall_at(order, relevant, 1),
                          f"recall_at_{k}": recall_at(order, relevant, k),
                          "recall_at_20": recall_at(order, relevant, 20)})  # fmt: skip
    best = max(tried, key=lambda t: (t[f"recall_at_{k}"], t["recall_at_1"] + t["recall_at_20"],
                                     -abs(t["weight"] - 0.5)))  # fmt: skip
    return FusionConfig(best["method"], best["weight"], base.rrf_k, base.depth), tried


def save_fusion(kb_dir: Path | str, config: FusionConfig, provenance: dict[str, Any]) -> Path:
    """Store the chosen fusion in the knowledge base (KB/hybrid.json), with what it was chosen on."""
    path = Path(kb_dir) / FUSION_FILE
    payload = {"format": FORMAT, "config": to_dict(config), "chosen_on": provenance}
    with output_lock(kb_dir, what="knowledge base"):  # the knowledge base's writers take turns
        atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=True))
        update_manifest(kb_dir, [FUSION_FILE])  # the knowledge base's manifest covers it too
    return path


def load_fusion(kb_dir: Path | str) -> tuple[FusionConfig, dict[str, Any] | None]:
    """The knowledge base's stored fusion and its provenance, or the defaults (and None) if none is stored."""
    if not (Path(kb_dir) / FUSION_FILE).is_file():
        return FusionConfig(), None
    data = read_format_json(kb_dir, FUSION_FILE, FORMAT, "hybrid fusion choice (rag index hybrid)")
    return from_dict(FusionConfig, data["config"]), data.get("chosen_on")
