"""DenseIndex against an independent numpy brute force (float64 scores, full argsort)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from rag.config import IndexConfig
from rag.index import DenseIndex, DenseIndexError, exact_search


def brute_topk(x: np.ndarray, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 scores, full argsort. Returns rows (B, K) and scores (B, K)."""
    scores = q.astype(np.float64) @ x.astype(np.float64).T  # (B, N)
    rows = np.argsort(-scores, axis=1)[:, :k]
    return rows, np.take_along_axis(scores, rows, 1)


def assert_same_topk(x: np.ndarray, q: np.ndarray, rows: np.ndarray, scores: np.ndarray, k: int) -> None:
    """Equal to the brute force up to ties: same sorted scores, and every row is a true top-k row."""
    ref_rows, ref_scores = brute_topk(x, q, k)
    assert rows.shape == scores.shape == (q.shape[0], k)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-4)
    true = np.take_along_axis(q.astype(np.float64) @ x.astype(np.float64).T, rows, 1)
    np.testing.assert_allclose(scores, true, rtol=1e-4, atol=1e-4)  # the score belongs to that row
    kth = ref_scores[:, -1:]
    assert (true >= kth - 1e-4).all()
    assert all(len(set(r)) == k for r in rows.tolist())
    exact = (np.abs(np.diff(ref_scores, axis=1)) > 1e-3).all(axis=1)  # rows with no near-ties
    assert (rows[exact] == ref_rows[exact]).all()


def clustered(n: int, d: int, centres: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points around random unit centres, unit-normalised, plus queries drawn the same way."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def draw(m: int) -> np.ndarray:
        v = (
            c[rng.integers(0, centres, m)]
            + 0.35 * rng.standard_normal((m, d)).astype(np.float32) / np.sqrt(d) * 3
        )
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(200)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


@pytest.mark.parametrize("n,b,k", [(1, 1, 1), (1000, 1, 10), (5003, 3, 7), (5003, 64, 50), (777, 130, 777)])
def test_flat_equals_brute_force(n: int, b: int, k: int) -> None:
    rng = np.random.default_rng(n + b + k)
    x = rng.standard_normal((n, 48)).astype(np.float32)
    q = rng.standard_normal((b, 48)).astype(np.float32)
    res = DenseIndex.build(x, IndexConfig(kind="flat")).search(q, k)
    assert_same_topk(x, q, res.rows, res.scores, k)


@pytest.mark.parametrize("b", [1, 5, 40])  # 40: blocked products with the fused top-k
@pytest.mark.parametrize("block", [1, 100, 256, 1000, 1024])
def test_blocked_search_n_not_multiple_of_block(b: int, block: int) -> None:
    rng = np.random.default_rng(block + b)
    x = rng.standard_normal((2500, 16)).astype(np.float32)  # 2500 = 2 * 1024 + 452
    q = rng.standard_normal((b, 16)).astype(np.float32)
    res = exact_search(x, q, 9, block_rows=block)
    assert_same_topk(x, q, res.rows, res.scores, 9)


def test_flat_float16_store_scores_use_stored_vectors() -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3000, 32)).astype(np.float32)
    q = rng.standard_normal((4, 32)).astype(np.float32)
    index = DenseIndex.build(x, IndexConfig(kind="flat", store_dtype="float16"))
    res = index.search(q, 5)
    assert_same_topk(x.astype(np.float16).astype(np.float32), q, res.rows, res.scores, 5)
    assert index.nbytes == 3000 * 32 * 2


@pytest.fixture(scope="module")
def clustered_data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, q = clustered(20_000, 64, 200, seed=0)
    truth, _ = brute_topk(x, q, 10)
    return x, q, truth


@pytest.mark.parametrize(
    "config",
    [
        IndexConfig(kind="hnsw", hnsw_m=16, hnsw_ef_construction=80, hnsw_ef_search=64),
        IndexConfig(kind="factory", factory="IVF64,Flat", nprobe=8),
    ],
    ids=["hnsw", "factory"],
)
def test_approximate_recall_at_10(clustered_data, config: IndexConfig) -> None:
    x, q, truth = clustered_data
    index = DenseIndex.build(x, config)
    res = index.search(q, 10)
    assert recall_at(res.rows, truth) >= 0.95
    # returned scores are the exact inner products with the stored vectors
    stored = index.embeddings(res.rows)  # (B, K, D)
    np.testing.assert_allclose(res.scores, np.einsum("bd,bkd->bk", q, stored), rtol=1e-4, atol=1e-4)
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()


