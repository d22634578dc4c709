"""`rag ask`: the answer and its evidence.

Fast tests run the Asker on a tiny real knowledge base (tiny BERT encoders, flat index, passage store,
tiny random BART) and check the reported prior and posterior against values computed here from the
retrieval scores and plain generator forwards. The slow test runs the command with the default models.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_encoders import word_encoder, word_retriever
from tiny_generators import tiny_generator

from rag.answering import Asker, to_json
from rag.cli import build_parser, main
from rag.cli.ask import _questions, format_answer, plot_path
from rag.config import DecodingConfig
from rag.corpus import Passage
from rag.heatmap import plot_token_posteriors, token_posterior_matrix
from rag.model import RagModel

PASSAGES = [
    Passage("0", "angola", "luanda is the capital city of angola in africa"),
    Passage("1", "france", "paris is the capital city of france in europe"),
    Passage("2", "germany", "berlin is the capital city of germany"),
    Passage("3", "portugal", "lisbon is the capital of portugal"),
    Passage("4", "river", "the largest river in africa"),
]
QUESTION = "what is the capital of angola ?"
K = 3


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """(query encoder, stored d(z) (N, D), retriever, generator)."""
    query_encoder = word_encoder(1)
    path = tmp_path_factory.mktemp("kb") / "passages.arrow"
    stored, retriever = word_retriever(PASSAGES, path, query_encoder, word_encoder(2))
    return query_encoder, stored, retriever, tiny_generator("bart", seed=3)


def _asker(parts, kind: str, beams: int = 2) -> Asker:
    query_encoder, _, retriever, gen = parts
    config = DecodingConfig(num_beams=beams, max_new_tokens=5, min_new_tokens=2, decoding="thorough")
    return Asker(RagModel(query_encoder, retriever, gen, kind, K), config)


def _passage_logprob(gen, passage: Passage, ids: list[int]) -> float:
    """log p(y|x,z) of the generated ids from one plain forward (no cache, no padding)."""
    inputs = gen.format_inputs([QUESTION], [[(passage.title, passage.text)]])
    decoder = torch.tensor([[gen.decoder_start_token_id, *ids[:-1]]])
    with torch.no_grad():
        logits = gen.model(input_ids=inputs.input_ids, decoder_input_ids=decoder).logits[0]
    return float(logits.log_softmax(-1)[torch.arange(len(ids)), torch.tensor(ids)].sum())


@pytest.mark.parametrize(("kind", "beams"), [("token", 2), ("token", 1), ("sequence", 2)])
def test_answer_reports_the_retrieved_passages_prior_and_posterior(parts, kind, beams):
    query_encoder, stored, _, gen = parts
    answer = _asker(parts, kind, beams).ask(QUESTION)

    scores = query_encoder.encode([QUESTION])[0] @ stored.T  # (N,) brute-force MIPS
    top = np.argsort(-scores)[:K]
    assert [p.id for p in answer.passages] == [PASSAGES[i].id for i in top]
    assert [p.title for p in answer.passages] == [PASSAGES[i].title for i in top]
    np.testing.assert_allclose([p.score for p in answer.passages], scores[top], rtol=1e-5)
    prior = np.exp(scores[top] - scores[top].max())
    prior /= prior.sum()
    np.testing.assert_allclose([p.prior for p in answer.passages], prior, rtol=1e-5)

    assert answer.token_ids and answer.answer == gen.decode(answer.token_ids)
    logp = np.array([_passage_logprob(gen, PASSAGES[i], answer.token_ids) for i in top])
    joint = np.log(prior) + logp
    posterior = np.exp(joint - joint.max())
    posterior /= posterior.sum()
    np.testing.assert_allclose([p.posterior for p in answer.passages], posterior, rtol=1e-4, atol=1e-6)
    if kind == "sequence":  # thorough decoding: log p(y|x) = logsumexp_z [log p(z|x) + log p(y|x,z)]
        assert answer.log_prob == pytest.approx(float(np.logaddexp.reduce(joint)), abs=1e-4)
        assert answer.tokens == []
    else:  # per token: p(z_i|x,y_<=i) from the same forwards, position by position
        assert len(answer.tokens) == len(answer.token_ids)
        assert all(sum(t.posterior) == pytest.approx(1.0, abs=1e-5) for t in answer.tokens)
        first = np.log(prior) + [_passage_logprob(gen, PASSAGES[i], answer.token_ids[:1]) for i in top]
        first = np.exp(first - first.max())
        np.testing.assert_allclose(answer.tokens[0].posterior, first / first.sum(), rtol=1e-4, atol=1e-6)


def test_text_and_json_output(parts):
    answer = _asker(parts, "token").ask(QUESTION)
    text = format_answer(answer)
    assert text.startswith(f"Q: {QUESTION}\nA: {answer.answer}\n")
    assert (
        f"{answer.passages[0].prior:6.3f} -> {answer.passages[0].posterior:6.3f}  {answer.passages[0].title}"
        in text
    )
    data = json.loads(to_json(answer))
    assert data["answer"] == answer.answer and data["kind"] == "token" and data["k"] == K
    assert [p["title"] for p in data["passages"]] == [p.title for p in answer.passages]


def test_figure_2_heatmap_is_the_answers_token_posteriors(parts, tmp_path):
    """rag ask --plot: the PNG's matrix is p(z_i|x,y_<=i) with passages as rows and answer tokens as columns."""
    answer = _asker(parts, "token", beams=1).ask(QUESTION)
    matrix = token_posterior_matrix(answer)  # (K, T)
    assert len(matrix) == K and all(len(row) == len(answer.token_ids) for row in matrix)
    for i, token in enumerate(answer.tokens):
        assert [row[i] for row in matrix] == token.posterior
    png = plot_token_posteriors(answer, tmp_path / "fig" / "heatmap.png")
    from matplotlib.image import imread

    height, width, _ = imread(png).shape
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and width > 300 and height > 200
    with pytest.raises(ValueError, match="only RAG-Token"):
        token_posterior_matrix(_asker(parts, "sequence").ask(QUESTION))
    assert plot_path("out/fig.png", None) == Path("out/fig.png")
    assert plot_path("out/fig.png", 2) == Path("out/fig-2.png")


