"""Training: the retriever learns from (question, answer) pairs alone; checkpoints, exact resume, the loop.

The synthetic world (rag.synthetic) is built once per session (conftest.world): tiny random q(x), d(z)
and generator saved as model folders, and a real knowledge base built from them by rag.knowledge.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import SYNTH

from rag.cli import main as cli_main
from rag.config import DecodingConfig
from rag.metrics import has_answer
from rag.model import RagModel
from rag.synthetic import SyntheticConfig, build_world, make_task, write_qa_jsonl
from rag.tasks import LabelSet
from rag.train_checkpoint import load_rag_model, read_checkpoint_config
from rag.training import (
    Example,
    TrainConfig,
    batch_order,
    doc_entropy,
    evaluate_dev,
    lr_factor,
    make_optimizer,
    read_examples,
    train,
    train_step,
)


def _config(rag, **changes) -> TrainConfig:
    base = TrainConfig(rag=rag, steps=200, batch_size=16, lr=3e-3, generator_lr=1e-4, schedule="constant")
    return dataclasses.replace(base, **changes)


def test_synthetic_task_is_honest():
    task = make_task(SYNTH)
    passage_words = {w for t, x in task.passages for w in f"{t} {x}".split()}
    texts = [f"{t} {x}" for t, x in task.passages]
    for pair in task.train + task.test:
        assert not set(pair.question.split()) & passage_words  # no lexical overlap with any passage
        assert sum(has_answer([pair.answer], text) for text in texts) == 1  # the answer is in one passage
    train_q = {p.question for p in task.train}
    assert not train_q & {p.question for p in task.test}
    assert not {p.answer for p in task.train} & {p.answer for p in task.test}  # test answers never trained
    train_words = {w for q in train_q for w in q.split()}
    assert all(set(p.question.split()) <= train_words for p in task.test)  # test words seen, combos not
    assert len(task.test) == 16 and len(task.passages) == 64


def test_retriever_learns_from_answers_alone_and_frozen_query_encoder_does_not(world):
    task, rag, reader_accuracy, train_set, test_set = world
    assert reader_accuracy >= 0.9  # the generator reads (in its own world) before RAG training starts
    chance_bound = 2 / len(test_set)  # chance recall@1 is 1/64: at most one or two lucky questions
    results = {}
    for frozen in (False, True):
        model = RagModel.from_config(rag)
        before = evaluate_dev(model, test_set, TrainConfig())
        assert before.recall_at_1 <= chance_bound and before.exact_match <= chance_bound
        result = train(model, train_set, _config(rag, freeze_query_encoder=frozen), dev_data=test_set)
        results[frozen] = result.dev
    learned, frozen = results[False], results[True]
    assert learned.recall_at_1 >= 0.8 and learned.exact_match >= 0.8, learned
    assert frozen.recall_at_1 <= chance_bound and frozen.exact_match <= chance_bound, frozen


def test_checkpoint_round_trip_loads_with_one_argument(world, tmp_path):
    _, rag, _, train_set, test_set = world
    rag = dataclasses.replace(rag, query_encoder=dataclasses.replace(rag.query_encoder, scale=2.0))
    model = RagModel.from_config(rag)
    result = train(model, train_set, _config(rag, steps=3), out_dir=tmp_path / "run")
    loaded = load_rag_model(result.checkpoint)
    assert (loaded.kind, loaded.k, loaded.query_encoder.scale) == (model.kind, model.k, 2.0)
    for a, b in ((model.query_encoder, loaded.query_encoder), (model.generator, loaded.generator)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[n], sb[n]) for n in sa)
    model.eval()
    questions, answers = [e.input for e in test_set[:4]], [e.target for e in test_set[:4]]
    with torch.no_grad():
        assert torch.allclose(model(questions, answers).nll, loaded(questions, answers).nll, atol=1e-6)
    assert model.generate(questions).answers == loaded.generate(questions).answers
    meta = read_checkpoint_config(result.checkpoint)
    assert meta["step"] == 3 and meta["train"]["lr"] == 3e-3
    assert (result.checkpoint / "query_encoder" / "model.safetensors").is_file()
    assert not list(tmp_path.glob("run/.*"))  # no temporary folder left behind


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    # dropout on: resuming must also restore the random number generator
    synth = SyntheticConfig(seed=1, dropout=0.1)
    task = make_task(synth)
    rag, _ = build_world(task, tmp_path / "world", synth, reader_steps=0, k=4)
    data = [Example.pair(p.question, p.answer) for p in task.train]
    config = dataclasses.replace(_config(rag, steps=6, batch_size=8, warmup_steps=2, schedule="linear"),
                                 save_every=2)  # fmt: skip
    whole = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "whole")
    first = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "cut", stop_after=3)
    rest = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "cut", resume=True)
    assert len(first.losses) == 3 and len(rest.losses) == 3 and rest.steps == 6
    np.testing.assert_allclose(first.losses + rest.losses, whole.losses, rtol=0, atol=1e-6)
    log = [json.loads(line) for line in (tmp_path / "cut" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5, 6]
    a, b = load_rag_model(tmp_path / "whole" / "checkpoint"), load_rag_model(tmp_path / "cut" / "checkpoint")
    assert all(torch.allclose(x, y, atol=1e-6) for x, y in zip(a.parameters(), b.parameters(), strict=True))


def test_gradient_accumulation_equals_one_large_batch(world):
    _, rag, _, train_set, _ = world
    grads = []
    for batches in ([train_set[:4], train_set[4:8]], [train_set[:8]]):
        model = RagModel.from_config(rag)
        config = _config(rag, lr=0.0, generator_lr=0.0, max_grad_norm=0.0, grad_accum=len(batches))
        optimizer, scheduler = make_optimizer(model, config)
        train_step(model, batches, config, optimizer, scheduler)
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert len(grads[0]) == len(grads[1]) > 0
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_frozen_parts_do_not_change_and_the_index_never_does(world):
    _, rag, _, train_set, _ = world
    for flag, frozen_part, trained_part in (
        ("freeze_query_encoder", "query_encoder", "generator"),
        ("freeze_generator", "generator", "query_encoder"),
    ):
        model = RagModel.from_config(rag)
        index_before = model.retriever.index.embeddings(np.arange(len(model.retriever.index))).copy()
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        train(model, train_set, _config(rag, steps=2, **{flag: True}))
        after = dict(model.named_parameters())
        changed = {n.split(".")[0] for n in before if not torch.equal(before[n], after[n])}
        assert changed == {trained_part}, (flag, changed, frozen_part)
        assert np.array_equal(model.retriever.index.embeddings(np.arange(len(index_before))), index_before)
    with pytest.raises(ValueError, match="nothing to train"):
        make_optimizer(RagModel.from_config(rag), _config(rag, freeze_query_encoder=True, freeze_generator=True))


def _labelled(task, train_set, n: int = 8) -> tuple[LabelSet, list[Example]]:
    """Two answer words of the synthetic world as one-token class targets, alternating over n questions."""
    values = (task.train[0].answer, next(p.answer for p in task.train if p.answer != task.train[0].answer))
    labels = LabelSet(("A", "B"), values)
    return labels, [Example.pair(e.input, values[i % 2], id=str(i)) for i, e in enumerate(train_set[:n])]


def _step(rag, kind: str, data: list[Example], **changes) -> tuple[float, list[torch.Tensor]]:
    rag = dataclasses.replace(rag, kind=kind)
    model = RagModel.from_config(rag)
    config = _config(rag, lr=0.0, generator_lr=0.0, max_grad_norm=0.0, batch_size=len(data), **changes)
    optimizer, scheduler = make_optimizer(model, config)
    record = train_step(model, [data], config, optimizer, scheduler)
    return record["loss"], [p.grad.clone() for p in model.parameters() if p.grad is not None]


def test_one_token_labels_are_scored_alone_and_both_kinds_train_the_same(world):
    """Sec 3.4: a class is a one-token target without an end token, so eq. 1 and eq. 2 are one loss,
    -log sum_z p(z|x) p(label|x,z), checked by hand; an ordinary target adds its end token's term."""
    task, rag, _, train_set, _ = world
    labels, data = _labelled(task, train_set)
    token_loss, token_grads = _step(rag, "token", data, labels=labels)
    sequence_loss, sequence_grads = _step(rag, "sequence", data, labels=labels)
    assert token_loss == pytest.approx(sequence_loss, rel=1e-6)
    for a, b in zip(token_grads, sequence_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    model = RagModel.from_config(rag)
    with torch.no_grad():
        retrieved = model.retriever.retrieve([e.input for e in data], model.k)
        passages = [list(zip(t, x, strict=True)) for t, x in zip(retrieved.titles, retrieved.texts, strict=True)]
        gen = model.generator
        prefix = gen.encode_prefix(gen.format_inputs([e.input for e in data], passages))
        first = torch.log_softmax(gen.target_logits(prefix, torch.arange(len(data) * model.k),
                                                    gen.encode_targets([e.target for e in data for _ in range(model.k)], end=False))[:, 0].float(), -1)  # fmt: skip
        picked = first[torch.arange(first.shape[0]), [gen.target_ids(e.target)[0] for e in data for _ in range(model.k)]]
        by_hand = -torch.logsumexp(torch.log_softmax(retrieved.scores, 1) + picked.view(len(data), model.k), 1).mean()
    assert token_loss == pytest.approx(float(by_hand), rel=1e-5)
    with_end_token, _ = _step(rag, "token", data)  # without labels: the end token's -log p is added
    assert with_end_token > token_loss + 1e-3


def test_label_training_refuses_targets_outside_the_labels_and_multi_token_labels(world):
    task, rag, _, train_set, _ = world
    labels, data = _labelled(task, train_set)
    model = RagModel.from_config(rag)
    with pytest.raises(ValueError, match="not one of the label targets"):
        train(model, [*data, Example.pair("x", "other", id="bad")], _config(rag, steps=1, batch_size=8, labels=labels))
    two_words = LabelSet(("A", "B"), (labels.targets[0], f"{labels.targets[1]} {labels.targets[0]}"))
    with pytest.raises(ValueError, match="2 tokens"):
        train(model, data, _config(rag, steps=1, batch_size=8, labels=two_words))
    with pytest.raises(ValueError, match="counterfactual"):
        train(model, data, _config(rag, steps=1, batch_size=8, labels=labels, counterfactual_rate=0.5))


def test_closed_book_training_changes_only_the_generator_and_scores_without_passages(world):
    """The paper's BART row: the generator alone learns from (x, y); q(x) and the index stay as they were."""
    _, rag, _, train_set, _ = world
    data = train_set[:8]
    loss, _ = _step(rag, "token", data, closed_book=True)
    model = RagModel.from_config(rag)
    with torch.no_grad():
        alone = model.score_passages([e.input for e in data], [e.target for e in data], None, None)
    assert loss == pytest.approx(float(alone.loss), rel=1e-5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model, train_set, _config(rag, steps=2, closed_book=True))
    changed = {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert changed == {"generator"}


def test_learning_rate_schedule_by_hand():
    linear = TrainConfig(steps=10, warmup_steps=2, schedule="linear")
    assert [lr_factor(s, linear) for s in range(4)] == [0.5, 1.0, 1.0, 0.875]
    assert lr_factor(10, linear) == 0.0
    cosine = dataclasses.replace(linear, schedule="cosine")
    assert lr_factor(6, cosine) == pytest.approx(0.5)  # half-way through the 8 decay steps
    assert lr_factor(9, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr_factor(7, dataclasses.replace(linear, schedule="constant")) == 1.0


def test_batch_order_is_a_function_of_position():
    order = batch_order(10, 3, seed=5, start=0, count=7)
    assert order[2:5] == batch_order(10, 3, seed=5, start=2, count=3)
    epoch0 = [i for b in order[:3] for i in b]
    assert len(set(epoch0)) == 9  # within an epoch no example repeats (the last 1 is dropped)
    assert order[:3] != order[3:6]  # a new permutation each epoch


def test_doc_entropy_by_hand():
    uniform = torch.log(torch.full((2, 4), 0.25))
    assert doc_entropy(uniform) == pytest.approx(math.log(4))
    p = torch.tensor([[0.5, 0.5, 1e-12, 1e-12]])
    assert doc_entropy(p.log()) == pytest.approx(math.log(2), abs=1e-6)


def test_read_examples_and_bad_input(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"input": "q1", "target": "a"}\n\n{"question": "q2", "answers": ["b", "c"]}\n')
    assert [(e.input, e.target, e.answers) for e in read_examples(good)] == [("q1", "a", ("a",)),
                                                                             ("q2", "b", ("b", "c"))]  # fmt: skip
    assert Example.pair("q", "a").answers == ("a",)  # exact match and recall need the target as an answer
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "q1", "target": "a"}\n{"input": "q2"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2, field 'answer': missing"):
        read_examples(bad)
    bad.write_text('{"input": "q1", "target": "a"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2, field 'json': malformed JSON"):
        read_examples(bad)


def test_cli_train_resume_and_plot(world, tmp_path, capsys):
    task, rag, _, _, _ = world
    train_file = write_qa_jsonl(task.train, tmp_path / "train.jsonl")
    dev_file = write_qa_jsonl(task.test[:4], tmp_path / "dev.jsonl")
    run = tmp_path / "run"
    common = ["train", "--train", str(train_file), "--dev", str(dev_file), "--index", rag.index_dir,
              "--query-encoder", rag.query_encoder.path, "--query-scale", "1", "--generator", rag.generator.path, "--kind", "token",
              "-k", "4", "--batch-size", "8", "--steps", "4", "--lr", "1e-3", "--out", str(run),
              "--eval-every", "2", "--quiet"]  # fmt: skip
    assert cli_main([*common, "--stop-after", "3"]) == 0
    assert cli_main([*common, "--resume"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "doc_entropy", "distinct_passages"):
        assert all(key in r for r in log)
    assert all(0 <= r["doc_entropy"] <= math.log(4) + 1e-6 and r["distinct_passages"] <= 32 for r in log)
    assert "dev_exact_match" in log[1] and "dev_recall_at_k" in log[3] and "dev_exact_match" not in log[0]
    model = load_rag_model(run / "checkpoint")
    assert (model.kind, model.k, model.query_encoder.scale) == ("token", 4, 1.0)
    # rag ask and rag eval take the checkpoint with one argument: its model, knowledge base, kind and k
    capsys.readouterr()
    question = task.test[0].question
    assert cli_main(["ask", "--checkpoint", str(run / "checkpoint"), "--json", "--max-new-tokens", "4", question]) == 0
    asked = json.loads(capsys.readouterr().out)
    with torch.no_grad():
        expected = model.generate([question], DecodingConfig(num_beams=1, max_new_tokens=4))
    assert asked["answer"] == expected.answers[0] and asked["k"] == 4
    assert [p["id"] for p in asked["passages"]] == expected.retrieved.ids[0]
    evaluated = tmp_path / "eval"
    assert cli_main(["eval", "--checkpoint", str(run / "checkpoint"), "--task", "nq-open", "--data", str(dev_file),
                     "--out", str(evaluated), "--no-progress", "--max-new-tokens", "4", "--dtype", "float32"]) == 0  # fmt: skip
    assert json.loads((evaluated / "rag-token-k4" / "metrics.json").read_text())["n"] == 4
    png = tmp_path / "curves.png"
    assert cli_main(["train", "plot", str(run / "log.jsonl"), "--out", str(png)]) == 0
    before = png.read_bytes()
    assert cli_main(["train", "plot", str(run / "log.jsonl"), "--out", str(png)]) == 2  # an existing file
    assert "--overwrite replaces it" in capsys.readouterr().err and png.read_bytes() == before
    assert cli_main(["train", "plot", str(run / "log.jsonl"), "--out", str(run / "log.jsonl")]) == 2
    assert cli_main(["train", "plot", str(run / "log.jsonl"), "--out", str(png), "--overwrite"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert cli_main([*common[:2], str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "x")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert cli_main(common) == 2  # the run folder already holds a checkpoint and --resume is not given
