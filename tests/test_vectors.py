"""Given embeddings (rag.vectors): .npy, Parquet and Arrow files matched to passages by id, and the
streamed index build from a file (on-disk inverted lists, bounded reads)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
from tiny_encoders import WORDS_PER_PASSAGE, tiny_sentence_transformers_dir, write_corpus

from rag.cli import main
from rag.config import CorpusConfig, EncoderConfig, GivenEmbeddings, IndexConfig
from rag.corpus import ReadReport, iter_passages
from rag.index import DenseIndex
from rag.knowledge import build_knowledge_base, open_knowledge_base
from rag.npy import open_matrix, read_rows, read_sample, write_matrix
from rag.vectors import EmbeddingsError

DIM = 32  # the tiny encoder's


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("given")
    encoder_dir = tiny_sentence_transformers_dir(root / "enc", seed=2)
    write_corpus(root / "docs.jsonl", docs=30, seed=4)
    corpus = CorpusConfig(source=str(root / "docs.jsonl"), words_per_passage=WORDS_PER_PASSAGE)
    ids = [p.id for p in iter_passages(corpus, ReadReport())]
    vectors = np.random.default_rng(0).standard_normal((len(ids), DIM)).astype(np.float32)
    return root, corpus, EncoderConfig(path=str(encoder_dir)), ids, vectors


def _table(ids: list[str], vectors: np.ndarray, fixed: bool) -> pa.Table:
    values = pa.array(vectors.reshape(-1), pa.float32())
    column = pa.FixedSizeListArray.from_arrays(values, vectors.shape[1]) if fixed else \
        pa.ListArray.from_arrays(pa.array(np.arange(0, vectors.size + 1, vectors.shape[1]), pa.int32()), values)  # fmt: skip
    return pa.table({"id": ids, "title": ["t"] * len(ids), "embeddings": column})


def _build(root, corpus, encoder, name, path, index=None, **given):
    out, index = root / name, index or IndexConfig()
    build_knowledge_base(corpus, encoder, index, out, progress=False, given=GivenEmbeddings(str(path), **given))
    return open_knowledge_base(out)


def test_npy_parquet_and_arrow_in_any_order_give_the_same_knowledge_base(setup):
    root, corpus, encoder, ids, vectors = setup
    np.save(root / "vec.npy", vectors)
    kb = _build(root, corpus, encoder, "kb-npy", root / "vec.npy")
    rows = np.arange(len(ids))
    np.testing.assert_array_equal(kb.index.embeddings(rows), vectors)
    assert kb.meta["given_embeddings"]["path"] == str(root / "vec.npy")

    shuffle = np.random.default_rng(1).permutation(len(ids))  # ids in another order than the corpus
    shuffled_ids = [ids[i] for i in shuffle]
    pq.write_table(_table(shuffled_ids, vectors[shuffle], fixed=False), root / "vec.parquet", row_group_size=7)
    with ipc.new_stream(str(root / "vec.arrow"), _table(ids, vectors, True).schema) as w:  # HF datasets' layout
        w.write_table(_table(shuffled_ids, vectors[shuffle], fixed=True), max_chunksize=5)
    with ipc.new_file(str(root / "vec.feather"), _table(ids, vectors, False).schema) as w:
        w.write_table(_table(ids, vectors, fixed=False))
    for name in ("vec.parquet", "vec.arrow", "vec.feather"):
        other = _build(root, corpus, encoder, f"kb-{name}", root / name)
        np.testing.assert_array_equal(other.index.embeddings(rows), vectors)
        assert other.passages.ids().to_pylist() == ids


def test_cli_build_with_given_embeddings_and_ondisk_ivf(setup, tmp_path, capsys):
    root, corpus, encoder, ids, vectors = setup
    big = np.random.default_rng(3).standard_normal((len(ids), DIM)).astype(np.float16)
    np.save(tmp_path / "vec16.npy", big)
    out = tmp_path / "kb"
    rc = main(["index", "build", "--corpus", corpus.source, "--words", str(WORDS_PER_PASSAGE), "--encoder",
               encoder.path, "--embeddings", str(tmp_path / "vec16.npy"), "--out", str(out), "--no-progress",
               "--index-type", "factory", "--factory", "IVF4,Flat", "--ondisk-lists"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "vectors given by" in text and "peak RSS" in text
    kb = open_knowledge_base(out)
    assert (out / "index" / "lists.ivfdata").is_file() and kb.index.config.ondisk_lists
    np.testing.assert_array_equal(kb.index.embeddings(np.arange(len(ids))), big.astype(np.float32))
    q = np.random.default_rng(4).standard_normal((3, DIM)).astype(np.float32)
    res = kb.index.with_search_params(nprobe=4).search(q, 5)  # every list probed: exact
    truth = np.argsort(-(q @ big.astype(np.float32).T), axis=1)[:, :5]
    np.testing.assert_array_equal(res.rows, truth)


@pytest.mark.parametrize("case", ["count", "dim", "dtype", "missing", "repeated", "null", "ragged", "column",
                                  "nan", "overflow"])  # fmt: skip
def test_every_mismatch_is_a_clear_error_naming_the_file(setup, tmp_path, case):
    root, corpus, encoder, ids, vectors = setup
    path = tmp_path / ("bad.npy" if case in ("count", "dim", "dtype", "nan", "overflow") else "bad.parquet")
    index = IndexConfig()
    if case == "count":
        np.save(path, vectors[:-1])
    elif case == "dim":
        np.save(path, vectors[:, :-1])
    elif case == "dtype":
        np.save(path, (vectors * 100).astype(np.int32))
    elif case == "nan":
        bad = vectors.copy()
        bad[3, 1] = np.nan
        np.save(path, bad.astype(np.float16))
        index = IndexConfig(store_dtype="float32")  # converted, so checked on the way
    elif case == "overflow":
        bad = vectors.copy()
        bad[5, 0] = 1e6  # finite in float32, infinite in float16
        np.save(path, bad)
        index = IndexConfig(store_dtype="float16")
    elif case == "missing":
        pq.write_table(_table(ids[:-1] + ["nope"], vectors, fixed=False), path)
    elif case == "repeated":
        pq.write_table(_table(ids[:-1] + [ids[0]], vectors, fixed=False), path)
    elif case == "null":
        table = _table(ids, vectors, fixed=False)
        column = table.column("embeddings").to_pylist()
        column[2] = None
        pq.write_table(table.set_column(2, "embeddings", pa.array(column, pa.list_(pa.float32()))), path)
    elif case == "ragged":
        column = [list(v) for v in vectors]
        column[4] = column[4][:-1]
        pq.write_table(pa.table({"id": ids, "embeddings": pa.array(column, pa.list_(pa.float32()))}), path)
    elif case == "column":
        pq.write_table(pa.table({"id": ids, "vec": pa.array([list(v) for v in vectors])}), path)
    message = {"count": "vectors, the corpus has", "dim": "vectors of dim", "dtype": "expected float32 or float16",
               "missing": "'nope'.*is not a passage", "repeated": "appears twice", "null": "row 2 is null",
               "ragged": "row 4 has 31 values", "column": "no vector column", "nan": "vector 3 .*not finite",
               "overflow": "vector 5 .*not finite as float16"}[case]  # fmt: skip
    with pytest.raises((EmbeddingsError, ValueError), match=message) as caught:
        _build(tmp_path, corpus, encoder, "kb", path, index=index)
    assert str(path) in str(caught.value)
    assert not (tmp_path / "kb").exists()


def test_npy_helpers_read_in_chunks_what_numpy_reads(tmp_path):
    x = np.random.default_rng(5).standard_normal((1001, 7)).astype(np.float32)
    write_matrix(tmp_path / "m.npy", (x[i : i + 300] for i in range(0, 1001, 300)), 1001, 7, np.float16)
    np.testing.assert_array_equal(np.load(tmp_path / "m.npy"), x.astype(np.float16))
    m = open_matrix(tmp_path / "m.npy")
    np.testing.assert_array_equal(read_rows(m, 998, 2000), x[998:].astype(np.float16))
    rows = np.array([0, 5, 640, 1000])
    np.testing.assert_array_equal(read_sample(m, rows), x[rows].astype(np.float16))
    (tmp_path / "short.npy").write_bytes((tmp_path / "m.npy").read_bytes()[:-10])
    with pytest.raises(ValueError, match="truncated"):
        open_matrix(tmp_path / "short.npy")


def test_ondisk_lists_search_like_in_memory_lists_and_resume_from_stages(tmp_path):
    rng = np.random.default_rng(6)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    q = rng.standard_normal((20, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x.astype(np.float16))
    config = IndexConfig(kind="ivfpq", ivf_lists=16, pq_subquantizers=4, nprobe=4, ondisk_block_rows=700)
    memory = DenseIndex.build_from_file(tmp_path / "x.npy", config, tmp_path / "mem")
    stages = tmp_path / "stages"
    ondisk_config = IndexConfig(**{**config.__dict__, "ondisk_lists": True})
    disk = DenseIndex.build_from_file(tmp_path / "x.npy", ondisk_config, tmp_path / "disk", stages)
    assert sorted(p.name for p in stages.iterdir()) == [f"block-{i:05d}.index" for i in range(5)] + ["timings.jsonl", "trained.index"]
    phases = [json.loads(line)["phase"] for line in (stages / "timings.jsonl").read_text().splitlines()]
    assert phases == ["train"] + ["add"] * 5 + ["merge"]
    a, b = memory.search(q, 10), disk.search(q, 10)
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores, b.scores)
    meta = json.loads((tmp_path / "disk" / "meta.json").read_text())
    assert set(meta["files"]) == {"embeddings.npy", "faiss.index", "lists.ivfdata", "trained.index"}
    # a rebuild finds the finished stages and reuses them (a block file that is there is not redone)
    block = stages / "block-00002.index"
    mtime = block.stat().st_mtime_ns
    again = DenseIndex.build_from_file(tmp_path / "x.npy", ondisk_config, tmp_path / "disk2", stages)
    assert block.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(again.search(q, 10).rows, a.rows)
    moved = tmp_path / "moved"
    (tmp_path / "disk").rename(moved)  # the lists file is found beside the index, wherever it goes
    np.testing.assert_array_equal(DenseIndex.load(moved).search(q, 10).rows, a.rows)
