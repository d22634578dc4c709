"""Sharded knowledge bases searched in one process (rag.shards, rag.sharding): the exact merge of the
shards' top-k equals one index over all passages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_encoders import WORDS_PER_PASSAGE, tiny_knowledge_base

from rag.cli import main
from rag.config import IndexConfig
from rag.index import DenseIndex
from rag.knowledge import open_knowledge_base
from rag.manifest import IntegrityError
from rag.retriever import Retriever
from rag.sharding import shard_bounds, shard_knowledge_base
from rag.shards import PartedIndex, PartedPassages, RowSpace
from rag.store import PassageStore, write_passage_store

QUESTIONS = ["what is the capital of angola?", "the largest river", "where is luanda", "congo", "city"]


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    kb, encoder_dir, corpus, _ = tiny_knowledge_base(root, encoder_seed=7, corpus_seed=3)
    return root, kb, encoder_dir, corpus


def _same_retrieval(a: Retriever, b: Retriever, k: int) -> None:
    x, y = a.retrieve(QUESTIONS, k), b.retrieve(QUESTIONS, k)
    assert x.ids == y.ids and x.texts == y.texts and x.titles == y.titles
    np.testing.assert_array_equal(x.rows, y.rows)
    np.testing.assert_array_equal(x.scores.numpy(), y.scores.numpy())  # identical, not close
    np.testing.assert_array_equal(x.embeddings.numpy(), y.embeddings.numpy())


@pytest.mark.parametrize("shards", [2, 3, 7])
def test_sharded_search_equals_the_unsharded_index(kb, shards):
    root, kb_dir, encoder_dir, _ = kb
    out = root / f"sharded-{shards}"
    info = shard_knowledge_base(kb_dir, shards, out)
    whole = open_knowledge_base(kb_dir)
    assert info.rows_per_shard == [hi - lo for lo, hi in shard_bounds(len(whole.index), shards)]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["manifest.json", "meta.json"] + [
        f"shard-{i:03d}" for i in range(shards)]  # fmt: skip
    parted = open_knowledge_base(out)
    assert isinstance(parted.index, PartedIndex) and len(parted.index) == len(whole.index)
    assert parted.passages.ids().to_pylist() == whole.passages.ids().to_pylist()
    one = Retriever.open(kb_dir)
    _same_retrieval(one, Retriever.open(out, query_encoder=one.query_encoder), k=10)
    _same_retrieval(one, Retriever.open(out, query_encoder=one.query_encoder), k=len(whole.index))
    # each shard is a knowledge base of its own slice
    first = open_knowledge_base(out / "shard-001")
    lo = first.meta["shard"]["first_row"]
    assert first.passages.ids().to_pylist() == whole.passages.ids().to_pylist()[lo : lo + len(first.index)]


def test_cli_build_with_shards_and_shard_command(kb, tmp_path, capsys):
    root, kb_dir, encoder_dir, corpus = kb
    out = tmp_path / "kb"
    rc = main(["index", "build", "--corpus", corpus.source, "--words", str(WORDS_PER_PASSAGE), "--encoder",
               str(encoder_dir), "--dtype", "float32", "--shards", "2", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert "2 shards" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]  # the unsharded build is gone
    one = Retriever.open(kb_dir)
    _same_retrieval(one, Retriever.open(out, query_encoder=one.query_encoder), k=5)
    assert main(["index", "shard", "--index", str(out), "--shards", "2", "--out", str(tmp_path / "again")]) == 2
    assert "already sharded" in capsys.readouterr().err
    assert main(["index", "shard", "--index", str(kb_dir), "--shards", "1000", "--out", str(tmp_path / "x")]) == 2
    assert "--shards must be in [1," in capsys.readouterr().err
    assert main(["index", "info", "--index", str(out), "--json"]) == 0
    capsys.readouterr()
    # the top manifest covers its own files and each shard's manifest; `verify` checks every shard too
    assert main(["index", "verify", "--index", str(out)]) == 0
    top = len(json.loads((out / "manifest.json").read_text())["files"])
    assert f"ok: {top + 2 * len(json.loads((out / 'shard-000' / 'manifest.json').read_text())['files'])} files" \
        in capsys.readouterr().out  # shard-000 and shard-001 have the same files
    (out / "shard-001" / "passages.arrow").write_bytes((out / "shard-000" / "passages.arrow").read_bytes())
    with pytest.raises(IntegrityError, match="shard-001"):
        open_knowledge_base(out)  # a shard's file swapped: caught when the shard is opened


@pytest.mark.parametrize("seed", range(4))
def test_parted_index_with_live_masks_equals_one_index_over_the_live_rows(tmp_path, seed):
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 60, size=int(rng.integers(1, 5)))
    dim = 6
    data = [rng.standard_normal((n, dim)).astype(np.float32) for n in sizes]
    live = [rng.random(n) > 0.3 if rng.random() > 0.3 else None for n in sizes]
    live = [None if m is not None and not m.any() and len(m) == 1 else m for m in live]
    parts = [DenseIndex.build(x, IndexConfig()) for x in data]
    parted = PartedIndex(parts, live)
    kept = np.concatenate([x if m is None else x[m] for x, m in zip(data, live, strict=True)])
    assert len(parted) == len(kept)
    if len(kept) == 0:
        return
    one = DenseIndex.build(kept, IndexConfig())
    q = rng.standard_normal((7, dim)).astype(np.float32)
    for k in sorted({1, min(5, len(kept)), len(kept)}):
        a, b = parted.search(q, k), one.search(q, k)
        np.testing.assert_array_equal(a.rows, b.rows)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6, atol=1e-6)
    rows = rng.integers(0, len(kept), size=(3, 4))
    np.testing.assert_array_equal(parted.embeddings(rows), kept[rows])
    # the passages follow the same row space
    stores = []
    for i, x in enumerate(data):
        from rag.corpus import Passage

        write_passage_store([Passage(f"p{i}-{j}", "t", f"x{j}") for j in range(len(x))], tmp_path / f"{i}.arrow")
        stores.append(PassageStore.open(tmp_path / f"{i}.arrow"))
    passages = PartedPassages(stores, parted.space)
    expected = [f"p{i}-{j}" for i, x in enumerate(data) for j in range(len(x)) if live[i] is None or live[i][j]]
    assert passages.ids().to_pylist() == expected
    assert [p.id for p in passages.get(np.arange(len(kept)))] == expected
    assert passages.row_of(expected[-1]) == len(kept) - 1


def test_row_space_rejects_bad_rows_and_masks():
    space = RowSpace([3, 2], [np.array([True, False, True]), None])
    part, local = space.to_local(np.array([0, 1, 2, 3]))
    assert part.tolist() == [0, 0, 1, 1] and local.tolist() == [0, 2, 0, 1]
    assert space.to_global(0, np.array([2])).tolist() == [1]
    with pytest.raises(ValueError, match=r"rows must lie in \[0, 4\)"):
        space.to_local(np.array([4]))
    with pytest.raises(ValueError, match="live mask of shape"):
        RowSpace([3], [np.ones(2, bool)])
