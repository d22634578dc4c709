"""A knowledge base in parts, searched by scatter/gather with an exact merge of the top-k.

Parts are shards (a knowledge base split so that each machine holds a slice) and update segments (the
passages a live update added, rag.updates). `PartedIndex` and `PartedPassages` put parts side by side
in one row space, part i's rows after part i-1's, and offer the interface of `DenseIndex` and
`PassageStore`, so the Retriever, RagModel, training and evaluation work on them unchanged.

A part may carry a live mask (its deleted passages are False). The row space counts live rows only:
row r is the r-th live passage in part order, so a knowledge base after deletions has the rows a
rebuild without the deleted passages would have. Each part is searched for its own top k among its
live rows, and `rag.mips.merge_topk` merges them exactly (ties to the lower row, as one search would).

`_map` runs one method on every part; rag.distributed.shards overrides it to run the parts as Ray
actors in parallel, each holding only its slice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from rag.config import IndexConfig
from rag.corpus import Passage
from rag.mips import DenseIndexError, SearchResult, merge_topk


class SearchablePart(Protocol):
    """What a part offers: DenseIndex's search interface over its own rows."""

    config: IndexConfig

    def __len__(self) -> int: ...
    @property
    def dim(self) -> int: ...
    @property
    def nbytes(self) -> int: ...
    def search(self, queries: np.ndarray, k: int, live: np.ndarray | None = None) -> SearchResult: ...
    def embeddings(self, rows: np.ndarray) -> np.ndarray: ...
    def with_search_params(self, **changes: Any) -> SearchablePart: ...


class PassagePart(Protocol):
    def __len__(self) -> int: ...
    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]: ...
    def ids(self) -> pa.ChunkedArray: ...


class RowSpace:
    """Global live rows <-> (part, local row), for parts of `sizes` rows with optional live masks."""

    def __init__(self, sizes: Sequence[int], live: Sequence[np.ndarray | None]) -> None:
        if len(sizes) != len(live):
            raise ValueError(f"{len(sizes)} parts but {len(live)} live masks")
        for i, (size, mask) in enumerate(zip(sizes, live, strict=True)):
            if mask is not None and mask.shape != (size,):
                raise ValueError(f"part {i}: live mask of shape {mask.shape}, the part has {size} rows")
        self.sizes = [int(s) for s in sizes]
        self.masks = list(live)
        # the local rows of each part's live passages, where some are dead (None: all live)
        self.live_rows = [None if m is None or m.all() else np.flatnonzero(m) for m in live]
        self.counts = [s if r is None else len(r) for s, r in zip(self.sizes, self.live_rows, strict=True)]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])  # (P + 1,)

    @property
    def total(self) -> int:
        return int(self.offsets[-1])

    def to_global(self, part: int, local: np.ndarray) -> np.ndarray:
        rows = self.live_rows[part]
        return self.offsets[part] + (local if rows is None else np.searchsorted(rows, local))

    def to_local(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(part, local row) of global rows (any shape)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.total):
            raise DenseIndexError(f"rows must lie in [0, {self.total}), got {rows.min()}..{rows.max()}")
        part = np.searchsorted(self.offsets, rows, side="right") - 1
        local = rows - self.offsets[part]
        for p, live_rows in enumerate(self.live_rows):
            if live_rows is not None:
                sel = part == p
                local[sel] = live_rows[local[sel]]
        return part, local


