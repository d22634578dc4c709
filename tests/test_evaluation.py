"""evaluate() and `rag eval` on a tiny real knowledge base (tiny BERT d(z)/q(x), flat index, passage
store built by rag.knowledge) with a tiny random BART. Expected values come from other paths: brute-force
inner products over every stored vector, RagModel.generate, a plain greedy loop over the transformers
model, substring checks written out by hand."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from tiny_generators import tiny_bart, tiny_generator, tiny_short_answer_llama, word_tokenizer
from transformers import BertConfig, BertModel

from rag.cli import main
from rag.config import CorpusConfig, DecodingConfig, EncoderConfig, IndexConfig
from rag.eval_report import write_report
from rag.evaluation import EvalConfig, evaluate, evaluate_many, read_predictions
from rag.knowledge import build_knowledge_base
from rag.model import RagModel
from rag.retriever import Retriever
from rag.tasks import Example, LabelSet

DOCS = [
    ("angola", "luanda is the capital city of angola in africa"),
    ("france", "paris is the capital city of france in europe"),
    ("germany", "berlin is the capital city of germany"),
    ("portugal", "lisbon is the capital of portugal"),
    ("river", "the largest river in africa"),
    ("book", "the book was born in the year one"),
]
QUESTIONS = ["what is the capital of angola ?", "what is the capital of france ?",
             "where is berlin ?", "what is the largest river ?"]
ANSWERS = [("luanda",), ("paris",), ("germany",), ("nile",)]
DECODING = DecodingConfig(num_beams=1, max_new_tokens=6)


def _examples(answers=ANSWERS) -> list[Example]:
    return [Example(f"q{i}", q, a, a, i) for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))]


def _encoder_dir(path):
    """A word-level BERT folder; a wide initialisation keeps the random vectors of different texts apart."""
    tokenizer = word_tokenizer(["<pad>", "<unk>"])
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=0, initializer_range=1.0)
    BertModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-kb")
    corpus = root / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in DOCS), encoding="utf-8")
    encoder = _encoder_dir(root / "encoder")
    build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"), EncoderConfig(path=str(encoder)),
                         IndexConfig(), root / "kb", progress=False)
    return root


@pytest.fixture(scope="module")
def retriever(kb):
    return Retriever.open(kb / "kb")


def _config(**changes) -> EvalConfig:
    return EvalConfig(**{"k": 2, "recall_ks": (1, 3, 6), "decoding": DECODING, "progress": False, **changes})


def test_rag_records_hold_brute_force_retrieval_and_the_model_answers(retriever, tmp_path):
    gen = tiny_bart(seed=1)
    result = evaluate(_examples(), tmp_path, retriever=retriever, generator=gen, config=_config())
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert [r["id"] for r in records] == ["q0", "q1", "q2", "q3"] and result.n == 4

    stored = retriever.index.embeddings(np.arange(len(retriever.index)))  # (N, D) every stored d(z)
    scores = retriever.query_encoder.encode(QUESTIONS) @ stored.T  # (B, N)
    model = RagModel(retriever.query_encoder, retriever, gen, "token", 2)
    answers = model.generate(QUESTIONS, DECODING).answers
    for b, record in enumerate(records):
        order = np.argsort(-scores[b], kind="stable")
        assert [p["id"] for p in record["retrieved"]] == [retriever.passages[int(r)].id for r in order]
        top2 = torch.tensor(scores[b, order[:2]])
        np.testing.assert_allclose(record["doc_prior"], torch.softmax(top2, 0).numpy(), atol=1e-5)
        assert record["prediction"] == answers[b]
        assert sum(record["posterior"]) == pytest.approx(1.0, abs=1e-4)
        assert all(sum(row) == pytest.approx(1.0, abs=1e-3) for row in record["token_posterior"])
        assert len(record["hits"]) == 6


def test_retrieval_only_recall_and_exact_match_against_hand_checks(retriever, tmp_path):
    result = evaluate(_examples(), tmp_path / "ret", retriever=retriever, config=_config(mode="retrieval-only"))
    records = read_predictions(tmp_path / "ret" / "predictions.jsonl")
    ranked = [[dict(DOCS)[p["title"]] for p in r["retrieved"]] for r in records]
    hand = [[any(a in text.split() for a in ANSWERS[i]) for text in ranked[i]] for i in range(4)]
    for k in (1, 3, 6):
        assert result.recall[k] == sum(any(h[:k]) for h in hand) / 4
    assert result.recall[6] == 0.75  # "nile" is in no passage
    assert result.metrics["answer_in_top_passage"] == result.recall[1]

    gen = tiny_bart(seed=1)
    predicted = RagModel(retriever.query_encoder, retriever, gen, "token", 2).generate(QUESTIONS, DECODING).answers
    # two examples whose answer is what the model says, two whose answer it cannot say: EM = 1/2
    answers = [(predicted[0],), (predicted[1],), ("zzzz",), ("qqqq",)]
    scored = evaluate(_examples(answers), tmp_path / "em", retriever=retriever, generator=gen, config=_config())
    assert scored.metrics["exact_match"] == 0.5


def test_resumed_run_skips_written_examples_and_drops_a_torn_line(retriever, tmp_path):
    gen = tiny_bart(seed=2)
    full = tmp_path / "full"
    evaluate(_examples(), full, retriever=retriever, generator=gen, config=_config())
    part = tmp_path / "part"
    evaluate(_examples()[:2], part, retriever=retriever, generator=gen, config=_config())
    with open(part / "predictions.jsonl", "a", encoding="utf-8") as f:
        f.write('{"id": "q2", "predic')  # an interrupted write
    resumed = evaluate(_examples(), part, retriever=retriever, generator=gen, config=_config())
    assert resumed.timing.questions == 2
    assert read_predictions(part / "predictions.jsonl") == read_predictions(full / "predictions.jsonl")
    assert json.loads((part / "metrics.json").read_text())["n"] == 4
    with pytest.raises(ValueError, match="different run"):
        evaluate(_examples(), part, retriever=retriever, generator=gen, config=_config(k=1))
    # the same settings with another generator configuration (here its prompt style) is another run
    other = type(gen)(gen.model, gen.tokenizer, dataclasses.replace(gen.generator_config, prompt="plain"))
    with pytest.raises(ValueError, match="different run"):
        evaluate(_examples(), part, retriever=retriever, generator=other, config=_config())


@pytest.mark.parametrize("family", ["bart", "llama-chat"])
def test_shared_prefill_gives_what_each_configuration_gives_alone(retriever, tmp_path, family):
    gen = tiny_generator(family, seed=7)
    configs = [_config(k=1), _config(k=3), _config(k=3, kind="sequence"),
               _config(k=2, kind="sequence", decoding=DecodingConfig(num_beams=2, max_new_tokens=5, decoding="fast"))]
    together = evaluate_many(_examples(), [(c, tmp_path / f"many{i}") for i, c in enumerate(configs)],
                             retriever=retriever, generator=gen)
    for i, config in enumerate(configs):
        alone = evaluate(_examples(), tmp_path / f"alone{i}", retriever=retriever, generator=gen, config=config)
        shared = read_predictions(together[i].out_dir / "predictions.jsonl")
        single = read_predictions(alone.out_dir / "predictions.jsonl")
        assert [r["prediction"] for r in shared] == [r["prediction"] for r in single]
        for a, b in zip(shared, single, strict=True):
            assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)
            np.testing.assert_allclose(a["posterior"], b["posterior"], atol=1e-4)


@torch.no_grad()
def test_closed_book_is_plain_greedy_decoding_without_passages(tmp_path):
    gen = tiny_bart(seed=3)
    evaluate(_examples(), tmp_path, generator=gen, config=_config(mode="closed-book"))
    records = read_predictions(tmp_path / "predictions.jsonl")
    assert all("retrieved" not in r and r["k"] == 0 for r in records)
    for question, record in zip(QUESTIONS, records, strict=True):
        ids = gen.tokenizer(question, return_tensors="pt")["input_ids"]
        out = [gen.decoder_start_token_id]
        for step in range(DECODING.max_new_tokens):  # full forward each step, no cache
            logits = gen.model(input_ids=ids, decoder_input_ids=torch.tensor([out])).logits[0, -1]
            if step == 0:
                logits[gen.eos_token_id] = -float("inf")  # min_new_tokens = 1
            out.append(int(logits.argmax()))
            if out[-1] == gen.eos_token_id:
                break
        assert record["prediction"] == gen.decode(out[1:])


@torch.no_grad()
def test_classification_with_one_passage_is_the_softmax_over_label_tokens(retriever, tmp_path):
    gen = tiny_bart(seed=4)
    labels = LabelSet(("SUPPORTS", "REFUTES"), ("true", "false"))
    claims = [Example("c0", "paris is the capital of france", ("true",), ("true",), 0, label="SUPPORTS"),
              Example("c1", "berlin is a river", ("false",), ("false",), 1, label="REFUTES")]
    config = _config(k=1, metric="classification", labels=labels)
    result = evaluate(claims, tmp_path, retriever=retriever, generator=gen, config=config)
    records = read_predictions(tmp_path / "predictions.jsonl")
    label_ids = [gen.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in labels.targets]
    hits = 0
    for claim, record in zip(claims, records, strict=True):
        top = record["retrieved"][0]["title"]
        text = gen.format_inputs([claim.input], [[(top, dict(DOCS)[top])]]).texts[0]
        ids = gen.tokenizer(text, return_tensors="pt")["input_ids"]
        logits = gen.model(input_ids=ids, decoder_input_ids=torch.tensor([[gen.decoder_start_token_id]])).logits
        want = torch.softmax(logits[0, -1, label_ids], 0)
        np.testing.assert_allclose(record["class_probs"], want.numpy(), atol=1e-5)
        predicted = labels.labels[int(want.argmax())]
        assert record["prediction"] == predicted
        hits += predicted == claim.label
    assert result.metrics["accuracy"] == hits / 2


CLAIMS = [Example("c0", "paris is the capital of france", ("yes",), ("yes",), 0, label="SUPPORTS"),
          Example("c1", "berlin is a river", ("no",), ("no",), 1, label="REFUTES")]
# one token each after a space in the tiny byte-level vocabulary (" yes", " no"), not without one
TWO_WAY = LabelSet(("SUPPORTS", "REFUTES"), ("yes", "no"))


def _first_token_probs(gen, texts: list[str], label_ids: list[int]) -> torch.Tensor:
    """p(label token | prompt) for each prompt, by a plain forward of the causal model (no cache): (R, C)."""
    rows = []
    for text in texts:
        ids = torch.tensor([gen.tokenizer(text)["input_ids"]])
        rows.append(torch.softmax(gen.model(input_ids=ids).logits[0, -1].float(), -1)[label_ids])
    return torch.stack(rows)


@torch.no_grad()
def test_one_token_classes_rag_sequence_equals_rag_token_and_causal_labels_carry_the_space(retriever, tmp_path):
    """Sec 3.4 on a causal generator with a byte-level tokenizer: the label is the token training teaches
    after "Answer:" (" yes", not "yes"); RAG-Sequence and RAG-Token give the same class scores; both are
    sum_z p(z|x) p(label|x,z) renormalised over the labels, computed here by plain forwards."""
    gen = tiny_short_answer_llama(seed=3)
    label_ids = [gen.target_ids(t)[0] for t in TWO_WAY.targets]
    assert label_ids != [gen.tokenizer(t, add_special_tokens=False)["input_ids"][0] for t in TWO_WAY.targets]
    assert [len(gen.target_ids(t)) for t in TWO_WAY.targets] == [1, 1]
    runs = [(_config(k=2, kind=kind, metric="classification", labels=TWO_WAY), tmp_path / kind)
            for kind in ("token", "sequence")]  # fmt: skip
    evaluate_many(CLAIMS, runs, retriever=retriever, generator=gen)
    token, sequence = (read_predictions(tmp_path / kind / "predictions.jsonl") for kind in ("token", "sequence"))
    for claim, t, q in zip(CLAIMS, token, sequence, strict=True):
        np.testing.assert_allclose(t["class_logprobs"], q["class_logprobs"], atol=1e-6)
        passages = [(p["title"], dict(DOCS)[p["title"]]) for p in t["retrieved"][:2]]
        texts = gen.format_inputs([claim.input], [passages]).texts
        joint = torch.tensor(t["doc_prior"])[:, None] * _first_token_probs(gen, texts, label_ids)  # (K, C)
        want = joint.sum(0) / joint.sum()
        np.testing.assert_allclose(t["class_probs"], want.numpy(), atol=1e-5)
        assert t["prediction"] == TWO_WAY.labels[int(want.argmax())]
    evaluate(CLAIMS, tmp_path / "cb", generator=gen, config=_config(mode="closed-book", metric="classification",
                                                                    labels=TWO_WAY))  # fmt: skip
    for claim, record in zip(CLAIMS, read_predictions(tmp_path / "cb" / "predictions.jsonl"), strict=True):
        want = _first_token_probs(gen, gen.format_inputs([claim.input], None).texts, label_ids)[0]
        np.testing.assert_allclose(record["class_probs"], (want / want.sum()).numpy(), atol=1e-5)
        assert record["prediction"] in TWO_WAY.labels and record["accuracy"] == float(record["prediction"] == claim.label)


def test_report_has_tables_and_png_plots(retriever, tmp_path):
    gen = tiny_bart(seed=5)
    runs = []
    for k in (1, 2):
        runs.append(tmp_path / f"k{k}")
        evaluate(_examples(), runs[-1], retriever=retriever, generator=gen, config=_config(k=k))
    runs.append(tmp_path / "cb")
    evaluate(_examples(), runs[-1], generator=gen, config=_config(mode="closed-book"))
    path = write_report(runs, tmp_path, title="tiny")
    text = path.read_text()
    assert "recall@1" in text and "RAG-Token" in text and "closed-book" in text
    for png in ("recall_at_k.png", "metric_vs_k.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_runs_each_k_and_writes_the_report(kb, tmp_path):
    gen = tiny_bart(seed=6)
    gen.model.save_pretrained(tmp_path / "gen")
    gen.tokenizer.save_pretrained(tmp_path / "gen")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": list(a)}) + "\n"
                            for q, a in zip(QUESTIONS, ANSWERS, strict=True)), encoding="utf-8")
    common = ["eval", "--task", "nq-open", "--data", str(data), "--index", str(kb / "kb"),
              "--out", str(tmp_path / "out"), "--no-progress", "--max-new-tokens", "4"]
    assert main([*common, "--generator", str(tmp_path / "gen"), "-k", "1", "2", "--kind", "token", "sequence",
                 "--decoding", "thorough", "fast"]) == 0
    assert main([*common, "--mode", "retrieval-only"]) == 0
    names = [f"rag-{v}-k{k}" for v in ("token", "sequence-thorough", "sequence-fast") for k in (1, 2)]
    for run in [*names, "retrieval-only"]:
        assert len(read_predictions(tmp_path / "out" / run / "predictions.jsonl")) == 4
    report = (tmp_path / "out" / "report.md").read_text()
    assert report.count("| RAG-Token |") == 2 and report.count("| RAG-Sequence (fast) |") == 2
    assert "retrieval-only" in report
    assert main([*common, "--generator", str(tmp_path / "gen"), "--swap-index", str(tmp_path / "nowhere")]) == 2
    # --query-scale multiplies q(x), so every retrieved score, and sharpens p(z|x)
    scaled = [*common[:-5], "--out", str(tmp_path / "scaled"), "--no-progress", "--mode", "retrieval-only",
              "--query-scale", "5"]
    assert main(scaled) == 0
    plain = read_predictions(tmp_path / "out" / "retrieval-only" / "predictions.jsonl")
    sharp = read_predictions(tmp_path / "scaled" / "retrieval-only" / "predictions.jsonl")
    for a, b in zip(plain, sharp, strict=True):
        assert [p["id"] for p in a["retrieved"]] == [p["id"] for p in b["retrieved"]]
        np.testing.assert_allclose([5 * p["score"] for p in a["retrieved"]], [p["score"] for p in b["retrieved"]],
                                   rtol=1e-4)


def test_eval_output_paths_resume_overwrite_and_a_second_evaluator(kb, retriever, tmp_path, capsys):
    """rag eval --out: never a folder of other files or an input; a run of other settings only with
    --overwrite; a second evaluator of the same run folder fails at once (it used to interleave lines)."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": list(a)}) + "\n"
                            for q, a in zip(QUESTIONS, ANSWERS, strict=True)), encoding="utf-8")  # fmt: skip
    common = ["eval", "--task", "nq-open", "--data", str(data), "--index", str(kb / "kb"), "--no-progress",
              "--mode", "retrieval-only"]  # fmt: skip
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    assert main([*common, "--out", str(mine)]) == 2
    assert "did not write as a rag eval output" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]
    for inside in (kb / "kb", kb / "kb" / "runs", data):
        assert main([*common, "--out", str(inside)]) == 2
        assert "input" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([*common, "--out", str(out)]) == 0
    assert main([*common, "--out", str(out)]) == 0  # the same run again: resumed, nothing to do
    assert main([*common, "--out", str(out), "--limit", "2"]) == 2  # other settings, same run folder
    assert "--overwrite" in capsys.readouterr().err
    assert main([*common, "--out", str(out), "--limit", "2", "--overwrite"]) == 0
    assert len(read_predictions(out / "retrieval-only" / "predictions.jsonl")) == 2
    from rag.io import OutputBusyError, output_lock

    with output_lock(out / "retrieval-only" / "predictions.jsonl"):  # another evaluator is writing there
        with pytest.raises(OutputBusyError, match="another process"):
            evaluate(_examples(), out / "retrieval-only", retriever=retriever,
                     config=_config(mode="retrieval-only"))  # fmt: skip
