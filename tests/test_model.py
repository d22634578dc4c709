"""RagModel on a tiny real knowledge base: tiny BERT q(x) and d(z), a flat DenseIndex, a PassageStore,
tiny random generators. Expected values come from brute force: numpy MIPS over all passages, plain
generator forwards without caches, and the paper's equations written out with explicit loops."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from tiny_encoders import tiny_sentence_transformers_dir, word_encoder, word_retriever, write_corpus
from tiny_generators import tiny_generator

from rag.config import (
    DEFAULT_QUERY_SCALE,
    CorpusConfig,
    DecodingConfig,
    EncoderConfig,
    GeneratorConfig,
    IndexConfig,
    RagConfig,
)
from rag.corpus import Passage
from rag.encoders import Encoder, load_encoder, passage_text
from rag.knowledge import build_knowledge_base
from rag.model import RagModel, doc_scores

PASSAGES = [
    Passage("0", "angola", "luanda is the capital city of angola in africa"),
    Passage("1", "france", "paris is the capital city of france in europe"),
    Passage("2", "germany", "berlin is the capital city of germany"),
    Passage("3", "portugal", "lisbon is the capital of portugal"),
    Passage("4", "book", "the book was born in the year one"),
    Passage("5", "river", "the largest river in africa"),
    Passage("6", "europe", "europe is a city ? no"),
]
QUESTIONS = ["what is the capital of angola ?", "who wrote the book ?", "where is the largest river ?"]
TARGETS = ["luanda", "one two", "africa"]


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    """(query encoder, passage encoder, stored d(z) (N, D), retriever)."""
    query_encoder, passage_encoder = word_encoder(1), word_encoder(2)
    path = tmp_path_factory.mktemp("kb") / "passages.arrow"
    stored, retriever = word_retriever(PASSAGES, path, query_encoder, passage_encoder)
    return query_encoder, passage_encoder, stored, retriever


def _brute_force_top(query_encoder: Encoder, stored: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = query_encoder.encode(QUESTIONS) @ stored.T  # (B, N)
    rows = np.argsort(-scores, axis=1)[:, :k]
    return rows, np.take_along_axis(scores, rows, 1)


def _plain_logprobs(gen, question: str, passage: Passage | None, target: str) -> list[float]:
    """log p(y_i | x, z, y_<i) of each target token from one plain forward (no cache, no padding)."""
    inputs = gen.format_inputs([question], None if passage is None else [[(passage.title, passage.text)]])
    ids = gen.encode_targets([target]).ids[0]
    with torch.no_grad():
        if gen.family == "seq2seq":
            decoder = torch.cat([torch.tensor([gen.decoder_start_token_id]), ids[:-1]])[None]
            logits = gen.model(input_ids=inputs.input_ids, decoder_input_ids=decoder).logits[0]
        else:
            full = torch.cat([inputs.input_ids[0], ids])[None]
            logits = gen.model(input_ids=full).logits[0, inputs.input_ids.shape[1] - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, None])[:, 0].tolist()


def _expected_nll(gen, kind: str, rows: np.ndarray, scores: np.ndarray) -> list[float]:
    """Eq. 1 (sequence) or eq. 2 (token) with explicit sums over passages and tokens."""
    out = []
    for b, question in enumerate(QUESTIONS):
        prior = [math.exp(s) for s in scores[b]]
        prior = [p / sum(prior) for p in prior]
        per_doc = [_plain_logprobs(gen, question, PASSAGES[r], TARGETS[b]) for r in rows[b]]
        if kind == "sequence":
            out.append(-math.log(sum(p * math.exp(sum(lp)) for p, lp in zip(prior, per_doc, strict=True))))
        else:
            steps = range(len(per_doc[0]))
            out.append(
                -sum(
                    math.log(sum(p * math.exp(lp[i]) for p, lp in zip(prior, per_doc, strict=True)))
                    for i in steps
                )
            )
    return out


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("name", ["bart", "llama-chat"])
def test_forward_equals_brute_force_marginal(kb, kind, name):
    query_encoder, _, stored, retriever = kb
    gen = tiny_generator(name)
    model = RagModel(query_encoder, retriever, gen, kind, k=3)
    with torch.no_grad():
        out = model(QUESTIONS, TARGETS)
    rows, scores = _brute_force_top(query_encoder, stored, 3)
    assert out.retrieved.rows.tolist() == rows.tolist()
    torch.testing.assert_close(
        out.doc_logprior.exp(), torch.softmax(torch.tensor(scores), 1), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(
        out.nll, torch.tensor(_expected_nll(gen, kind, rows, scores)), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(out.loss, out.nll.mean())


@pytest.mark.parametrize("kind", ["sequence", "token"])
@pytest.mark.parametrize("name", ["t5", "gpt2"])
def test_k1_equals_the_plain_generator(kb, kind, name):
    query_encoder, _, stored, retriever = kb
    gen = tiny_generator(name)
    with torch.no_grad():
        out = RagModel(query_encoder, retriever, gen, kind, k=1)(QUESTIONS, TARGETS)
        closed = RagModel(query_encoder, retriever, gen, kind, k=1).score_passages(
            QUESTIONS, TARGETS, None, None
        )
    rows, _ = _brute_force_top(query_encoder, stored, 1)
    plain = [-sum(_plain_logprobs(gen, q, PASSAGES[rows[b, 0]], TARGETS[b])) for b, q in enumerate(QUESTIONS)]
    torch.testing.assert_close(out.nll, torch.tensor(plain), atol=1e-4, rtol=0)
    assert torch.all(out.doc_logprior == 0)
    book = [-sum(_plain_logprobs(gen, q, None, TARGETS[b])) for b, q in enumerate(QUESTIONS)]
    torch.testing.assert_close(closed.nll, torch.tensor(book), atol=1e-4, rtol=0)


def test_gradients_reach_the_query_encoder_and_generator_only(kb):
    query_encoder, passage_encoder, stored, retriever = kb
    before = stored.copy()
    model = RagModel(query_encoder, retriever, tiny_generator("bart"), "sequence", k=3)
    model.zero_grad()
    out = model(QUESTIONS, TARGETS, label_smoothing=0.1)
    assert not torch.allclose(out.loss, out.nll.mean())  # smoothing changed the loss
    out.loss.backward()
    grads = [p.grad for p in model.query_encoder.parameters() if p.grad is not None]
    assert (
        grads and sum(g.abs().sum() for g in grads) > 0
    )  # only through log p(z|x): x reaches the generator as text
    assert sum(p.grad.abs().sum() for p in model.generator.parameters() if p.grad is not None) > 0
    assert all(p.grad is None for p in passage_encoder.parameters())
    assert not out.retrieved.embeddings.requires_grad and out.retrieved.embeddings.grad is None
    np.testing.assert_array_equal(retriever.index.embeddings(np.arange(len(PASSAGES))), before)
    assert {id(p) for p in model.parameters()}.isdisjoint(id(p) for p in passage_encoder.parameters())


def test_query_gradient_is_the_prior_minus_posterior_direction(kb):
    """d(-log p(y|x))/dq = sum_z (p(z|x) - p(z|x,y)) d(z) for RAG-Sequence (differentiate eq. 1)."""
    query_encoder, _, _, retriever = kb
    model = RagModel(query_encoder, retriever, tiny_generator("llama"), "sequence", k=3)
    with torch.no_grad():
        retrieved = retriever.retrieve(QUESTIONS, 3)
    query = torch.tensor(query_encoder.encode(QUESTIONS), requires_grad=True)
    passages = [list(zip(t, x, strict=True)) for t, x in zip(retrieved.titles, retrieved.texts, strict=True)]
    out = model.score_passages(QUESTIONS, TARGETS, passages, doc_scores(query, retrieved.embeddings))
    out.nll.sum().backward()
    with torch.no_grad():
        posterior = torch.softmax(out.doc_logprior + out.passage_logprob, 1)  # (B, K)
        want = torch.einsum("bk,bkd->bd", out.doc_logprior.exp() - posterior, retrieved.embeddings)
    torch.testing.assert_close(query.grad, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        doc_scores(query, retrieved.embeddings).detach(), retrieved.scores, atol=1e-5, rtol=0
    )


def test_bad_arguments_are_refused(kb):
    query_encoder, _, _, retriever = kb
    gen = tiny_generator("bart")
    with pytest.raises(ValueError, match="kind"):
        RagModel(query_encoder, retriever, gen, "both", k=2)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="k must"):
        RagModel(query_encoder, retriever, gen, "token", k=0)
    model = RagModel(query_encoder, retriever, gen, "token", k=2)
    with pytest.raises(ValueError, match="scores"):
        model.score_passages(QUESTIONS[:1], TARGETS[:1], [[("a", "b")]], None)


def test_generate_with_k1_is_greedy_decoding_of_the_plain_generator(kb):
    query_encoder, _, stored, retriever = kb
    gen = tiny_generator("llama", seed=3)
    model = RagModel(query_encoder, retriever, gen, "token", k=1)
    result = model.generate(QUESTIONS, DecodingConfig(num_beams=1, max_new_tokens=6, min_new_tokens=1))
    rows, _ = _brute_force_top(query_encoder, stored, 1)
    for b, question in enumerate(QUESTIONS):
        passage = PASSAGES[rows[b, 0]]
        ids = gen.format_inputs([question], [[(passage.title, passage.text)]]).input_ids
        out: list[int] = []
        with torch.no_grad():
            for step in range(6):
                logprobs = torch.log_softmax(gen.model(input_ids=ids).logits[0, -1], -1)
                if step == 0:
                    logprobs[gen.eos_token_id] = -math.inf  # min_new_tokens = 1
                token = int(logprobs.argmax())
                out.append(token)
                if token == gen.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]])], 1)
        assert result.generation.sequences[b][0] == out
        assert result.answers[b] == gen.decode(out)
    assert result.retrieved.rows.tolist() == rows.tolist()


@pytest.mark.slow
def test_default_models_answer_angola_with_luanda_from_the_angola_passage():
    """The real defaults: all-MiniLM-L6-v2 q(x)/d(z), the Wikipedia-summaries index, SmolLM2, k = 5."""
    question = ["What is the capital of Angola?"]
    # RAG-Token with 4 beams. Greedy RAG-Token, and RAG-Sequence, answer "Cabinda" here (Angola's
    # exclave, named in the Angola passage): under the short-answer prompt SmolLM2-135M puts Luanda
    # ahead only over the whole answer (by about 0.1 nats), which the beam finds and greedy does not.
    model = RagModel.from_config(RagConfig(kind="token", k=5))
    result = model.generate(question, DecodingConfig(num_beams=4, max_new_tokens=12))
    assert "Luanda" in result.answers[0]
    titles = result.retrieved.titles[0]
    assert "Angola" in titles
    best = int(result.generation.doc_logposterior[0, 0].argmax())
    # the posterior moves to a passage that states the answer: the Angola or the Luanda article
    assert titles[best] in ("Angola", "Luanda") and "Luanda" in result.retrieved.texts[0][best], dict(
        zip(titles, result.generation.doc_logposterior[0, 0].exp().tolist(), strict=True)
    )
    for kind in ("sequence", "token"):
        model.kind = kind
        with torch.no_grad():
            out = model(question * 3, ["Luanda", "Lisbon", "Cabinda"])
        nll = out.nll.tolist()
        # both places the Angola passage names beat a capital it does not; RAG-Token prefers Luanda,
        # RAG-Sequence Cabinda (by 0.14 nats: its beam answers "Cabinda")
        assert max(nll[0], nll[2]) < nll[1], (kind, nll)
        if kind == "token":
            assert nll[0] < nll[2], (kind, nll)


def test_from_checkpoint_reads_rag_train_checkpoints_only(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished training checkpoint"):
        RagModel.from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text('{"format": "rag-knowledge-base"}')
    with pytest.raises(ValueError, match="field 'format'"):
        RagModel.from_checkpoint(tmp_path)


def test_from_config_builds_q_with_its_scale_sharper_prior_same_ranking(tmp_path):
    """A tiny real knowledge base (normalised encoder, cosine scores) read through from_config twice:
    q(x) at the RagConfig default scale 20 and at 1. Expected scores from brute force with an unscaled
    copy of the encoder over the passages."""
    enc = tiny_sentence_transformers_dir(tmp_path / "enc", seed=5)
    write_corpus(tmp_path / "docs.jsonl", docs=12, seed=1)
    corpus = CorpusConfig(source=str(tmp_path / "docs.jsonl"), words_per_passage=20)
    build_knowledge_base(corpus, EncoderConfig(path=str(enc)), IndexConfig(), tmp_path / "kb", progress=False)
    gen = tiny_generator("bart")
    gen.model.save_pretrained(tmp_path / "gen")
    gen.tokenizer.save_pretrained(tmp_path / "gen")
    base = RagConfig(
        kind="sequence",
        k=4,
        query_encoder=EncoderConfig(path=str(enc), scale=DEFAULT_QUERY_SCALE),
        generator=GeneratorConfig(path=str(tmp_path / "gen"), max_input_tokens=96),
        index_dir=str(tmp_path / "kb"),
    )
    flat = dataclasses.replace(base, query_encoder=dataclasses.replace(base.query_encoder, scale=1.0))
    questions = ["what is the capital of angola ?", "where is the largest river ?"]
    outs = {}
    for name, config in (("scaled", base), ("plain", flat)):
        model = RagModel.from_config(config)
        assert model.query_encoder.scale == config.query_encoder.scale
        with torch.no_grad():
            outs[name] = model(questions, ["luanda", "africa"])
    scaled, plain = outs["scaled"], outs["plain"]
    assert scaled.retrieved.rows.tolist() == plain.retrieved.rows.tolist()
    unscaled = load_encoder(EncoderConfig(path=str(enc)))
    q = unscaled.encode(questions)  # (B, D), unit norm
    stored = unscaled.encode([passage_text(t, x) for t, x in zip(*_flat(scaled.retrieved), strict=True)])
    cosines = np.einsum("bd,bkd->bk", q, stored.reshape(len(questions), 4, -1))  # (B, K)
    torch.testing.assert_close(plain.retrieved.scores, torch.tensor(cosines), atol=1e-5, rtol=0)
    torch.testing.assert_close(scaled.retrieved.scores, 20 * torch.tensor(cosines), atol=2e-4, rtol=0)
    torch.testing.assert_close(
        scaled.doc_logprior, torch.log_softmax(20 * torch.tensor(cosines), 1), atol=2e-4, rtol=0
    )

    def entropy(logp: torch.Tensor) -> torch.Tensor:
        return -(logp.exp() * logp).sum(1)  # (B,)

    assert bool((entropy(scaled.doc_logprior) < entropy(plain.doc_logprior)).all())


def _flat(retrieved) -> tuple[list[str], list[str]]:
    return [t for row in retrieved.titles for t in row], [x for row in retrieved.texts for x in row]
