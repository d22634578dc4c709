"""Split a knowledge base into N shards: `rag index shard KB --shards N --out OUT`, `rag index build --shards N`.

A sharded knowledge base is a folder of shard folders, each a complete knowledge base over a
contiguous slice of the passages (its own passage store, embeddings and index), plus a meta.json that
lists them:

    OUT/meta.json     the source's meta.json with "shards": ["shard-000", ...] and the total count
    OUT/shard-000/    a knowledge base folder: passages.arrow, index/, meta.json ("shard": i of N)

`open_knowledge_base(OUT)` searches the shards one after the other and merges their top-k exactly
(rag.shards); `Retriever.open(OUT, ray=...)` puts each shard in a Ray actor instead
(rag.distributed.shards), so that a machine holds only the shards it serves. Shard i's rows are rows
[first_row, first_row + passages) of the source, so a sharded search returns the source's rows.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag.config import IndexConfig, from_dict
from rag.corpus import Passage
from rag.index import DenseIndex, store_dtype
from rag.io import atomic_dir, atomic_write_text, check_output_dir
from rag.knowledge import (
    INDEX_DIR,
    META_FILE,
    PASSAGES_FILE,
    KnowledgeBase,
    build_lock,
    is_knowledge_base,
    open_knowledge_base,
)
from rag.manifest import write_manifest
from rag.npy import write_matrix
from rag.store import write_passage_store

SHARD_PREFIX = "shard-"
_COPY_ROWS = 65536  # passages and embeddings copied per step


@dataclass(frozen=True)
class ShardInfo:
    path: Path
    shards: int
    passages: int
    rows_per_shard: list[int]
    seconds: float


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous row ranges of near-equal size (the first n % shards get one more)."""
    if not 1 <= shards <= n:
        raise ValueError(f"--shards must be in [1, {n}] for {n} passages, got {shards}")
    edges = [n * i // shards for i in range(shards + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def shard_knowledge_base(source: Path | str, shards: int, out_dir: Path | str, progress: bool = False,
                         overwrite: bool = False) -> ShardInfo:  # fmt: skip
    """Write `source` (a knowledge base, updates included) as `shards` shards into out_dir (a new or
    empty folder, or with overwrite a knowledge base to replace: rag.io.check_output_dir)."""
    start = time.perf_counter()
    source, out_dir = Path(source).resolve(), Path(out_dir).resolve()
    kb = open_knowledge_base(source)
    if kb.meta.get("shards"):
        raise ValueError(f"{source} is already sharded ({len(kb.meta['shards'])} shards); shard its source")
    check_output_dir(out_dir, what="knowledge base", is_own=is_knowledge_base, overwrite=overwrite, inputs=[source])
    bounds = shard_bounds(len(kb.index), shards)
    config = from_dict(IndexConfig, kb.meta["index"])
    names = [f"{SHARD_PREFIX}{i:03d}" for i in range(shards)]
    with build_lock(out_dir), atomic_dir(out_dir, replaces=is_knowledge_base if overwrite else None) as tmp:
        for i, (name, (lo, hi)) in enumerate(zip(names, bounds, strict=True)):
            _write_shard(kb, config, lo, hi, tmp / name, {"index": i, "of": shards, "first_row": lo}, progress)
        meta = _base_meta(kb.meta) | {"shards": names, "passages": len(kb.index),
                                      "sharded_from": str(source)}  # fmt: skip
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        write_manifest(tmp, nested=tuple(names))  # its own files and each shard's manifest (rag.manifest)
    return ShardInfo(out_dir, shards, len(kb.index), [hi - lo for lo, hi in bounds], time.perf_counter() - start)


def _base_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """A meta.json without the keys of a layout (shards, update segments, deletions)."""
    return {k: v for k, v in meta.items() if k not in ("shards", "segments", "deleted", "shard", "sharded_from")}


def _write_shard(kb: KnowledgeBase, config: IndexConfig, lo: int, hi: int, out: Path, shard: dict[str, int],
                 progress: bool) -> None:  # fmt: skip
    """Rows [lo, hi) of kb as a knowledge base folder: passages, embeddings (streamed), index."""
    with atomic_dir(out) as tmp:
        write_passage_store(_passages(kb, lo, hi), tmp / PASSAGES_FILE)
        stage = out.parent / f".{out.name}.embeddings.npy"
        chunks = (kb.index.embeddings(np.arange(a, min(hi, a + _COPY_ROWS))) for a in range(lo, hi, _COPY_ROWS))
        write_matrix(stage, chunks, hi - lo, kb.index.dim, store_dtype(config))
        try:
            built = DenseIndex.build_from_file(stage, config, tmp / INDEX_DIR, progress=progress)
            del built
        finally:
            stage.unlink(missing_ok=True)
        meta = _base_meta(kb.meta) | {"passages": hi - lo, "shard": shard}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        write_manifest(tmp)  # last: checked by whoever opens the shard (this process or its Ray actor)


def _passages(kb: KnowledgeBase, lo: int, hi: int) -> Iterator[Passage]:
    for a in range(lo, hi, _COPY_ROWS):
        yield from kb.passages.get(np.arange(a, min(hi, a + _COPY_ROWS)))


def build_sharded(build: Any, shards: int, out_dir: Path, progress: bool, overwrite: bool = False
                  ) -> tuple[Any, ShardInfo]:  # fmt: skip
    """Run `build(folder, overwrite)` (a knowledge base build into folder) into a hidden sibling, shard
    that into out_dir, and remove the sibling. Returns (build's result, ShardInfo)."""
    out_dir = Path(out_dir).resolve()
    check_output_dir(out_dir, what="knowledge base", is_own=is_knowledge_base, overwrite=overwrite)
    whole = out_dir.parent / f".{out_dir.name}.unsharded"  # ours: an earlier run's is replaced
    info = build(whole, True)
    try:
        sharded = shard_knowledge_base(whole, shards, out_dir, progress, overwrite)
    finally:
        shutil.rmtree(whole, ignore_errors=True)
    return info, sharded
