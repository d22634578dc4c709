"""BM25 (rag.bm25, on bm25s) and hybrid retrieval (rag.fusion, rag.retriever): scores against bm25s used
directly and against the Lucene BM25 formula written out; fusion against rankings worked by hand; the
on-disk round trip inside a knowledge base; bad queries; RagModel with BM25 (frozen prior) and hybrid."""

from __future__ import annotations

import json
import math
from collections import Counter

import bm25s
import numpy as np
import pytest
import Stemmer
import torch
from tiny_encoders import tiny_sentence_transformers_dir, word_encoder, word_retriever
from tiny_generators import tiny_generator

from rag.bm25 import BM25_DIR, BM25Index, BM25QueryError, build_bm25_index, open_bm25_index
from rag.cli import main
from rag.config import BM25Config, CorpusConfig, EncoderConfig, FusionConfig, IndexConfig, RetrieverConfig
from rag.corpus import Passage
from rag.encoders import passage_text
from rag.fusion import Candidates, choose_fusion, fuse, minmax, rrf_scores, union_candidates
from rag.knowledge import build_knowledge_base
from rag.manifest import write_manifest
from rag.model import RagModel
from rag.retriever import BM25Retriever, HybridRetriever, open_retriever
from rag.store import PassageStore
from rag.training import TrainConfig, make_optimizer

PASSAGES = [
    Passage("p0", "Angola", "Luanda is the capital city of Angola in Africa"),
    Passage("p1", "France", "Paris is the capital and largest city of France"),
    Passage("p2", "Congo River", "The Congo is the deepest river in the world and a river of Africa"),
    Passage("p3", "Cats", "The cat sat on the mat while the other cats were sleeping"),
    Passage("p4", "Portugal", "Lisbon is the capital of Portugal, a country beside the Atlantic"),
    Passage("p5", "Rivers", "Rivers flow into seas; the Nile is a long river"),
]
TEXTS = [passage_text(p.title, p.text) for p in PASSAGES]
QUERIES = ["What is the capital of Angola?", "the longest rivers of Africa", "sleeping cats"]


# ---------------------------------------------------------------------- scores: bm25s and by hand


def test_scores_equal_bm25s_own_retrieval_and_the_lucene_formula():
    index = BM25Index.build(TEXTS)
    rows, scores = index.search(QUERIES, k=len(TEXTS))

    # bm25s used directly, as its README does (same tokenisation settings)
    stemmer = Stemmer.Stemmer("english")
    model = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    model.index(bm25s.tokenize(TEXTS, stopwords="en", stemmer=stemmer, show_progress=False), show_progress=False)
    query_tokens = bm25s.tokenize(QUERIES, stopwords="en", stemmer=stemmer, show_progress=False)
    theirs_rows, theirs_scores = model.retrieve(query_tokens, k=len(TEXTS), show_progress=False)
    np.testing.assert_allclose(scores, theirs_scores, rtol=1e-6)
    positive = scores > 0  # rows of equal (zero) score may come in any order
    np.testing.assert_array_equal(rows[positive], theirs_rows[positive])

    # Lucene's BM25 written out: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    # tf part = tf / (tf + k1 (1 - b + b |d| / avgdl)), summed over the query's terms
    terms = bm25s.tokenize(TEXTS, stopwords="en", stemmer=stemmer, return_ids=False, show_progress=False)
    avgdl = sum(len(t) for t in terms) / len(terms)
    df = Counter(w for t in terms for w in set(t))
    want = np.zeros((len(QUERIES), len(TEXTS)))
    for q, query in enumerate(bm25s.tokenize(QUERIES, stopwords="en", stemmer=stemmer, return_ids=False,
                                             show_progress=False)):  # fmt: skip
        for d, doc in enumerate(terms):
            tf = Counter(doc)
            for w in query:
                if tf[w]:
                    idf = math.log(1 + (len(terms) - df[w] + 0.5) / (df[w] + 0.5))
                    want[q, d] += idf * tf[w] / (tf[w] + 1.5 * (1 - 0.75 + 0.75 * len(doc) / avgdl))
    np.testing.assert_allclose(np.take_along_axis(want, rows, 1), scores, rtol=1e-5)
    assert rows[0, 0] == 0 and rows[2, 0] == 3  # Angola's passage; the cats


