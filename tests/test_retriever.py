from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_encoders import (
    WORDS_PER_PASSAGE,
    expected_passages,
    tiny_bert_dir,
    tiny_dpr_dir,
    tiny_knowledge_base,
    write_corpus,
)

from rag.cli import main
from rag.config import DEFAULT_QUERY_SCALE, CorpusConfig, EncoderConfig, IndexConfig
from rag.encoders import load_encoder, passage_text
from rag.knowledge import build_knowledge_base, encoder_config, open_knowledge_base, query_encoder_config
from rag.retriever import Retriever

QUESTIONS = ["what is the capital of angola?", "the largest river", "where is luanda", "congo"]


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    kb, encoder_dir, _, records = tiny_knowledge_base(tmp_path_factory.mktemp("kb"), encoder_seed=5, corpus_seed=1, docs=30)
    return kb, encoder_dir, expected_passages(records)


def brute_force(q: np.ndarray, matrix: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ matrix.T  # (B, N)
    rows = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return rows, np.take_along_axis(scores, rows, 1)


def test_retrieve_equals_brute_force(kb):
    path, encoder_dir, passages = kb
    retriever = Retriever.open(path)
    got = retriever.retrieve(QUESTIONS, k=5)
    # the one rule: q(x) is d(z)'s normalised encoder with scale 20, the scores 20 * cosine
    assert retriever.query_encoder.scale == DEFAULT_QUERY_SCALE

    fresh = load_encoder(EncoderConfig(path=str(encoder_dir)))
    matrix = fresh.encode([passage_text(t, x) for t, x in passages])  # (N, D)
    q = DEFAULT_QUERY_SCALE * fresh.encode(QUESTIONS)  # (B, D)
    rows, scores = brute_force(q, matrix, 5)

    assert got.rows.dtype == np.int64 and got.rows.shape == (4, 5) and len(got) == 4 and got.k == 5
    assert got.scores.dtype == torch.float32 and got.scores.shape == (4, 5)
    np.testing.assert_allclose(got.scores.numpy(), scores, atol=1e-5)  # the k best scores
    # Rows agree up to near-ties (a random tiny model scores some passages within float error);
    # whatever the order among those, each returned row carries its own brute-force score.
    np.testing.assert_allclose(np.take_along_axis(q @ matrix.T, got.rows, 1), scores, atol=1e-5)
    gap = np.abs(scores[:, :, None] - scores[:, None, :]) + np.eye(5) > 1e-5  # (B, K, K) no near-tie
    clear = gap.all(axis=2)  # (B, K): ranks whose score is not tied with another
    assert clear.sum() >= 15
    np.testing.assert_array_equal(got.rows[clear], rows[clear])
    assert got.embeddings.dtype == torch.float32 and got.embeddings.shape == (4, 5, 32)
    np.testing.assert_allclose(got.embeddings.numpy(), matrix[got.rows], atol=1e-5)
    assert got.titles == [[passages[r][0] for r in row] for row in got.rows]
    assert got.texts == [[passages[r][1] for r in row] for row in got.rows]
    store = open_knowledge_base(path).passages
    assert got.ids == [[store[int(r)].id for r in row] for row in got.rows]


def test_retrieve_vectors_scores_are_q_dot_stored_embeddings(kb):
    path, _, _ = kb
    retriever = Retriever.open(path)
    q = torch.randn(3, 32, requires_grad=True)
    got = retriever.retrieve_vectors(q, k=4)
    assert not got.scores.requires_grad and not got.embeddings.requires_grad
    expected = torch.einsum("bd,bkd->bk", q.detach(), got.embeddings)
    torch.testing.assert_close(got.scores, expected)
    assert bool((got.scores[:, :-1] >= got.scores[:, 1:]).all())
    from_numpy = retriever.retrieve_vectors(q.detach().numpy(), k=4)
    np.testing.assert_array_equal(from_numpy.rows, got.rows)
    index = open_knowledge_base(path).index
    np.testing.assert_allclose(got.embeddings.numpy(), index.embeddings(got.rows))


def test_query_scale_keeps_the_ranking_and_sharpens_the_prior(kb):
    path, _, _ = kb
    plain = Retriever.open(path, scale=1.0).retrieve(QUESTIONS, k=5)
    hot = Retriever.open(path).retrieve(QUESTIONS, k=5)  # the rule's default for a normalised encoder
    np.testing.assert_array_equal(hot.rows, plain.rows)
    torch.testing.assert_close(hot.scores, 20.0 * plain.scores)
    p_plain, p_hot = plain.scores.softmax(-1), hot.scores.softmax(-1)  # p(z|x) over the top k
    assert bool((p_hot[:, 0] > p_plain[:, 0]).all())


def test_passage_encoder_scale_must_be_one(tmp_path, kb):
    _, encoder_dir, _ = kb
    write_corpus(tmp_path / "docs.jsonl", docs=3)
    with pytest.raises(ValueError, match="scale 1.0"):
        build_knowledge_base(
            CorpusConfig(source=str(tmp_path / "docs.jsonl")),
            EncoderConfig(path=str(encoder_dir), scale=20.0),
            IndexConfig(),
            tmp_path / "kb",
        )
    assert not (tmp_path / "kb").exists()


def test_retriever_rejects_bad_input(kb, tmp_path):
    path, _, passages = kb
    retriever = Retriever.open(path)
    with pytest.raises(TypeError, match="list of questions"):
        retriever.retrieve("a single string", k=2)
    with pytest.raises(ValueError, match="no questions"):
        retriever.retrieve([], k=2)
    with pytest.raises(ValueError, match="k must be"):
        retriever.retrieve(QUESTIONS, k=len(passages) + 1)
    with pytest.raises(ValueError, match=r"\(B, 32\)"):
        retriever.retrieve_vectors(np.zeros((2, 16), np.float32), k=2)
    other = load_encoder(EncoderConfig(path=str(tiny_bert_dir(tmp_path / "b"))))
    other.model.config.hidden_size = 24  # stands for an encoder of another width
    kb_parts = open_knowledge_base(path)
    with pytest.raises(ValueError, match="dim"):
        Retriever(kb_parts.index, kb_parts.passages, other)


def test_cli_search_json_matches_the_retriever(kb, capsys):
    path, _, _ = kb
    assert main(["search", "--index", str(path), *QUESTIONS[:2], "-k", "3", "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    expected = Retriever.open(path).retrieve(QUESTIONS[:2], k=3)
    assert [line["query"] for line in lines] == QUESTIONS[:2]
    for i, line in enumerate(lines):
        assert [h["id"] for h in line["hits"]] == expected.ids[i]
        assert [h["title"] for h in line["hits"]] == expected.titles[i]
        np.testing.assert_allclose([h["score"] for h in line["hits"]], expected.scores[i].numpy(), atol=1e-6)
    assert main(["search", "--index", str(path), QUESTIONS[0], "-k", "2"]) == 0
    text = capsys.readouterr().out
    assert (
        text.startswith(f"query: {QUESTIONS[0]}")
        and f"1. {expected.scores[0, 0]:.4f}  {expected.titles[0][0]}" in text
    )


def test_cli_search_bad_input(kb, tmp_path, capsys):
    path, _, passages = kb
    assert main(["search", "--index", str(tmp_path), "q"]) == 2
    assert "no meta.json" in capsys.readouterr().err
    assert main(["search", "--index", str(path), "q", "-k", str(len(passages) + 1)]) == 2
    assert "exceeds" in capsys.readouterr().err


def test_dpr_pair_question_encoder_over_context_encoder_index(tmp_path, capsys):
    """The paper's set-up: d(z) a DPRContextEncoder, q(x) a separate DPRQuestionEncoder."""
    ctx = tiny_dpr_dir(tmp_path / "ctx", side="context", seed=7)
    question = tiny_dpr_dir(tmp_path / "question", side="question", seed=8)
    records = write_corpus(tmp_path / "docs.jsonl", docs=12, seed=2)
    corpus = CorpusConfig(source=str(tmp_path / "docs.jsonl"), words_per_passage=WORDS_PER_PASSAGE)
    build_knowledge_base(corpus, EncoderConfig(path=str(ctx)), IndexConfig(), tmp_path / "kb", progress=False)
    with pytest.raises(ValueError, match="DPR question encoder"):
        Retriever.open(tmp_path / "kb")
    got = Retriever.open(tmp_path / "kb", encoder=EncoderConfig(path=str(question))).retrieve(QUESTIONS, k=3)

    passages = expected_passages(records)
    d = load_encoder(EncoderConfig(path=str(ctx))).encode([passage_text(t, x) for t, x in passages])
    q = load_encoder(EncoderConfig(path=str(question))).encode(QUESTIONS)
    rows, scores = brute_force(q, d, 3)
    np.testing.assert_allclose(got.scores.numpy(), scores, atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(q @ d.T, got.rows, 1), scores, atol=1e-5)
    assert (
        main(["search", "--index", str(tmp_path / "kb"), QUESTIONS[0], "--query-encoder", str(question), "--json"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["hits"][0]["id"] == got.ids[0][0]


# ---------------------------------------------------------------- the real packaged corpus and encoder


@pytest.fixture(scope="module")
def default_kb():
    from rag.knowledge import default_knowledge_base

    return default_knowledge_base(progress=False)


@pytest.mark.slow
def test_angola_on_the_default_knowledge_base(default_kb):
    retriever = Retriever.open(default_kb)
    got = retriever.retrieve(["What is the capital of Angola?"], k=5)
    assert got.titles[0][0] == "Angola"
    kb = open_knowledge_base(default_kb)
    d_z = load_encoder(encoder_config(kb.meta))  # as the knowledge base was built (float32 or bfloat16)
    d = d_z.encode([passage_text(t, x) for t, x in zip(got.titles[0], got.texts[0], strict=True)])
    # bfloat16 d(z) (the default where native) differs with its batch's padding: ~1e-3 per coordinate
    atol = 1e-5 if kb.meta["encoder"]["dtype"] == "float32" else 3e-3
    np.testing.assert_allclose(got.embeddings[0].numpy(), d, atol=atol)
    q = load_encoder(query_encoder_config(kb.meta)).encode(["What is the capital of Angola?"])  # scale 20
    assert retriever.query_encoder.scale == DEFAULT_QUERY_SCALE
    # scores are q(x) . the stored d(z), exactly as computed from them
    np.testing.assert_allclose(got.scores.numpy(), q @ got.embeddings[0].numpy().T, atol=1e-4)


def _trivia_questions(n: int) -> list[str]:
    import yaml

    from rag.resources import red_trivia_dir

    questions: list[str] = []
    for name in ("general", "artandliterature", "worldcapitals", "elements", "sports"):
        data = yaml.safe_load((red_trivia_dir() / f"{name}.yaml").read_text(encoding="utf-8"))
        questions += [q for q in data if isinstance(q, str) and q not in ("AUTHOR", "CONFIG", "DESCRIPTION")]
    return questions[:n]


@pytest.mark.slow
def test_bfloat16_retrieval_agrees_with_float32(default_kb):
    """Top-10 overlap of bf16 vs fp32 retrieval over 3,000 stored passages and 200 trivia questions."""
    index, store, _ = open_knowledge_base(default_kb)
    rows = np.linspace(0, len(store) - 1, 3000).astype(np.int64)
    texts = [passage_text(p.title, p.text) for p in store.get(rows)]
    questions = _trivia_questions(200)
    bf16 = load_encoder(EncoderConfig(dtype="bfloat16"))
    fp32 = load_encoder(EncoderConfig())
    top32, _ = brute_force(fp32.encode(questions), index.embeddings(rows), 10)
    top16, _ = brute_force(bf16.encode(questions), bf16.encode(texts), 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top32, top16, strict=True)])
    assert overlap >= 0.9, overlap


@pytest.mark.slow
def test_demo_answers_the_example_questions(default_kb, capsys):
    assert main(["demo", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert "Q: What is the capital of Angola?\n  1. [" in out and "] Angola: " in out
    assert "] Hamlet: " in out and "] Mount Everest: " in out