def test_plot_needs_rag_token_before_any_model_loads(capsys, tmp_path):
    assert main(["ask", "--kind", "sequence", "--plot", str(tmp_path / "f.png"), "q"]) == 2
    assert "--kind token" in capsys.readouterr().err and not (tmp_path / "f.png").exists()


def test_interactive_reads_questions_until_eof():
    args = build_parser().parse_args(["ask", "-i", "first question"])
    stdin = io.StringIO("second question\n\n   \nthird question")
    assert [q.strip() for q in _questions(args, stdin)] == [
        "first question",
        "second question",
        "third question",
    ]


def test_bad_invocations_are_errors(capsys, parts):
    assert main(["ask"]) == 2
    assert "give a question" in capsys.readouterr().err
    assert main(["ask", "--beams", "0", "q"]) == 2
    with pytest.raises(ValueError, match="empty"):
        _asker(parts, "token").ask("   ")


@pytest.mark.slow
def test_rag_ask_answers_luanda_with_the_angola_passage_on_top():
    """The real default models and knowledge base, through the command line (--json and -i)."""
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    out = subprocess.run(
        [sys.executable, "-m", "rag.cli", "ask", "--json", "-i", "--beams", "4"],  # the paper's beam search, over the shipped reader
        input="What is the capital of Angola?\n",
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert "luanda" in data["answer"].lower()
    best = max(data["passages"], key=lambda p: p["posterior"])
    assert best["title"] in ("Angola", "Luanda") and "Luanda" in best["text"]  # a passage stating the answer
    assert sum(p["prior"] for p in data["passages"]) == pytest.approx(1.0, abs=1e-4)
    assert sum(p["posterior"] for p in data["passages"]) == pytest.approx(1.0, abs=1e-4)


BATCH = [QUESTION, "where is berlin ?", "what is the largest river in africa ?", "who wrote the book ?"]


@pytest.mark.parametrize(("name", "kind", "beams"), [("bart", "token", 1), ("bart", "token", 2),
                                                     ("bart", "sequence", 2), ("llama-short-answer", "token", 1),
                                                     ("llama", "sequence", 1)])  # fmt: skip
def test_a_batch_answers_exactly_as_one_question_at_a_time(parts, name, kind, beams):
    """ask_many (one retrieval, one batched decoding; causal prompts left-padded to one width) gives
    each question the answer, evidence and posteriors that asking it alone gives."""
    query_encoder, _, retriever, _ = parts
    config = DecodingConfig(num_beams=beams, max_new_tokens=6, min_new_tokens=2)
    asker = Asker(RagModel(query_encoder, retriever, tiny_generator(name, seed=5), kind, K), config)
    batched = asker.ask_many(BATCH)
    for question, answer in zip(BATCH, batched, strict=True):
        alone = asker.ask(question)
        assert answer.token_ids == alone.token_ids and answer.answer == alone.answer
        assert [p.id for p in answer.passages] == [p.id for p in alone.passages]
        for got, want in zip(answer.passages, alone.passages, strict=True):
            assert got.prior == pytest.approx(want.prior, abs=1e-5)
            assert got.posterior == pytest.approx(want.posterior, abs=1e-5)
        assert answer.log_prob == pytest.approx(alone.log_prob, abs=1e-4)
        assert [t.token for t in answer.tokens] == [t.token for t in alone.tokens]
        for got, want in zip(answer.tokens, alone.tokens, strict=True):
            np.testing.assert_allclose(got.posterior, want.posterior, atol=1e-5)
    assert len({tuple(a.token_ids) for a in batched}) > 1 or len({a.passages[0].id for a in batched}) > 1
