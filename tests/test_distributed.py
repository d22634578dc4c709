"""The knowledge base on a real local Ray cluster (rag.distributed): shard actors, each holding only its
slice, give the unsharded index's results; an actor killed mid-query is restarted and the query retried,
or the query fails clearly when it cannot come back."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from tiny_encoders import tiny_knowledge_base

from rag.cli import main
from rag.config import CorpusConfig, EncoderConfig, IndexConfig
from rag.knowledge import build_knowledge_base
from rag.retriever import Retriever
from rag.sharding import shard_knowledge_base

ray = pytest.importorskip("ray", reason="Ray is an optional extra: pip install 'rag[ray]'")
pytestmark = pytest.mark.slow  # a local Ray cluster: tens of seconds to start, minutes in all, GBs of memory

from rag.distributed.shards import RayPartedIndex, ShardUnavailableError, actor_info, open_on_ray  # noqa: E402

QUESTIONS = ["what is the capital of angola?", "the largest river", "where is luanda", "congo", "city"]


@pytest.fixture(scope="module")
def cluster():
    """A private local cluster of 8 logical CPUs (whatever the cores; the tests search tiny shards)."""
    # a shared test machine's memory is used by others: Ray must not kill our workers for it
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, address="local", object_store_memory=200 << 20,
             runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}})  # fmt: skip
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def kbs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ray-kb")
    kb, _, _, _ = tiny_knowledge_base(root, encoder_seed=8, corpus_seed=5)
    shard_knowledge_base(kb, 3, root / "sharded")
    return kb, root / "sharded"


@pytest.fixture(scope="module")
def remote(cluster, kbs):
    """(unsharded retriever, the same over 3 shard actors): each actor may be restarted once."""
    kb_dir, sharded = kbs
    one = Retriever.open(kb_dir)
    index, passages, _ = open_on_ray(sharded, actor_cpus=0.5, max_restarts=1)
    return one, Retriever(index, passages, one.query_encoder)


def _mapped_files(pid: int, root: Path) -> set[str]:
    """The files under root that the process has memory-mapped (Linux /proc)."""
    lines = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return {line.split()[-1] for line in lines if str(root) in line}


def _same(a, b) -> None:
    assert a.ids == b.ids and a.texts == b.texts
    np.testing.assert_array_equal(a.rows, b.rows)
    np.testing.assert_array_equal(a.scores.numpy(), b.scores.numpy())
    np.testing.assert_array_equal(a.embeddings.numpy(), b.embeddings.numpy())


def test_ray_shards_give_the_unsharded_results_and_hold_only_their_slice(remote, kbs):
    one, sharded = remote
    assert isinstance(sharded.index, RayPartedIndex)
    for k in (1, 10, len(one.index)):
        _same(one.retrieve(QUESTIONS, k), sharded.retrieve(QUESTIONS, k))
    infos = actor_info(sharded.index)
    assert [i["rows"] for i in infos] == [len(p) for p in sharded.index.parts]
    assert len({i["pid"] for i in infos}) == 3 and os.getpid() not in {i["pid"] for i in infos}
    for i, info in enumerate(infos):  # each actor maps its own shard's files and no other shard's
        mapped = _mapped_files(info["pid"], kbs[1])
        assert mapped and all(f"/shard-{i:03d}/" in f for f in mapped), mapped
    view = sharded.index.with_search_params(nprobe=3)
    assert view.parts[0].params == {"nprobe": 3} and sharded.index.parts[0].params == {}


def test_cli_search_with_ray_prints_what_the_local_search_prints(remote, kbs, capsys):
    kb_dir, sharded = kbs
    def lines() -> list[str]:  # the JSON lines (a raylet may print a note of its own to stdout)
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]

    assert main(["search", *QUESTIONS[:2], "--index", str(kb_dir), "-k", "4", "--json"]) == 0
    local = lines()
    assert main(["search", *QUESTIONS[:2], "--index", str(sharded), "-k", "4", "--json", "--ray", "auto"]) == 0
    assert lines() == local and len(local) == 2


def test_an_actor_killed_mid_query_is_restarted_and_the_query_retried(remote):
    one, sharded = remote
    before = actor_info(sharded.index)
    ray.get([s.actor.pause_searches.remote(2.0) for s in sharded.index.parts])
    result: dict = {}
    query = threading.Thread(target=lambda: result.update(got=sharded.retrieve(QUESTIONS, 10)))
    query.start()
    time.sleep(0.7)  # every shard is inside its 2 s pause now
    os.kill(before[1]["pid"], signal.SIGKILL)
    query.join(timeout=300)
    assert not query.is_alive() and "got" in result
    _same(result["got"], one.retrieve(QUESTIONS, 10))
    after = actor_info(sharded.index)
    assert after[1]["pid"] != before[1]["pid"] and after[0]["pid"] == before[0]["pid"]
    ray.get([s.actor.pause_searches.remote(0.0) for s in sharded.index.parts])


def test_a_query_fails_clearly_when_the_actor_cannot_come_back(remote):
    one, sharded = remote
    os.kill(actor_info(sharded.index)[1]["pid"], signal.SIGKILL)  # its one restart was used above
    with pytest.raises(ShardUnavailableError, match="shard shard-001: its actor died and will not be restarted"):
        sharded.retrieve(QUESTIONS, 5)


def test_ray_data_build_writes_what_the_single_process_build_writes(cluster, kbs, tmp_path, capsys):
    from rag.distributed.encoding import encode_shards_on_ray
    from rag.knowledge import open_knowledge_base

    kb_dir, _ = kbs
    meta = open_knowledge_base(kb_dir).meta
    corpus = CorpusConfig(**meta["corpus"])
    encoder = EncoderConfig(**meta["encoder"])
    index = IndexConfig(**{**meta["index"], "shard_size": 16})

    def on_ray(store_path, jobs, progress):
        assert len(jobs) >= 2  # several build shards, spread over the actor pool
        encode_shards_on_ray(store_path, encoder, jobs, workers=2, address="auto")

    build_knowledge_base(corpus, encoder, index, tmp_path / "ray", progress=False, encode_shards=on_ray)
    build_knowledge_base(corpus, encoder, index, tmp_path / "one", progress=False)
    a, b = open_knowledge_base(tmp_path / "ray"), open_knowledge_base(tmp_path / "one")
    rows = np.arange(len(a.index))
    np.testing.assert_array_equal(a.index.embeddings(rows), b.index.embeddings(rows))
    assert a.passages.ids().to_pylist() == b.passages.ids().to_pylist()
    assert main(["index", "build", "--corpus", corpus.source, "--words", str(corpus.words_per_passage),
                 "--encoder", encoder.path, "--dtype", encoder.dtype, "--shard-size", "16", "--ray", "auto",
                 "--ray-workers", "2", "--out", str(tmp_path / "cli"), "--no-progress"]) == 0  # fmt: skip
    c = open_knowledge_base(tmp_path / "cli")
    np.testing.assert_array_equal(c.index.embeddings(rows), b.index.embeddings(rows))


def test_two_ray_train_workers_follow_one_process_with_the_doubled_batch(cluster, world, tmp_path):
    import dataclasses

    from rag.config import TrainConfig
    from rag.model import RagModel
    from rag.train_distributed import train_on_ray
    from rag.training import train

    _, rag, _, train_set, _ = world
    config = TrainConfig(rag=rag, steps=4, batch_size=8, lr=3e-3, generator_lr=1e-4, schedule="constant", seed=3)
    single = train(RagModel.from_config(rag), train_set, config).losses
    done = train_on_ray(dataclasses.replace(config, batch_size=4), train_set, [], tmp_path / "run", workers=2,
                        address="auto")  # fmt: skip
    ray_losses = [r["loss"] for r in done["log"]]
    assert done["steps"] == 4 and len(ray_losses) == 4
    assert len(set(np.round(single, 4))) > 1  # the curve moves: a real comparison
    np.testing.assert_allclose(ray_losses, single, rtol=2e-4)
    assert (tmp_path / "run" / "checkpoint").is_dir() and not list(tmp_path.glob(".run.*.ray"))
