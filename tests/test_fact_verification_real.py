"""Sec 3.4 on the real packaged models and real SciFact claims: with one-token labels RAG-Sequence and
RAG-Token give the same class scores (to 1e-5), through evaluation's classifier and through the training
loss alike. Slow (the packaged q(x), d(z) and SmolLM2 load; a small knowledge base of SciFact abstracts is
built), and skipped with a reason where ../shared/data is absent.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from rag.config import CorpusConfig, EncoderConfig, EvalConfig, IndexConfig, RagConfig
from rag.encoder_layout import passage_dtype
from rag.eval_store import read_predictions
from rag.evaluation import evaluate_many
from rag.knowledge import build_knowledge_base, query_encoder_config
from rag.model import RagModel
from rag.tasks import SCIFACT_3WAY, read_task

ROOT = Path(__file__).resolve().parent.parent
CLAIMS = 6  # training claims only (never the reserved validation claims): 4 with evidence, 2 without
DISTRACTORS = 40  # abstracts beside the gold ones in the knowledge base
K = 3  # recipes/tasks.py's k


def _recipe():
    """recipes/tasks.py, for its reader of SciFact's abstracts (the library does not ship one)."""
    spec = importlib.util.spec_from_file_location("recipe_tasks", ROOT / "recipes" / "tasks.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@torch.no_grad()
def test_real_scifact_claims_rag_sequence_and_rag_token_class_scores_agree(shared_data, tmp_path):
    torch.set_num_threads(1)
    claims = read_task("scifact", shared_data / "scifact" / "scifact_hf_csv.zip")
    with_evidence = [c for c in claims if c.provenance][:4]
    without = [c for c in claims if not c.provenance][: CLAIMS - len(with_evidence)]
    examples = with_evidence + without
    gold = {p.passage_id for c in with_evidence for evidence in c.provenance for p in evidence}
    docs = _recipe().scifact_documents(shared_data)
    chosen = [d for d in docs if d["id"] in gold] + [d for d in docs if d["id"] not in gold][:DISTRACTORS]
    corpus = tmp_path / "abstracts.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in chosen), encoding="utf-8")
    kb = tmp_path / "kb"
    build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"), EncoderConfig(dtype=passage_dtype("auto")),
                         IndexConfig(), kb, progress=False)  # fmt: skip

    model = RagModel.from_config(RagConfig(kind="token", k=K, index_dir=str(kb), query_encoder=query_encoder_config(kb)))
    gen = model.generator
    assert all(len(gen.target_ids(t)) == 1 for t in SCIFACT_3WAY.targets)  # one token each, as trained

    # 1. evaluation's classifier, RAG-Token and RAG-Sequence over the same retrieval
    runs = [(EvalConfig(kind=kind, k=K, recall_ks=(K,), metric="classification", labels=SCIFACT_3WAY,
                        progress=False), tmp_path / kind) for kind in ("token", "sequence")]  # fmt: skip
    evaluate_many(examples, runs, retriever=model.retriever, generator=gen)
    token, sequence = (read_predictions(tmp_path / kind / "predictions.jsonl") for kind in ("token", "sequence"))
    eval_token = np.array([r["class_logprobs"] for r in token])  # (N, C), renormalised over the labels
    eval_sequence = np.array([r["class_logprobs"] for r in sequence])

    # 2. the training loss of each label as a one-token target (no end token): eq. 1 and eq. 2 in full
    #    (over the same retrieval: each claim once per label, N*C rows in one call per kind)
    questions = [e.input for e in examples]
    retrieved = model.retriever.retrieve(questions, K)
    passages = [list(zip(t, x, strict=True)) for t, x in zip(retrieved.titles, retrieved.texts, strict=True)]
    classes = len(SCIFACT_3WAY.targets)
    loss_scores = {}
    for kind in ("token", "sequence"):
        model.kind = kind
        out = model.score_passages(questions * classes, [t for t in SCIFACT_3WAY.targets for _ in questions],
                                   passages * classes, retrieved.scores.repeat(classes, 1), end_token=False)  # fmt: skip
        loss_scores[kind] = (-out.nll).view(classes, len(questions)).T.double().numpy()  # (N, C) log p(label|x)
    raw_gap = np.abs(loss_scores["token"] - loss_scores["sequence"]).max()
    normalised = {k: v - np.logaddexp.reduce(v, axis=1, keepdims=True) for k, v in loss_scores.items()}

    gaps = {"eval token vs sequence": np.abs(eval_token - eval_sequence).max(),
            "loss token vs sequence (unnormalised)": raw_gap,
            "eval vs loss (token)": np.abs(eval_token - normalised["token"]).max(),
            "eval vs loss (sequence)": np.abs(eval_sequence - normalised["sequence"]).max()}  # fmt: skip
    print("\nmax |difference| of class log-scores over", len(examples), "SciFact claims, 3 labels, k =", K)
    for name, gap in gaps.items():
        print(f"  {name}: {gap:.3g}")
    for name, gap in gaps.items():
        assert gap <= 1e-5, name
    assert [r["prediction"] for r in token] == [r["prediction"] for r in sequence]
    # the scores are a real distribution over the labels, not a degenerate one
    assert np.allclose(np.exp(eval_token).sum(1), 1.0, atol=1e-6) and np.exp(eval_token).max() < 1.0
