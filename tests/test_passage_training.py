"""Optional d(z) training with re-indexing (rag.passage_training) on the synthetic world (conftest)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from rag.encoders import passage_text
from rag.model import RagModel
from rag.synthetic import SyntheticConfig, build_world, make_task
from rag.train_checkpoint import load_rag_model
from rag.training import Example, TrainConfig, evaluate_dev, make_optimizer, train, train_step


def _config(rag, **changes) -> TrainConfig:
    base = TrainConfig(rag=rag, steps=200, batch_size=16, lr=3e-3, generator_lr=1e-4, schedule="constant",
                       train_passage_encoder=True)  # fmt: skip
    return dataclasses.replace(base, **changes)


def _fresh_index_vectors(model: RagModel) -> np.ndarray:
    passages = model.retriever.passages.get(np.arange(len(model.retriever.passages)))
    assert model.passage_encoder is not None
    model.passage_encoder.eval()
    return model.passage_encoder.encode([passage_text(p.title, p.text) for p in passages])


def test_training_d_z_alone_with_reindexing_learns_to_retrieve(world):
    """q(x) frozen at its random start: retrieval can only change through d(z) and the re-indexed
    index. Recall@1 on the trained questions leaves chance (1/64) far behind. Held-out questions stay
    at 0 here: their passages are only ever retrieved as wrong passages for training questions, so
    d(z) learns to push them away (with q(x) trained too they are found; next test)."""
    _, rag, _, train_set, _ = world
    model = RagModel.from_config(rag)
    config = _config(rag, freeze_query_encoder=True, reindex_every=20)
    assert evaluate_dev(model, train_set[:32], config).recall_at_1 <= 2 / 32
    stored_before = model.retriever.index.embeddings(np.arange(4)).copy()
    train(model, train_set, config)
    seen = evaluate_dev(model, train_set[:32], config)
    assert seen.recall_at_1 >= 0.2, seen  # 0.31 at seed 0
    # the index was rebuilt from the trained d(z): it equals a fresh encoding, not the start
    stored = model.retriever.index.embeddings(np.arange(len(model.retriever.index)))
    np.testing.assert_allclose(stored, _fresh_index_vectors(model), atol=1e-5)
    assert not np.allclose(stored[:4], stored_before)


def test_training_both_encoders_generalises_to_held_out_questions(world):
    _, rag, _, train_set, test_set = world
    model = RagModel.from_config(rag)
    result = train(model, train_set, _config(rag, reindex_every=20), dev_data=test_set)
    assert result.dev is not None
    # 0.69 / 0.75 at seed 0; q(x) alone reaches 1.0 (test_training): d(z) also learns to push away
    # passages that were never the right one for a training question, the held-out ones among them
    assert result.dev.recall_at_1 >= 0.5 and result.dev.exact_match >= 0.5, result.dev


def test_gradient_reaches_d_z_through_the_retrieved_passages_only(world):
    _, rag, _, train_set, _ = world
    model = RagModel.from_config(rag)
    config = _config(rag, lr=0.0, generator_lr=0.0, passage_lr=0.0, max_grad_norm=0.0)
    from rag.passage_training import attach_passage_encoder

    encoder = attach_passage_encoder(model, rag.index_dir)
    optimizer, scheduler = make_optimizer(model, config)
    before = model.retriever.index.embeddings(np.arange(len(model.retriever.index))).copy()
    train_step(model, [train_set[:4]], config, optimizer, scheduler)
    grad = encoder.model.get_input_embeddings().weight.grad
    assert grad is not None and grad.abs().sum() > 0
    # words of passages never retrieved for these questions get no gradient
    out = model([e.input for e in train_set[:4]], [e.target for e in train_set[:4]])
    seen = {w for row_t, row_x in zip(out.retrieved.titles, out.retrieved.texts, strict=True)
            for t, x in zip(row_t, row_x, strict=True) for w in passage_text(t, x).split()}  # fmt: skip
    vocab = encoder.tokenizer.get_vocab()
    unseen = [vocab[w] for p in model.retriever.passages.get(np.arange(len(model.retriever.passages)))
              for w in passage_text(p.title, p.text).split() if w not in seen and w in vocab]  # fmt: skip
    assert unseen and torch.all(grad[unseen] == 0)
    # a step does not touch the index; only reindex does
    np.testing.assert_array_equal(model.retriever.index.embeddings(np.arange(len(before))), before)


def test_checkpoint_holds_d_z_and_its_index_and_resume_is_exact(tmp_path):
    synth = SyntheticConfig(seed=1, dropout=0.1)
    task = make_task(synth)
    rag, _ = build_world(task, tmp_path / "world", synth, reader_steps=0, k=4)
    data = [Example.pair(p.question, p.answer) for p in task.train]
    config = _config(rag, steps=6, batch_size=8, reindex_every=2, save_every=1)
    whole = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "whole")
    first = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "cut", stop_after=3)
    rest = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "cut", resume=True)
    np.testing.assert_allclose(first.losses + rest.losses, whole.losses, rtol=0, atol=1e-6)
    # the checkpoint opens with its own knowledge base: the index built from the trained d(z)
    loaded = load_rag_model(tmp_path / "whole" / "checkpoint")
    assert (tmp_path / "whole" / "checkpoint" / "passage_encoder" / "model.safetensors").is_file()
    index = loaded.retriever.index.embeddings(np.arange(len(loaded.retriever.index)))
    trained = RagModel.from_config(rag)
    from rag.passage_training import attach_passage_encoder

    attach_passage_encoder(trained, rag.index_dir)
    from rag.train_checkpoint import _load_weights

    assert trained.passage_encoder is not None
    _load_weights(trained.passage_encoder.model, tmp_path / "whole" / "checkpoint" / "passage_encoder" / "model.safetensors")
    np.testing.assert_allclose(index, _fresh_index_vectors(trained), atol=1e-5)