class PartedIndex:
    """Parts searched one after the other in this process, merged exactly; DenseIndex's interface."""

    def __init__(self, parts: Sequence[SearchablePart], live: Sequence[np.ndarray | None] | None = None) -> None:
        if not parts:
            raise ValueError("a parted index needs at least one part")
        dims = {p.dim for p in parts}
        if len(dims) != 1:
            raise ValueError(f"parts disagree on the embedding dim: {sorted(dims)}")
        self.parts = list(parts)
        self.space = RowSpace([len(p) for p in parts], live or [None] * len(parts))
        self.config = parts[0].config

    def _map(self, method: str, args: Sequence[tuple]) -> list[Any]:
        """parts[i].method(*args[i]) for every i with args[i] not None (None where skipped)."""
        return [None if a is None else getattr(p, method)(*a) for p, a in zip(self.parts, args, strict=True)]

    def __len__(self) -> int:
        return self.space.total

    @property
    def dim(self) -> int:
        return int(self.parts[0].dim)

    @property
    def nbytes(self) -> int:
        return int(sum(p.nbytes for p in self.parts))

    def search(self, queries: np.ndarray, k: int, live: np.ndarray | None = None) -> SearchResult:
        """Scatter: each part's top min(k, its live rows); gather: the exact merge of those."""
        if live is not None:
            raise DenseIndexError("a parted index applies its parts' own live masks; no extra mask")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= len(self):
            raise DenseIndexError(f"search: k must be an int in [1, {len(self)}], got {k!r}")
        q = np.ascontiguousarray(queries, dtype=np.float32)
        args = [None if n == 0 else (q, min(k, n), m) for n, m in zip(self.space.counts, self.space.masks, strict=True)]
        found = self._map("search", args)
        parts = [(i, r) for i, r in enumerate(found) if r is not None]
        global_parts = [SearchResult(self.space.to_global(i, r.rows), r.scores) for i, r in parts]
        return merge_topk(global_parts, [0] * len(global_parts), k)

    def embeddings(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Stored d(z) for global rows of any shape (...) -> (..., D) float32."""
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise DenseIndexError(f"embeddings: rows must be integers, got {rows.dtype}")
        flat = rows.reshape(-1)
        part, local = self.space.to_local(flat)
        out = np.empty((flat.size, self.dim), np.float32)
        args = [(local[part == p],) if (part == p).any() else None for p in range(len(self.parts))]
        for p, got in enumerate(self._map("embeddings", args)):
            if got is not None:
                out[part == p] = got
        return out.reshape(*rows.shape, self.dim)

    def with_search_params(self, **changes: Any) -> PartedIndex:
        view = PartedIndex.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.parts = [p.with_search_params(**changes) for p in self.parts]
        view.config = dataclasses.replace(self.config, **changes)
        return view


class PartedPassages:
    """Passage stores of the parts side by side in the same live row space; PassageStore's interface."""

    def __init__(self, parts: Sequence[PassagePart], space: RowSpace, path: Any = None) -> None:
        self.parts = list(parts)
        self.space = space
        self.path = path  # the knowledge base folder, for messages
        self._row_of: dict[str, int] | None = None

    def __len__(self) -> int:
        return self.space.total

    def __getitem__(self, row: int) -> Passage:
        if isinstance(row, bool) or not isinstance(row, int | np.integer):
            raise TypeError(f"row must be an integer, got {type(row).__name__}")
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for {self.path} of {len(self)} passages")
        return self.get([row])[0]

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        index = np.asarray(rows, dtype=np.int64).reshape(-1)
        if index.size and (index.min() < 0 or index.max() >= len(self)):
            bad = index[(index < 0) | (index >= len(self))][0]
            raise IndexError(f"row {bad} out of range for {self.path} of {len(self)} passages")
        part, local = self.space.to_local(index)
        out: list[Passage] = [None] * len(index)  # type: ignore[list-item]  # every slot is filled below
        for p, store in enumerate(self.parts):
            positions = np.flatnonzero(part == p)
            if positions.size:
                for pos, passage in zip(positions.tolist(), store.get(local[positions]), strict=True):
                    out[pos] = passage
        return out

    def ids(self) -> pa.ChunkedArray:
        """The live passages' ids in row order."""
        chunks = []
        for store, live in zip(self.parts, self.space.masks, strict=True):
            ids = store.ids()
            chunks += (ids if live is None else ids.filter(pa.array(live))).chunks
        return pa.chunked_array(chunks, type=pa.string())

    def row_of(self, passage_id: str) -> int:
        """The row of a passage id; the id -> row map is built on first use (O(N) memory)."""
        if self._row_of is None:
            self._row_of = {pid: row for row, pid in enumerate(self.ids().to_pylist())}
        try:
            return self._row_of[passage_id]
        except KeyError:
            raise KeyError(f"passage id {passage_id!r} is not in {self.path}") from None