def test_ivfpq_stores_float16_and_rerank_matters(clustered_data) -> None:
    x, q, truth = clustered_data
    config = IndexConfig(kind="ivfpq", ivf_lists=128, pq_subquantizers=8, nprobe=16, rerank_factor=1)
    index = DenseIndex.build(x, config)
    assert index.embeddings(np.arange(3)).dtype == np.float32
    np.testing.assert_array_equal(index.embeddings(np.arange(3)), x[:3].astype(np.float16).astype(np.float32))
    assert index.nbytes < x.nbytes  # float16 store + 8-byte codes beat the float32 matrix
    no_rerank = recall_at(index.search(q, 10).rows, truth)
    with_rerank = recall_at(index.with_search_params(rerank_factor=10).search(q, 10).rows, truth)
    assert with_rerank >= 0.95 and with_rerank > no_rerank
    narrow = index.with_search_params(nprobe=1, rerank_factor=10)  # a view must not retune the original
    assert recall_at(narrow.search(q, 10).rows, truth) < with_rerank
    assert recall_at(index.search(q, 10).rows, truth) == no_rerank


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip(tmp_path, kind: str) -> None:
    x, q = clustered(3000, 32, 20, seed=1)
    index = DenseIndex.build(x, IndexConfig(kind=kind, ivf_lists=16, pq_subquantizers=4))
    before = index.search(q, 5)
    index.save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx")
    after = loaded.search(q, 5)
    np.testing.assert_array_equal(before.rows, after.rows)
    np.testing.assert_array_equal(before.scores, after.scores)
    np.testing.assert_array_equal(loaded.embeddings(np.arange(len(x))), index.embeddings(np.arange(len(x))))
    assert isinstance(loaded._emb, np.memmap)
    assert (len(loaded), loaded.dim, loaded.nbytes) == (3000, 32, index.nbytes)
    assert loaded.config == index.config


def test_half_written_folder_is_refused(tmp_path) -> None:
    x, _ = clustered(500, 16, 5, seed=2)
    DenseIndex.build(x, IndexConfig()).save(tmp_path / "idx")
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "idx", broken)
    (broken / "meta.json").unlink()  # as if killed before meta.json was written
    with pytest.raises(DenseIndexError, match="no meta.json"):
        DenseIndex.load(broken)
    shutil.copytree(tmp_path / "idx", tmp_path / "trunc")
    with open(tmp_path / "trunc" / "embeddings.npy", "r+b") as f:
        f.truncate(1000)  # a meta.json that does not match its files
    with pytest.raises(DenseIndexError, match="embeddings.npy"):
        DenseIndex.load(tmp_path / "trunc")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "meta.json").write_text("{not json")
    with pytest.raises(DenseIndexError, match="not valid JSON"):
        DenseIndex.load(tmp_path / "bad")


def test_build_from_shards_streams_into_one_file(tmp_path) -> None:
    x, q = clustered(2500, 24, 10, seed=4)
    paths = []
    for i, (a, b) in enumerate([(0, 1000), (1000, 1001), (1001, 2500)]):
        paths.append(tmp_path / f"shard{i}.npy")
        np.save(paths[-1], x[a:b])
    index = DenseIndex.build_from_shards(paths, IndexConfig(kind="flat"), tmp_path / "idx")
    np.testing.assert_array_equal(index.embeddings(np.arange(2500)), x)
    res = index.search(q, 6)
    assert_same_topk(x, q, res.rows, res.scores, 6)
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text())
    assert meta["count"] == 2500 and meta["files"]["embeddings.npy"] > x.nbytes
    np.save(tmp_path / "odd.npy", np.zeros((3, 5), np.float32))
    with pytest.raises(DenseIndexError, match="disagree"):
        DenseIndex.build_from_shards([paths[0], tmp_path / "odd.npy"], IndexConfig(), tmp_path / "idx2")
    assert not (tmp_path / "idx2").exists()


def test_embeddings_returns_stored_vectors_in_any_shape() -> None:
    x = np.random.default_rng(5).standard_normal((100, 8)).astype(np.float32)
    index = DenseIndex.build(x, IndexConfig())
    rows = np.array([[3, 99], [0, 3]])
    np.testing.assert_array_equal(index.embeddings(rows), x[rows])
    assert index.embeddings(rows).shape == (2, 2, 8)
    with pytest.raises(DenseIndexError, match="rows must lie"):
        index.embeddings(np.array([100]))
    with pytest.raises(DenseIndexError, match="integers"):
        index.embeddings(np.array([1.0]))