def test_bad_queries_are_named_with_the_reason():
    index = BM25Index.build(TEXTS)
    with pytest.raises(BM25QueryError, match=r"query 1 \('the of and'\): it has only stop words"):
        index.search(["capital", "the of and"], 2)
    with pytest.raises(BM25QueryError, match="none of its words occurs in the knowledge base"):
        index.search(["xylophone zebra"], 2)
    with pytest.raises(BM25QueryError, match="empty"):
        index.search(["  "], 2)
    with pytest.raises(ValueError, match="k must be in 1..6"):
        index.search(["capital"], 7)
    with pytest.raises(ValueError, match="no texts"):
        BM25Index.build([])
    with pytest.raises(ValueError, match="not a PyStemmer language"):
        BM25Index.build(TEXTS, BM25Config(stemmer="klingon"))


# ---------------------------------------------------------------------- fusion by hand


def test_reciprocal_rank_fusion_worked_by_hand():
    # dense ranks passages 7, 3, 5; BM25 ranks 3, 9 (and 8 with score 0: not ranked)
    rows, d_rank, b_rank = union_candidates(np.array([[7, 3, 5]]), np.array([[3, 9, 8]]),
                                            np.array([[True, True, False]]))  # fmt: skip
    np.testing.assert_array_equal(rows, [[7, 3, 5, 9, -1, -1]])
    np.testing.assert_array_equal(d_rank, [[1, 2, 3, 0, 0, 0]])
    np.testing.assert_array_equal(b_rank, [[0, 1, 0, 2, 0, 0]])
    fused = rrf_scores(d_rank, b_rank, weight=0.5, rrf_k=60)
    # 7: .5/61; 3: .5/62 + .5/61; 5: .5/63; 9: .5/62
    np.testing.assert_allclose(fused[0, :4], [0.5 / 61, 0.5 / 62 + 0.5 / 61, 0.5 / 63, 0.5 / 62])
    cands = Candidates(rows, np.zeros((1, 6), np.float32), np.zeros((1, 6), np.float32), d_rank, b_rank)
    order = fuse(cands, FusionConfig("rrf", 0.5, 60), k=4)
    np.testing.assert_array_equal(rows[0, order[0]], [3, 7, 9, 5])  # 7 (.5/61) > 9 (.5/62) > 5 (.5/63)
    # all weight on BM25: the BM25 list, then the rest in dense order (ties keep the candidate order)
    np.testing.assert_array_equal(rows[0, fuse(cands, FusionConfig("rrf", 0.0, 60), k=4)[0]], [3, 9, 7, 5])


def test_score_interpolation_worked_by_hand():
    rows = np.array([[4, 1, 2]])
    dense = np.array([[0.9, 0.5, 0.7]], np.float32)  # minmax: 1, 0, .5
    bm25 = np.array([[2.0, 10.0, 6.0]], np.float32)  # minmax: 0, 1, .5
    valid = rows >= 0
    np.testing.assert_allclose(minmax(dense, valid), [[1.0, 0.0, 0.5]], atol=1e-6)
    cands = Candidates(rows, dense, bm25, np.array([[1, 3, 2]]), np.array([[3, 1, 2]]))
    # w = .8: 4 -> .8, 1 -> .2, 2 -> .5 ; w = .2: 4 -> .2, 1 -> .8, 2 -> .5
    np.testing.assert_array_equal(rows[0, fuse(cands, FusionConfig("interpolation", 0.8), 3)[0]], [4, 2, 1])
    np.testing.assert_array_equal(rows[0, fuse(cands, FusionConfig("interpolation", 0.2), 3)[0]], [1, 2, 4])


def test_choose_fusion_picks_the_weight_that_finds_the_relevant_passages():
    # question 0's answer is BM25's first (dense's last); question 1's is dense's first (BM25's last)
    rows = np.array([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]])
    d_rank = np.array([[1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]])
    b_rank = np.array([[6, 2, 3, 4, 5, 1], [6, 2, 3, 4, 5, 1]])
    cands = Candidates(rows, -d_rank.astype(np.float32), -b_rank.astype(np.float32), d_rank, b_rank)
    relevant = np.array([[0, 0, 0, 0, 0, 1], [1, 0, 0, 0, 0, 0]], dtype=bool)
    config, tried = choose_fusion(cands, relevant, k=1)
    assert len(tried) == 42
    best = {(t["method"], t["weight"]): t["recall_at_1"] for t in tried}
    assert best[("rrf", 1.0)] == best[("rrf", 0.0)] == 0.5  # either list alone finds one of the two
    assert best[(config.method, config.weight)] == max(best.values())


