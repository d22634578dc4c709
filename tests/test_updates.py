"""Live updates (rag.updates): add, replace and delete passages by id as new data versions; search
results equal a rebuild of the final corpus; a loaded model picks the new version up by hot-swap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_encoders import tiny_sentence_transformers_dir
from tiny_generators import tiny_bart

from rag.cli import main
from rag.config import CorpusConfig, EncoderConfig, GivenEmbeddings, IndexConfig
from rag.hotswap import refresh
from rag.knowledge import build_knowledge_base, data_version, open_knowledge_base
from rag.model import RagModel
from rag.retriever import Retriever
from rag.sharding import shard_knowledge_base
from rag.updates import Change, compact_knowledge_base, read_change, update_knowledge_base

WORDS = ("the capital of city river what where largest country angola luanda congo atlantic africa "
         "paris france europe lake mountain desert island").split()  # fmt: skip
QUESTIONS = ["what is the capital of angola?", "the largest river", "where is luanda", "congo", "city of paris"]


def _docs(ids: range, seed: int, length: tuple[int, int] = (5, 50)) -> dict[str, tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return {f"d{i}": (f"Doc {i}", " ".join(rng.choice(WORDS, size=int(rng.integers(*length))))) for i in ids}


def _write(path, docs: dict[str, tuple[str, str]]):
    path.write_text("".join(json.dumps({"id": k, "title": t, "text": x}) + "\n" for k, (t, x) in docs.items()),
                    encoding="utf-8")  # fmt: skip
    return CorpusConfig(source=str(path), words_per_passage=10)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("updates")
    encoder = EncoderConfig(path=str(tiny_sentence_transformers_dir(root / "enc", seed=11)), batch_size=4)
    base = _docs(range(40), seed=1)
    changed = _docs(range(5), seed=2, length=(3, 15))  # d0..d4 rewritten, most of them shorter
    new = _docs(range(40, 50), seed=3)
    gone = ["d20", "d21", "d22"]
    final = {**base, **changed, **new}
    for g in gone:
        final.pop(g)
    return root, encoder, base, {**changed, **new}, gone, final


def _same_results(a: Retriever, b: Retriever, k: int, atol: float = 0.0) -> None:
    x, y = a.retrieve(QUESTIONS, k), b.retrieve(QUESTIONS, k)
    assert x.ids == y.ids and x.texts == y.texts
    np.testing.assert_allclose(x.scores.numpy(), y.scores.numpy(), rtol=0, atol=atol)


@pytest.mark.parametrize("shards", [1, 3])
def test_add_replace_delete_equals_a_rebuild_of_the_final_corpus(setup, tmp_path, shards):
    root, encoder, base, update, gone, final = setup
    built = tmp_path / "built"
    build_knowledge_base(_write(tmp_path / "base.jsonl", base), encoder, IndexConfig(), built, progress=False)
    kb_dir = built
    if shards > 1:
        kb_dir = tmp_path / "sharded"
        shard_knowledge_base(built, shards, kb_dir)
    before = Retriever.open(kb_dir)
    add = read_change(kb_dir, _write(tmp_path / "update.jsonl", update), None, delete=False)
    info = update_knowledge_base(kb_dir, add)
    n_old = len(before.index)
    assert info.version == 2 and info.replaced + info.added == len(add.add)
    assert info.replaced == sum(1 for p in add.add if p.id.split("-")[0] in {f"d{i}" for i in range(5)}
                                and p.id in set(before.passages.ids().to_pylist()))  # fmt: skip
    assert info.deleted > 0  # the rewritten documents are shorter: their old tails go
    delete = read_change(kb_dir, _write(tmp_path / "gone.jsonl", {g: base[g] for g in gone}), None, delete=True)
    info = update_knowledge_base(kb_dir, delete)
    assert info.version == 3 and info.added == 0

    rebuilt = tmp_path / "rebuilt"
    build_knowledge_base(_write(tmp_path / "final.jsonl", final), encoder, IndexConfig(), rebuilt, progress=False)
    ref = Retriever.open(rebuilt)
    updated = Retriever.open(kb_dir, query_encoder=ref.query_encoder)
    assert len(updated.index) == len(ref.index) == info.passages
    assert sorted(updated.passages.ids().to_pylist()) == sorted(ref.passages.ids().to_pylist())
    for k in (5, len(ref.index)):  # the new passages were encoded in other batches: scores to rounding
        _same_results(updated, ref, k, atol=1e-5)
    # the version that was open before still answers from its own files
    assert len(before.index) == n_old and before.retrieve(QUESTIONS, 3).k == 3
    # compaction: one part again, same results, tombstones gone
    compact_knowledge_base(kb_dir)
    compacted = Retriever.open(kb_dir, query_encoder=ref.query_encoder)
    meta = open_knowledge_base(kb_dir).meta
    assert data_version(meta) == 4 and "deleted" not in meta and "segments" not in meta
    _same_results(compacted, updated, len(ref.index))


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_given_vectors_update_approximate_indexes_exactly_like_masks(setup, tmp_path, kind):
    """IVF segments reuse the base's trained quantizer; HNSW gets tombstones. With every list probed
    and a wide re-rank, IVF-PQ results equal an exact index over the live passages."""
    root, encoder, *_ = setup
    docs = _docs(range(400), seed=5, length=(8, 12))  # about 400 one-passage documents (>= 256 for PQ)
    corpus = _write(tmp_path / "docs.jsonl", docs)
    from rag.corpus import ReadReport, iter_passages

    ids = [p.id for p in iter_passages(corpus, ReadReport())]
    vectors = np.random.default_rng(6).standard_normal((len(ids), 32)).astype(np.float32)
    np.save(tmp_path / "v.npy", vectors)
    config = IndexConfig(kind=kind, ivf_lists=8, pq_subquantizers=8, nprobe=8, rerank_factor=1000, hnsw_m=8)
    build_knowledge_base(corpus, encoder, config, tmp_path / "kb", progress=False,
                         given=GivenEmbeddings(str(tmp_path / "v.npy")))  # fmt: skip
    new_vectors = np.random.default_rng(7).standard_normal((30, 32)).astype(np.float32)
    from rag.corpus import Passage

    added = [Passage(f"new{i}-0", "New", f"text {i}") for i in range(20)] + \
        [Passage(ids[i], "Re", f"replaced {i}") for i in range(10)]  # fmt: skip
    update_knowledge_base(tmp_path / "kb", Change(add=added, vectors=new_vectors, delete=ids[100:150]))
    kb = open_knowledge_base(tmp_path / "kb")
    live_ids = kb.passages.ids().to_pylist()
    assert len(live_ids) == len(ids) + 20 - 50 and live_ids[-30:] == [p.id for p in added]
    assert not set(ids[:10] + ids[100:150]) & set(live_ids[:-30])  # replaced and deleted: tombstones
    table = {**dict(zip(ids, vectors, strict=True)), **{p.id: v for p, v in zip(added, new_vectors, strict=True)}}
    stored = np.stack([table[i] for i in live_ids]).astype(kb.index.embeddings(np.arange(1)).dtype)
    np.testing.assert_allclose(kb.index.embeddings(np.arange(len(live_ids))), stored, atol=1e-3)
    q = np.random.default_rng(8).standard_normal((6, 32)).astype(np.float32)
    found = kb.index.search(q, 10)
    truth = np.argsort(-(q @ kb.index.embeddings(np.arange(len(live_ids))).T), axis=1, kind="stable")[:, :10]
    if kind == "ivfpq":
        np.testing.assert_array_equal(found.rows, truth)
    else:
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.rows, truth, strict=True)]) >= 0.9


def test_a_loaded_model_picks_up_a_new_version_by_hot_swap(setup, tmp_path):
    root, encoder, base, *_ = setup
    kb_dir = tmp_path / "kb"
    build_knowledge_base(_write(tmp_path / "base.jsonl", base), encoder, IndexConfig(), kb_dir, progress=False)
    retriever = Retriever.open(kb_dir)
    generator = tiny_bart(seed=0)
    model = RagModel(retriever.query_encoder, retriever, generator, "token", 3)
    assert refresh(model) is model  # nothing changed on disk
    question = "zebra zebra zebra"  # only the added passage has these words
    update_knowledge_base(kb_dir, read_change(kb_dir, _write(tmp_path / "z.jsonl", {"z": ("Zebra", question)}),
                                              None, delete=False))  # fmt: skip
    assert model.retriever.source.version == 1
    fresh = refresh(model)
    assert fresh is not model and fresh.generator is generator and fresh.query_encoder is model.query_encoder
    assert fresh.retriever.source.version == 2 and len(fresh.retriever.index) == len(model.retriever.index) + 1
    assert "z-0" in fresh.retriever.retrieve([question], 3).ids[0]
    assert "z-0" not in model.retriever.retrieve([question], 3).ids[0]
    assert refresh(fresh) is fresh


def test_cli_add_delete_compact_and_clear_errors(setup, tmp_path, capsys):
    root, encoder, base, update, gone, _ = setup
    kb_dir = tmp_path / "kb"
    build_knowledge_base(_write(tmp_path / "base.jsonl", base), encoder, IndexConfig(), kb_dir, progress=False)
    _write(tmp_path / "update.jsonl", update)
    assert main(["index", "add", "--index", str(kb_dir), "--corpus", str(tmp_path / "update.jsonl")]) == 0
    assert "data version 2" in capsys.readouterr().out
    (tmp_path / "ids.txt").write_text("d30-0\nd31-0\n")
    assert main(["index", "delete", "--index", str(kb_dir), "--ids", str(tmp_path / "ids.txt")]) == 0
    assert "data version 3; 0 added, 0 replaced, 2 deleted" in capsys.readouterr().out
    assert main(["index", "verify", "--index", str(kb_dir)]) == 0  # segment, tombstones, meta.json recorded
    assert "every size and SHA-256 as recorded" in capsys.readouterr().out
    assert main(["index", "delete", "--index", str(kb_dir), "--ids", str(tmp_path / "ids.txt")]) == 2  # gone already
    assert "passage id 'd30-0' is not in the knowledge base" in capsys.readouterr().err
    assert main(["index", "add", "--index", str(kb_dir), "--corpus", str(tmp_path / "update.jsonl"), "--words", "7"]) == 2
    assert "10-word passages" in capsys.readouterr().err
    assert data_version(open_knowledge_base(kb_dir).meta) == 3  # the failed commands changed nothing
    assert main(["index", "compact", "--no-progress"]) == 2
    assert "name it with --index" in capsys.readouterr().err
    assert main(["index", "compact", "--index", str(kb_dir), "--no-progress"]) == 0
    assert "data version 4" in capsys.readouterr().out
    assert sorted(p.name for p in kb_dir.iterdir() if not p.name.startswith(".")) == [
        "index", "manifest.json", "meta.json", "passages.arrow"]  # fmt: skip
    assert main(["index", "verify", "--index", str(kb_dir)]) == 0  # every version's manifest was kept right


def test_a_running_server_answers_from_the_new_version(world, tmp_path):
    """rag serve follows `rag index add`: the next search and answer retrieve from the new version."""
    import asyncio
    import dataclasses
    import shutil

    import httpx

    from rag.answering import Asker
    from rag.config import DecodingConfig
    from rag.corpus import Passage
    from rag.server import Served, create_app

    task, rag, *_ = world
    kb_dir = tmp_path / "kb"
    shutil.copytree(rag.index_dir, kb_dir)  # the session's world stays as it is
    asker = Asker.load(dataclasses.replace(rag, kind="token", k=3, index_dir=str(kb_dir)),
                       DecodingConfig(num_beams=1, max_new_tokens=4))  # fmt: skip
    generator = asker.model.generator
    app = create_app(Served(asker, kb_dir))
    question = task.test[0].question
    stored = open_knowledge_base(kb_dir)
    top = Retriever.open(kb_dir, query_encoder=asker.model.query_encoder).retrieve([question], 1)
    # a new passage whose d(z) is the question's best passage's, scaled: it outranks every passage
    vector = stored.index.embeddings(top.rows[0]) * 3.0

    async def search(client):
        reply = await client.post("/v1/search", json={"query": question, "k": 3})
        return [hit["id"] for hit in reply.json()["hits"]]

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://rag", timeout=60) as client:
                before = await search(client)
                update_knowledge_base(kb_dir, Change(add=[Passage("fresh-0", "Fresh", "a fresh passage")],
                                                     vectors=vector))  # fmt: skip
                after = await search(client)
                answer = (await client.post("/v1/answer", json={"question": question})).json()
                return before, after, answer

    before, after, answer = asyncio.run(main())
    assert "fresh-0" not in before and after[0] == "fresh-0"
    assert answer["passages"][0]["id"] == "fresh-0"
    assert app.state.rag.engine.asker.model.generator is generator  # the generator was not reloaded
