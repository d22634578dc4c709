"""A knowledge base served by Ray actors: one actor per shard, each holding only its slice.

transformers' RAG copies the whole index into every retrieval actor. Here shard i's actor opens only
shard i's folder (its passage store slice, embeddings and index, memory-mapped), so a cluster of
machines holds the knowledge base once in total. `RayPartedIndex` / `RayPartedPassages` have the
interface of DenseIndex / PassageStore (through rag.shards), so `Retriever`, `RagModel`, training and
evaluation use them unchanged:

    Retriever.open("wiki-sharded/", ray="auto")        # rag search / ask / serve --ray auto

Search scatters the queries to every actor at once (Ray runs them in parallel, one per shard),
gathers each shard's top k and merges them exactly (rag.mips.merge_topk): the same ids and scores as
one index over all passages.

Placement: shard i's actor asks for the custom resource `rag-shard-i` when the cluster has one, so a
machine started with `ray start --resources '{"rag-shard-0": 1}'` serves shard 0 and needs only that
folder; without such resources actors are spread over the nodes (SPREAD), and every node needs the
knowledge base at the same path (a shared file system).

Failures: an actor is restarted by Ray when its process dies (`max_restarts`); a query whose actor died
mid-call is sent again until it is back (within `restart_timeout_s`), and otherwise, or at once when
the actor has no restarts left, fails with ShardUnavailableError naming the shard.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from rag.config import IndexConfig, from_dict
from rag.corpus import Passage
from rag.distributed import connect
from rag.knowledge import open_knowledge_base
from rag.mips import SearchResult
from rag.shards import PartedIndex, PartedPassages, RowSpace

SHARD_RESOURCE = "rag-shard-{}"


class ShardUnavailableError(RuntimeError):
    """A shard's actor died and did not come back within the retries."""