# ---------------------------------------------------------------------- inside a knowledge base


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("bm25kb")
    docs = root / "docs.jsonl"
    docs.write_text("".join(json.dumps({"title": p.title, "text": p.text}) + "\n" for p in PASSAGES), encoding="utf-8")
    encoder_dir = tiny_sentence_transformers_dir(root / "enc", seed=3)
    build_knowledge_base(CorpusConfig(source=str(docs)), EncoderConfig(path=str(encoder_dir)), IndexConfig(),
                         root / "kb", progress=False)  # fmt: skip
    build_bm25_index(root / "kb")
    return root / "kb"


def test_round_trip_on_disk_memory_mapped_without_pickle(kb):
    files = sorted(p.name for p in (kb / BM25_DIR).iterdir())
    assert files == ["bm25.json", "data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy",
                     "params.index.json", "vocab.index.json"]  # fmt: skip
    for name in files:
        if name.endswith(".npy"):
            np.load(kb / BM25_DIR / name, allow_pickle=False)  # plain arrays: no object (pickled) dtype
    loaded = open_bm25_index(kb)
    assert isinstance(loaded.model.scores["data"], np.memmap)
    fresh = BM25Index.build(TEXTS)
    got, want = loaded.search(QUERIES, 4), fresh.search(QUERIES, 4)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    retrieved = BM25Retriever.open(kb, temperature=2.0).retrieve(QUERIES, 3)
    assert retrieved.titles[0][0] == "Angola" and retrieved.titles[2][0] == "Cats"
    torch.testing.assert_close(retrieved.scores, torch.from_numpy(want[1][:, :3] / 2.0))
    assert retrieved.embeddings.shape == (3, 3, 0) and retrieved.query_weight == 0.0


def test_a_rebuilt_knowledge_base_makes_the_bm25_index_stale(kb, tmp_path):
    import shutil

    copy = tmp_path / "kb"
    shutil.copytree(kb, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps({**meta, "fingerprint": "another build"}))
    write_manifest(copy)  # as a rebuild records its files (an edit alone is an integrity error: test_integrity)
    with pytest.raises(ValueError, match="another build of this knowledge base"):
        open_bm25_index(copy)
    shutil.rmtree(copy / BM25_DIR)
    write_manifest(copy)
    with pytest.raises(FileNotFoundError, match="rag index build --retriever bm25"):
        BM25Retriever.open(copy, build=False)


def test_bad_questions_to_the_retrievers(kb):
    with pytest.raises(ValueError, match="question 1 is empty"):
        BM25Retriever.open(kb).retrieve(["capital", ""], 2)
    with pytest.raises(BM25QueryError, match="only stop words"):
        open_retriever(kb, RetrieverConfig(kind="bm25")).retrieve(["is it the"], 2)
    # hybrid: a question BM25 cannot score is ranked by the dense side alone
    hybrid = HybridRetriever.open(kb, fusion=FusionConfig("rrf", 0.5, depth=3))
    dense = open_retriever(kb, RetrieverConfig(kind="dense"))
    np.testing.assert_array_equal(hybrid.retrieve(["of the"], 3).rows, dense.retrieve(["of the"], 3).rows)
    with pytest.raises(ValueError, match="FusionConfig.weight must be >= 0 and <= 1"):
        HybridRetriever(dense, hybrid.bm25, FusionConfig(weight=1.5))


def _scaled(scores: dict[int, float], row: int) -> float:
    low, high = min(scores.values()), max(scores.values())
    return (scores[row] - low) / (high - low) if high > low else 0.0


def _fused_by_hand(method: str, row: int, dense: dict[int, float], bm25: dict[int, float],
                   dense_rank: dict[int, int], bm25_rank: dict[int, int]) -> float:  # fmt: skip
    """Dense weight 0.3, rrf_k 60; min-max over all passages (depth >= N)."""
    if method == "rrf":
        return 0.3 / (60 + dense_rank[row]) + (0.7 / (60 + bm25_rank[row]) if row in bm25_rank else 0.0)
    return 0.3 * _scaled(dense, row) + 0.7 * _scaled(bm25, row)