def test_bad_k_and_dim_mismatch() -> None:
    x = np.random.default_rng(6).standard_normal((50, 8)).astype(np.float32)
    index = DenseIndex.build(x, IndexConfig())
    q = np.ones((2, 8), np.float32)
    for bad in (0, -1, 51, 2.5, True):
        with pytest.raises(DenseIndexError, match="k must be"):
            index.search(q, bad)  # type: ignore[arg-type]
    with pytest.raises(DenseIndexError, match=r"shape \(B, 8\)"):
        index.search(np.ones((2, 7), np.float32), 3)
    with pytest.raises(DenseIndexError, match=r"shape \(B, 8\)"):
        index.search(np.ones(8, np.float32), 3)
    with pytest.raises(DenseIndexError, match="non-empty"):
        DenseIndex.build(np.zeros((0, 8), np.float32), IndexConfig())
    with pytest.raises(DenseIndexError, match="factory"):
        DenseIndex.build(x, IndexConfig(kind="factory"))
    with pytest.raises(DenseIndexError, match="at least 256"):
        DenseIndex.build(x, IndexConfig(kind="ivfpq"))


def test_flat_with_ties_and_adversarial_order() -> None:
    """Duplicated rows (exact ties) and rows sorted by score (all winners in the last chunk)."""
    rng = np.random.default_rng(7)
    base = rng.standard_normal((400, 12)).astype(np.float32)
    q = rng.standard_normal((3, 12)).astype(np.float32)
    dup = np.repeat(base, 3, axis=0)  # every score appears 3 times
    res = DenseIndex.build(dup, IndexConfig()).search(q, 10)
    assert_same_topk(dup, q, res.rows, res.scores, 10)
    ordered = base[np.argsort(base @ q[0])]  # ascending scores for query 0
    res = DenseIndex.build(ordered, IndexConfig()).search(q, 20)
    assert_same_topk(ordered, q, res.rows, res.scores, 20)
    assert set(res.rows[0]) == set(range(380, 400))


def test_fused_topk_with_ties_winners_in_the_last_block_and_float16() -> None:
    """The batched path: exact ties across blocks go to the lower row; winners sorted to the end of the
    matrix (the threshold must rise late); a float16 store is scored from its stored values."""
    rng = np.random.default_rng(9)
    base = rng.standard_normal((3000, 24)).astype(np.float32)
    q = rng.standard_normal((33, 24)).astype(np.float32)
    dup = np.concatenate([base, base])  # row i and i + 3000 tie exactly
    res = exact_search(dup, q, 12, block_rows=700, query_chunk=16)
    assert_same_topk(dup, q, res.rows, res.scores, 12)
    assert (res.rows[:, 0] < 3000).all()  # the first copy wins every tie
    ordered = base[np.argsort(base @ q[0])]
    res = exact_search(ordered, q, 15, block_rows=512)
    assert set(res.rows[0]) == set(range(2985, 3000))
    half = base.astype(np.float16)
    res = exact_search(half, q, 5, block_rows=1024)
    assert_same_topk(half.astype(np.float32), q, res.rows, res.scores, 5)


def test_nan_embeddings_are_reported() -> None:
    x = np.random.default_rng(8).standard_normal((200, 4)).astype(np.float32)
    x[5] = np.nan
    with pytest.raises(DenseIndexError, match="NaN"):
        DenseIndex.build(x, IndexConfig()).search(np.ones((2, 4), np.float32), 3)