class ShardServer:
    """The actor: one knowledge base folder (a shard), opened where the actor runs."""

    def __init__(self, kb_dir: str) -> None:
        kb = open_knowledge_base(kb_dir)
        self.kb_dir = kb_dir
        self.index, self.store = kb.index, kb.passages
        self.pause_s = 0.0

    def pause_searches(self, seconds: float) -> None:
        """Make every later search of this actor wait first (tests kill an actor mid-query with it);
        a restarted actor does not pause."""
        self.pause_s = float(seconds)

    def info(self) -> dict[str, Any]:
        import socket

        return {"rows": len(self.index), "dim": self.index.dim, "nbytes": self.index.nbytes,
                "config": dataclasses.asdict(self.index.config), "pid": os.getpid(), "host": socket.gethostname()}  # fmt: skip

    def search(self, queries: np.ndarray, k: int, params: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        if self.pause_s > 0:
            time.sleep(self.pause_s)
        index = self.index.with_search_params(**params) if params else self.index
        found = index.search(queries, k)
        return found.rows, found.scores

    def embeddings(self, rows: np.ndarray) -> np.ndarray:
        return self.index.embeddings(rows)

    def passages(self, rows: np.ndarray) -> list[tuple[str, str, str]]:
        return [(p.id, p.title, p.text) for p in self.store.get(rows)]

    def ids(self) -> pa.ChunkedArray:
        return self.store.ids()


@dataclasses.dataclass
class _Shard:
    """The driver's handle on one shard actor (what the actor reported when it started)."""

    name: str  # the shard folder, for messages
    actor: Any
    rows: int
    dim: int
    nbytes: int
    config: IndexConfig
    params: dict[str, Any]  # search-time settings of this view (with_search_params)

    def __len__(self) -> int:
        return self.rows


class RayPartedIndex(PartedIndex):
    """PartedIndex whose parts are shard actors, called in parallel; DenseIndex's interface."""

    def __init__(self, shards: list[_Shard], restart_timeout_s: float = 300.0, timeout_s: float = 600.0) -> None:
        self.parts = shards  # type: ignore[assignment]  # _Shard offers what _map and RowSpace need
        self.space = RowSpace([s.rows for s in shards], [None] * len(shards))
        self.config = shards[0].config
        self.restart_timeout_s = restart_timeout_s  # how long a dead actor may take to come back
        self.timeout_s = timeout_s  # how long one call may take

    @property
    def dim(self) -> int:
        return self.parts[0].dim

    @property
    def nbytes(self) -> int:
        return int(sum(s.nbytes for s in self.parts))

    def with_search_params(self, **changes: Any) -> RayPartedIndex:
        shards = [dataclasses.replace(s, params={**s.params, **changes},
                                      config=dataclasses.replace(s.config, **changes)) for s in self.parts]  # fmt: skip
        return RayPartedIndex(shards, self.restart_timeout_s, self.timeout_s)

    def _map(self, method: str, args: list[tuple | None]) -> list[Any]:
        """Call `method` on every shard with args (None: skip) at once and gather the results.

        An actor that died mid-call (ActorUnavailableError: Ray is restarting it) gets the call again,
        with growing pauses, until `restart_timeout_s` has passed; an actor that will not come back
        (ActorDiedError: no restarts left) fails the query at once. Either failure is a
        ShardUnavailableError naming the shard."""
        ray = connect()
        results: list[Any] = [None] * len(args)
        todo = [i for i, a in enumerate(args) if a is not None]
        deadline, attempt = time.monotonic() + self.restart_timeout_s, 0
        while True:
            refs = {i: self._submit(method, i, args[i]) for i in todo}
            failed: dict[int, Exception] = {}
            for i, ref in refs.items():
                try:
                    results[i] = _unpack(method, ray.get(ref, timeout=self.timeout_s))
                except ray.exceptions.ActorDiedError as error:
                    raise ShardUnavailableError(f"shard {self.parts[i].name}: its actor died and will not be "
                                                f"restarted ({_first_line(error)})") from None  # fmt: skip
                except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
                    failed[i] = error
            if not failed:
                return results
            attempt += 1
            if time.monotonic() > deadline:
                i, error = next(iter(failed.items()))
                raise ShardUnavailableError(f"shard {self.parts[i].name}: its actor failed {attempt} times in "
                                            f"{self.restart_timeout_s:.0f} s ({_first_line(error)})")  # fmt: skip
            todo = sorted(failed)
            time.sleep(min(5.0, 0.25 * 2**attempt))  # Ray restarts the actor meanwhile

    def _submit(self, method: str, i: int, args: tuple) -> Any:
        shard = self.parts[i]
        if method == "search":
            queries, k, live = args
            assert live is None  # shards apply their own deletions
            return shard.actor.search.remote(queries, k, shard.params)
        return getattr(shard.actor, method).remote(*args)


def _first_line(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _unpack(method: str, value: Any) -> Any:
    if method == "search":
        return SearchResult(*value)
    if method == "passages":
        return [Passage(*p) for p in value]
    return value


class RayPartedPassages(PartedPassages):
    """The passages, fetched from the actor of the shard that holds each row."""

    def __init__(self, index: RayPartedIndex, path: Path) -> None:
        super().__init__([_PassageProxy(index, i) for i in range(len(index.parts))], index.space, path)


class _PassageProxy:
    def __init__(self, index: RayPartedIndex, part: int) -> None:
        self.index, self.part = index, part

    def __len__(self) -> int:
        return len(self.index.parts[self.part])

    def get(self, rows: np.ndarray) -> list[Passage]:
        args: list[tuple | None] = [None] * len(self.index.parts)
        args[self.part] = (np.asarray(rows, dtype=np.int64),)
        return self.index._map("passages", args)[self.part]

    def ids(self) -> pa.ChunkedArray:
        args: list[tuple | None] = [None] * len(self.index.parts)
        args[self.part] = ()
        return self.index._map("ids", args)[self.part]


def open_on_ray(kb_dir: Path | str, address: str = "auto", actor_cpus: float = 1.0, max_restarts: int = 2,
                restart_timeout_s: float = 300.0, startup_timeout_s: float = 300.0,
                ) -> tuple[RayPartedIndex, RayPartedPassages, dict[str, Any]]:  # fmt: skip
    """One actor per shard of the knowledge base at kb_dir (an unsharded one is one shard); returns
    (index, passages, meta) as open_knowledge_base does."""
    from rag.io import read_format_json
    from rag.knowledge import FORMAT, META_FILE

    kb_dir = Path(kb_dir).resolve()
    meta = read_format_json(kb_dir, META_FILE, FORMAT, "knowledge base (rag index build)")
    folders = [kb_dir / name for name in meta["shards"]] if meta.get("shards") else [kb_dir]
    ray = connect(address)
    available = ray.cluster_resources()
    remote = ray.remote(ShardServer)
    actors = []
    for i, folder in enumerate(folders):
        resource = SHARD_RESOURCE.format(i)
        options: dict[str, Any] = {"num_cpus": actor_cpus, "max_restarts": max_restarts, "max_task_retries": 0}
        if resource in available:
            options["resources"] = {resource: 0.001}
        else:
            options["scheduling_strategy"] = "SPREAD"
        actors.append(remote.options(**options).remote(str(folder)))
    try:
        infos = ray.get([a.info.remote() for a in actors], timeout=startup_timeout_s)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError) as error:
        for actor in actors:
            ray.kill(actor)
        raise ShardUnavailableError(
            f"{kb_dir}: the {len(actors)} shard actors ({actor_cpus} CPU each) did not all start within "
            f"{startup_timeout_s:.0f} s: does the cluster have the CPUs (it has {available.get('CPU', 0)}), and "
            f"every node the shard folders at this path? ({type(error).__name__})") from None
    shards = [_Shard(folder.name, actor, info["rows"], info["dim"], info["nbytes"],
                     from_dict(IndexConfig, info["config"]), {})
              for folder, actor, info in zip(folders, actors, infos, strict=True)]  # fmt: skip
    index = RayPartedIndex(shards, restart_timeout_s)
    if len(index) != meta["passages"]:
        raise ValueError(f"{kb_dir}: the shards hold {len(index)} passages, meta.json says {meta['passages']}")
    return index, RayPartedPassages(index, kb_dir), meta


def actor_info(index: RayPartedIndex) -> list[dict[str, Any]]:
    """What each shard's actor reports now (rows, pid, host): for tests and `rag index info --ray`."""
    ray = connect()
    return ray.get([s.actor.info.remote() for s in index.parts])