@pytest.mark.parametrize("method", ["rrf", "interpolation"])
def test_hybrid_equals_fusion_of_the_full_rankings(kb, method):
    """With depth >= N both lists are complete: the fused top k is the fusion of the full rankings."""
    hybrid = HybridRetriever.open(kb, fusion=FusionConfig(method, 0.3, depth=len(PASSAGES)), temperature=2.0)
    dense = open_retriever(kb, RetrieverConfig(kind="dense")).retrieve(QUERIES, len(PASSAGES))
    bm25_rows, bm25_scores = hybrid.bm25.search(QUERIES, len(PASSAGES))
    got = hybrid.retrieve(QUERIES, 4)
    for b in range(len(QUERIES)):
        d_score = dict(zip(dense.rows[b].tolist(), dense.scores[b].tolist(), strict=True))
        b_score = dict(zip(bm25_rows[b].tolist(), bm25_scores[b].tolist(), strict=True))
        d_rank = {r: i + 1 for i, r in enumerate(dense.rows[b].tolist())}
        b_rank = {r: i + 1 for i, r in enumerate(bm25_rows[b].tolist()) if b_score[r] > 0}
        fused = {r: _fused_by_hand(method, r, d_score, b_score, d_rank, b_rank) for r in range(len(PASSAGES))}
        want = sorted(fused.values(), reverse=True)[:4]
        assert [fused[r] for r in got.rows[b].tolist()] == pytest.approx(want)
        np.testing.assert_allclose(got.ranking_scores[b].numpy(), want, rtol=1e-5, atol=1e-5)  # what orders the list
        # the logits of p(z|x): 0.3 q(x).d(z) + 0.7 BM25 / 2
        logits = [0.3 * d_score[r] + 0.7 * b_score[r] / 2.0 for r in got.rows[b].tolist()]
        np.testing.assert_allclose(got.scores[b].numpy(), logits, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(got.fixed_logits[b].numpy(), [0.7 * b_score[r] / 2.0 for r in got.rows[b]],
                                   rtol=1e-5)  # fmt: skip


def test_cli_build_search_hybrid_and_info(kb, tmp_path, capsys):
    import shutil

    copy = tmp_path / "kb"
    shutil.copytree(kb, copy)
    shutil.rmtree(copy / BM25_DIR)
    assert main(["index", "build", "--retriever", "bm25", "--out", str(copy), "--no-progress"]) == 0
    assert "6 passages" in capsys.readouterr().out
    assert main(["search", "--index", str(copy), "capital of Portugal", "-k", "2", "--retriever", "bm25", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["title"] == "Portugal" and hit["rank"] == 1
    assert main(["search", "--index", str(copy), "the of", "--retriever", "bm25"]) == 2
    assert "only stop words" in capsys.readouterr().err
    questions = tmp_path / "q.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answer": [a]}) + "\n" for q, a in
                                 [("capital of Angola", "Luanda"), ("capital of France", "Paris")] * 3))  # fmt: skip
    assert main(["index", "hybrid", "--index", str(copy), "--task", "nq-open", "--data", str(questions), "-k", "1"]) == 0
    stored = json.loads((copy / "hybrid.json").read_text())
    assert stored["chosen_on"]["questions"] == 5 and stored["chosen_on"]["part"] == "dev"  # 6 less the 5th
    assert HybridRetriever.open(copy).fusion == FusionConfig(**stored["config"])
    assert main(["index", "info", "--index", str(copy)]) == 0
    assert "chosen on 5 questions of nq-open" in capsys.readouterr().out


# ---------------------------------------------------------------------- RAG with BM25 and hybrid


@pytest.fixture(scope="module")
def word_kb(tmp_path_factory):
    words = [Passage(p.id, p.title.lower(), p.text.lower().replace(",", " ").replace(";", " ")) for p in PASSAGES]
    query_encoder = word_encoder(1)
    path = tmp_path_factory.mktemp("wordkb") / "passages.arrow"
    _, dense = word_retriever(words, path, query_encoder, word_encoder(2))
    bm25 = BM25Index.build([passage_text(p.title, p.text) for p in words])
    return query_encoder, dense, BM25Retriever(bm25, PassageStore.open(path), temperature=0.5), bm25