@pytest.mark.parametrize(
    "config",
    [IndexConfig(kind="flat"), IndexConfig(kind="hnsw", hnsw_m=16),
     IndexConfig(kind="ivfpq", ivf_lists=32, pq_subquantizers=8, nprobe=32, rerank_factor=300),
     IndexConfig(kind="factory", factory="IVF16,Flat", nprobe=16)],
    ids=["flat", "hnsw", "ivfpq", "factory"],
)  # fmt: skip
def test_live_mask_searches_as_if_the_dead_rows_were_removed(config: IndexConfig) -> None:
    x, q = clustered(3000, 32, 20, seed=9)
    live = np.random.default_rng(9).random(3000) > 0.3
    live[np.argsort(-(q @ x.T), axis=1)[:, :3].reshape(-1)] = False  # the true winners are deleted
    index = DenseIndex.build(x, config)
    res = index.search(q, 10, live=live)
    assert live[res.rows].all()
    kept = np.flatnonzero(live)
    if config.kind in ("flat", "ivfpq", "factory"):  # exhaustive here (every list probed): exact
        stored = index.embeddings(np.arange(3000))  # float16 for ivfpq: the reference scores those
        ref = DenseIndex.build(stored[kept], IndexConfig(kind="flat")).search(q, 10)
        np.testing.assert_array_equal(res.rows, kept[ref.rows])
        np.testing.assert_allclose(res.scores, ref.scores, rtol=1e-3, atol=1e-3)
    else:
        truth, _ = brute_topk(x[kept], q, 10)
        assert recall_at(res.rows, kept[truth]) >= 0.95
    with pytest.raises(DenseIndexError, match=r"k must be an int in \[1, 2\]"):
        index.search(q, 3, live=np.arange(3000) < 2)


def test_flat_live_mask_with_fewer_live_rows_than_a_block() -> None:
    x = np.random.default_rng(10).standard_normal((5000, 8)).astype(np.float32)
    q = np.random.default_rng(11).standard_normal((12, 8)).astype(np.float32)
    live = np.zeros(5000, bool)
    live[[7, 4999, 2500]] = True
    for b in (1, 4, 12):  # 12: the fused path
        res = exact_search(x, q[:b], 3, block_rows=1024, live=live)
        assert sorted(res.rows[0].tolist()) == [7, 2500, 4999]
        assert np.isfinite(res.scores).all()


def _inverted_lists(index) -> dict[int, tuple[int, np.ndarray]]:
    """id -> (list number, PQ code) of every entry of an IVF index."""
    import faiss

    out = {}
    for lst in range(index.nlist):
        size = index.invlists.list_size(lst)
        if size:
            ids = faiss.rev_swig_ptr(index.invlists.get_ids(lst), size).copy()
            codes = faiss.rev_swig_ptr(index.invlists.get_codes(lst), size * index.code_size).reshape(size, -1)
            out.update({int(i): (lst, c.copy()) for i, c in zip(ids, codes, strict=True)})
    return out


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_add_rows_assigns_and_encodes_as_faiss_does(metric: str) -> None:
    """add_rows' numpy list assignment and PQ encoding give the lists and codes of FAISS's own add,
    but where two sub-centroids are equally near the residual to float32 rounding."""
    import faiss

    from rag.index import add_rows

    x, _ = clustered(3000, 32, 20, seed=11)
    x = x * np.random.default_rng(12).uniform(0.5, 2.0, (len(x), 1)).astype(np.float32)  # norms differ: L2 != IP
    kind = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    trained = faiss.index_factory(32, "IVF16,PQ8x8", kind)
    trained.train(x)
    ours, theirs = faiss.clone_index(trained), faiss.clone_index(trained)
    ids = np.arange(1000, 1000 + len(x), dtype=np.int64)
    add_rows(ours, x[:1234], ids[:1234])
    add_rows(ours, x[1234:], ids[1234:])
    theirs.add_with_ids(x, ids)
    assert ours.ntotal == theirs.ntotal == len(x)
    got, want = _inverted_lists(ours), _inverted_lists(theirs)
    assert got.keys() == want.keys() == set(ids.tolist())
    assert all(got[i][0] == want[i][0] for i in want)  # the same list for every row
    centroids = faiss.downcast_index(theirs.quantizer).reconstruct_n(0, 16).astype(np.float64)
    books = faiss.vector_to_array(theirs.pq.centroids).reshape(8, 256, 4).astype(np.float64)
    differing = 0
    for row, key in enumerate(ids.tolist()):
        residual = (x[row] - centroids[want[key][0]]).reshape(8, 4)
        for m in np.flatnonzero(got[key][1] != want[key][1]):
            near = ((residual[m] - books[m, [got[key][1][m], want[key][1][m]]]) ** 2).sum(1)  # (2,)
            assert abs(near[0] - near[1]) <= 1e-5 * max(near.max(), 1e-12), (key, m, near)
            differing += 1
    assert differing <= 0.001 * len(x) * 8
    ours.nprobe = theirs.nprobe = 4
    np.testing.assert_array_equal(ours.search(x[:50], 5)[1], theirs.search(x[:50], 5)[1])
