"""Released-checkpoint loading: a tiny random RAG model saved by transformers, read back by our loader,
gives the losses (fixed doc scores) and generated sequences transformers gives for the same folder."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import hf_reference as H
import pytest
import torch

from rag import decoding
from rag import marginalize as M
from rag.checkpoints import (
    CheckpointError,
    RagCheckpoint,
    checkpoint_kind,
    load_dpr_encoder,
    load_rag_checkpoint,
)
from rag.config import DecodingConfig

# Every (passage, question) input has the same number of tokens and max_combined_length is that number:
# transformers 5.24's RagSequenceForGeneration.generate calls generator.generate without an attention
# mask, and encoder-decoder generate does not infer one, so padded contexts would be attended to there.
QUESTIONS = ["what is the capital of angola ?", "what is the river of egypt ?"]
PASSAGES = [
    [('"angola"', "luanda is the capital city of angola"), ("lisbon", "lisbon is the capital city of portugal"),
     ("paris", "paris is the largest city of france")],
    [("nile", "the nile is a river in africa"), ("egypt", "cairo is the capital city of egypt"),
     ("africa", "the largest river in africa is nile")],
]
TARGETS = ["luanda city", "the nile river"]
DOC_SCORES = torch.tensor([[1.5, 0.2, -0.7], [0.3, 1.1, 0.9]])


def _save_tiny_rag(out: Path, kind: str, family: H.Family, seed: int) -> None:
    tokenizer = H.word_tokenizer(family)
    lengths = {len(tokenizer(t)["input_ids"]) for t in H.reference_input_strings(QUESTIONS, PASSAGES)}
    assert len(lengths) == 1, "the test inputs must need no padding"
    generator = H.random_generator(H.generator_config(family, len(tokenizer)), seed)
    model = H.reference_model(kind, generator, n_docs=3, max_combined_length=lengths.pop())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out / "generator_tokenizer")
    tokenizer.save_pretrained(out / "question_encoder_tokenizer")  # same words; fits the tiny DPR vocab


@dataclass(frozen=True)
class Loaded:
    path: Path
    kind: str
    family: H.Family
    reference: object  # transformers' RagTokenForGeneration / RagSequenceForGeneration from the folder
    ckpt: RagCheckpoint  # ours from the same folder


def _load(kind: str, family: str, tmp_path_factory) -> Loaded:
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    out = tmp_path_factory.mktemp(f"rag-{kind}-{family}")
    _save_tiny_rag(out, kind, family, seed=3)
    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    return Loaded(out, kind, family, cls.from_pretrained(out).eval(), load_rag_checkpoint(out))


@pytest.fixture(scope="module", params=[("token", "bart"), ("sequence", "bart"), ("token", "t5")])
def loaded(request, tmp_path_factory) -> Loaded:
    return _load(*request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def bart_token(tmp_path_factory) -> Loaded:
    """One configuration for the tests of folder layouts, which do not depend on kind or family."""
    return _load("token", "bart", tmp_path_factory)


@pytest.fixture(scope="module")
def bart_sequence(tmp_path_factory) -> Loaded:
    return _load("sequence", "bart", tmp_path_factory)


def _contexts(case: Loaded) -> tuple[torch.Tensor, torch.Tensor]:
    return H.context_inputs(case.reference, H.word_tokenizer(case.family), QUESTIONS, PASSAGES)


def test_kind_docs_and_input_layout_come_from_the_saved_folder(loaded):
    assert loaded.ckpt.kind == loaded.kind
    assert loaded.ckpt.n_docs == 3
    gen = loaded.ckpt.generator
    assert gen.format_inputs(QUESTIONS, PASSAGES).texts == H.reference_input_strings(QUESTIONS, PASSAGES)


@torch.no_grad()
def test_loss_with_fixed_doc_scores_equals_transformers(loaded):
    ids, mask = _contexts(loaded)
    gen = loaded.ckpt.generator
    targets = gen.encode_targets(TARGETS)
    if loaded.family == "bart":  # transformers' RAG fine-tuning: labels = generator_tokenizer(target)
        labels = gen.tokenizer(TARGETS, padding=True, return_tensors="pt")["input_ids"]
        assert torch.equal(labels, H.labels_from_targets(targets.ids, targets.start))
    else:  # T5 writes no bos: [decoder_start] + y </s>, as before
        assert targets.start is None
        labels = H.labels_from_targets(targets.ids, gen.decoder_start_token_id)
    expected = H.reference_loss(loaded.reference, ids, mask, DOC_SCORES, labels)  # (B,)

    batch, docs = DOC_SCORES.shape
    prefix = gen.encode_prefix(gen.format_inputs(QUESTIONS, PASSAGES))
    per_row = targets.select(torch.arange(batch).repeat_interleave(docs))
    logp = gen.target_logprobs(prefix, torch.arange(batch * docs), per_row)  # (B*K, T, V)
    logp = logp.view(batch, docs, *logp.shape[1:])
    nll = M.rag_token_nll if loaded.kind == "token" else M.rag_sequence_nll
    ours = nll(logp, M.doc_logprior(DOC_SCORES), targets.ids, targets.mask)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beams", [1, 3])
@torch.no_grad()
def test_generated_sequences_equal_transformers(loaded, beams):
    if loaded.kind == "sequence" and beams == 1:
        pytest.skip("RAG-Sequence decoding is a beam search per passage; beams=1 is covered by RAG-Token")
    ids, mask = _contexts(loaded)
    expected = H.trim(
        H.reference_generate(loaded.reference, ids, mask, DOC_SCORES, num_beams=beams, max_new_tokens=6),
        H.special_ids(loaded.reference.generator.config),
    )
    gen = loaded.ckpt.generator
    prefix = gen.encode_prefix(gen.format_inputs(QUESTIONS, PASSAGES))
    config = DecodingConfig(num_beams=beams, max_new_tokens=6, decoding="thorough")
    out = decoding.generate(gen, prefix, M.doc_logprior(DOC_SCORES), loaded.ckpt.kind, config)
    assert [seqs[0] for seqs in out.sequences] == expected


@torch.no_grad()
def test_query_encoder_equals_transformers_dpr(loaded):
    encoder = loaded.ckpt.query_encoder
    batch = encoder.tokenize(QUESTIONS)
    expected = loaded.reference.rag.question_encoder(**batch).pooler_output
    torch.testing.assert_close(encoder(batch["input_ids"], batch["attention_mask"]), expected)
    assert not encoder.normalize


@torch.no_grad()
def test_split_folder_layout_and_dpr_folder_load_the_same_weights(bart_token, tmp_path):
    loaded = bart_token
    tokenizer = H.word_tokenizer("bart")
    for part in ("question_encoder", "generator"):
        getattr(loaded.reference.rag, part).save_pretrained(tmp_path / part)
        tokenizer.save_pretrained(tmp_path / part)
    shutil.copy(loaded.path / "config.json", tmp_path / "config.json")
    split = load_rag_checkpoint(tmp_path)
    batch = split.query_encoder.tokenize(QUESTIONS)
    want = loaded.ckpt.query_encoder(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(split.query_encoder(batch["input_ids"], batch["attention_mask"]), want)
    dpr = load_dpr_encoder(tmp_path / "question_encoder", "question")
    torch.testing.assert_close(dpr(batch["input_ids"], batch["attention_mask"]), want)
    for ours, theirs in zip(split.generator.model.parameters(), loaded.ckpt.generator.model.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_bad_folders_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        load_rag_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bart"}')
    with pytest.raises(CheckpointError, match="model_type"):
        load_rag_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "rag",\n "n_docs": }')
    with pytest.raises(CheckpointError, match="line 2"):
        load_rag_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="architectures"):
        checkpoint_kind(json.loads('{"model_type": "rag", "architectures": ["RagModel"]}'), tmp_path)


def test_rag_eval_runs_a_checkpoint_over_a_knowledge_base(bart_sequence, tmp_path):
    loaded = bart_sequence
    from rag.cli import main
    from rag.config import EncoderConfig, IndexConfig, to_dict
    from rag.corpus import Passage
    from rag.evaluation import read_predictions
    from rag.knowledge import FORMAT, VERSION, write_knowledge_base

    passages = [Passage(str(i), t, x) for i, (t, x) in enumerate(p for row in PASSAGES for p in row)]
    # d(z) here is the checkpoint's own question encoder: any encoder of the same dimension will do
    vectors = loaded.ckpt.query_encoder.encode([f"{p.title} {p.text}" for p in passages])
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": "test", "index": to_dict(IndexConfig()),
            "encoder": to_dict(EncoderConfig(path=str(loaded.path)))}
    write_knowledge_base(passages, vectors, meta, tmp_path / "kb")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": [t]}) + "\n"
                            for q, t in zip(QUESTIONS, TARGETS, strict=True)), encoding="utf-8")
    argv = ["eval", "--task", "nq-open", "--data", str(data), "--checkpoint", str(loaded.path), "--index",
            str(tmp_path / "kb"), "-k", "2", "--beams", "2", "--max-new-tokens", "4", "--out", str(tmp_path / "out"),
            "--no-progress"]
    assert main(argv) == 0
    records = read_predictions(tmp_path / "out" / "rag-sequence-thorough-k2" / "predictions.jsonl")
    assert [r["kind"] for r in records] == ["sequence", "sequence"]  # the checkpoint's kind
    assert all(len(r["doc_prior"]) == 2 and len(r["retrieved"]) == 6 for r in records)