QUESTIONS = ["what is the capital of angola ?", "where is the river ?"]
TARGETS = ["luanda", "africa"]


def test_rag_with_bm25_has_a_frozen_prior_and_trains_only_the_generator(word_kb):
    query_encoder, _, bm25, _ = word_kb
    model = RagModel(query_encoder, bm25, tiny_generator("bart"), "token", k=3)
    out = model(QUESTIONS, TARGETS)
    want = bm25.retrieve(QUESTIONS, 3).scores  # BM25 / 0.5
    torch.testing.assert_close(out.doc_logprior, torch.log_softmax(want, 1))
    assert not out.doc_logprior.requires_grad
    out.loss.backward()
    assert all(p.grad is None for p in model.query_encoder.parameters())
    assert sum(p.grad.abs().sum() for p in model.generator.parameters() if p.grad is not None) > 0
    optimizer, _ = make_optimizer(model, TrainConfig())
    assert len(optimizer.param_groups) == 1  # the generator's
    assert not any(p.requires_grad for p in model.query_encoder.parameters())
    model.query_encoder.requires_grad_(True)


def test_rag_with_hybrid_trains_q_through_its_share_of_the_prior(word_kb):
    query_encoder, dense, _, bm25 = word_kb
    hybrid = HybridRetriever(dense, bm25, FusionConfig("rrf", 0.25, depth=6), temperature=0.5)
    model = RagModel(query_encoder, hybrid, tiny_generator("bart"), "sequence", k=3)
    model.zero_grad()
    out = model(QUESTIONS, TARGETS)
    retrieved = hybrid.retrieve(QUESTIONS, 3)
    torch.testing.assert_close(out.doc_logprior, torch.log_softmax(retrieved.scores, 1), atol=1e-5, rtol=0)
    out.loss.backward()
    assert sum(p.grad.abs().sum() for p in model.query_encoder.parameters() if p.grad is not None) > 0


def test_cli_eval_and_ask_with_bm25(kb, tmp_path, capsys):
    """rag eval and rag ask take --retriever: the prior is softmax(BM25 / T) over the top k, and a run
    folder remembers its retriever (resuming it with another one is refused)."""
    from tiny_generators import tiny_bart

    gen = tiny_bart(seed=6)
    gen.model.save_pretrained(tmp_path / "gen")
    gen.tokenizer.save_pretrained(tmp_path / "gen")
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": ["Luanda"]}) + "\n" for q in QUERIES))
    common = ["eval", "--task", "nq-open", "--data", str(data), "--index", str(kb), "--out", str(tmp_path / "out"),
              "--no-progress", "--max-new-tokens", "3", "--generator", str(tmp_path / "gen"), "-k", "2"]  # fmt: skip
    assert main([*common, "--retriever", "bm25", "--bm25-temperature", "2"]) == 0
    records = [json.loads(line) for line in (tmp_path / "out" / "rag-token-k2" / "predictions.jsonl").open()]
    _, want = BM25Index.load(kb / BM25_DIR).search(QUERIES, 2)
    for record, scores in zip(records, want, strict=True):
        np.testing.assert_allclose([r["score"] for r in record["retrieved"][:2]], scores / 2, rtol=1e-5)
        np.testing.assert_allclose(record["doc_prior"], torch.softmax(torch.tensor(scores / 2), 0).numpy(), atol=1e-5)
    assert json.loads((tmp_path / "out" / "rag-token-k2" / "run.json").read_text())["retriever"]["kind"] == "bm25"
    capsys.readouterr()
    assert main([*common, "--retriever", "dense"]) == 2
    assert "different run" in capsys.readouterr().err
    ask = ["ask", "--index", str(kb), "--generator", str(tmp_path / "gen"), "--retriever", "bm25", "-k", "2",
           "--max-new-tokens", "3", "--json", "capital of Portugal"]  # fmt: skip
    assert main(ask) == 0
    answer = json.loads(capsys.readouterr().out)
    assert answer["passages"][0]["title"] == "Portugal"
    assert sum(p["prior"] for p in answer["passages"]) == pytest.approx(1.0, abs=1e-5)
