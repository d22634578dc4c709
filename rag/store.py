"""The on-disk passage store: an Arrow IPC file, memory-mapped, O(1) access by row.

Rows are written in bounded record batches so a 21M-passage corpus streams through with bounded
memory; readers map the file and copy only the rows they are asked for.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from rag.corpus import CorpusError, Passage
from rag.io import atomic_path

STORE_SCHEMA = pa.schema(
    [("id", pa.string()), ("title", pa.string()), ("text", pa.string())],
    metadata={b"rag.format": b"passage-store-1"},
)
BATCH_ROWS = 8192  # rows per Arrow record batch: bounds the writer's memory
BATCH_BYTES = 64 << 20  # ... and so does this, for corpora of very long passages


def write_passage_store(passages: Iterable[Passage], path: Path | str) -> int:
    """Stream passages into an Arrow IPC file (columns id, title, text); returns the row count.

    Atomic: if `passages` raises part-way, nothing is left at `path` and an older file there stays.
    """
    count = 0
    with atomic_path(path) as tmp, ipc.new_file(str(tmp), STORE_SCHEMA) as writer:
        ids: list[str] = []
        titles: list[str] = []
        texts: list[str] = []
        size = 0
        for p in passages:
            ids.append(p.id)
            titles.append(p.title)
            texts.append(p.text)
            size += len(p.text) + len(p.title) + len(p.id)
            if len(ids) >= BATCH_ROWS or size >= BATCH_BYTES:
                writer.write_batch(_batch(ids, titles, texts))
                count += len(ids)
                ids, titles, texts, size = [], [], [], 0
        if ids:
            writer.write_batch(_batch(ids, titles, texts))
            count += len(ids)
    return count


def _batch(ids: list[str], titles: list[str], texts: list[str]) -> pa.RecordBatch:
    arrays = [pa.array(col, type=pa.string()) for col in (ids, titles, texts)]
    return pa.RecordBatch.from_arrays(arrays, schema=STORE_SCHEMA)


class PassageStore:
    """A memory-mapped passage store: O(1) access by row, nothing loaded until asked for."""

    def __init__(self, path: Path, table: pa.Table) -> None:
        self.path = path
        self._ids = table.column("id")
        # Per record batch (id, title, text) arrays: zero-copy views into the memory map. Taking from
        # them batch by batch avoids Table.take, which concatenates (copies) every chunk first.
        self._columns = [
            (batch.column("id"), batch.column("title"), batch.column("text")) for batch in table.to_batches()
        ]
        lengths = [len(cols[0]) for cols in self._columns]
        self._starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])  # first row per batch
        self._row_of: dict[str, int] | None = None

    @classmethod
    def open(cls, path: Path | str) -> PassageStore:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"passage store {path} does not exist")
        try:
            table = ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            raise CorpusError(
                path, None, "(file)", f"not a readable passage store (Arrow IPC file): {e}"
            ) from None
        missing = [c for c in STORE_SCHEMA.names if c not in table.column_names]
        if missing:
            raise CorpusError(path, None, ",".join(missing), "column missing from the passage store")
        return cls(path, table)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, row: int) -> Passage:
        row = self._check_row(row)
        batch = int(np.searchsorted(self._starts, row, side="right")) - 1
        local = row - int(self._starts[batch])
        return Passage(*(col[local].as_py() for col in self._columns[batch]))

    def get(self, rows: Sequence[int] | np.ndarray) -> list[Passage]:
        """Passages at `rows`, in that order (duplicates allowed): one vectorised take per batch."""
        index = np.asarray(rows, dtype=np.int64).reshape(-1)  # (N,)
        if index.size == 0:
            return []
        if index.min() < 0 or index.max() >= len(self):
            bad = index[(index < 0) | (index >= len(self))][0]
            raise IndexError(f"row {bad} out of range for passage store {self.path} of {len(self)} rows")
        batch = np.searchsorted(self._starts, index, side="right") - 1  # (N,)
        local = index - self._starts[batch]  # (N,)
        order = np.argsort(batch, kind="stable")
        groups, first = np.unique(batch[order], return_index=True)
        out: list[Passage] = [None] * len(index)  # type: ignore[list-item]  # every slot is filled below
        for b, positions in zip(groups.tolist(), np.split(order, first[1:]), strict=True):
            take = pa.array(local[positions])
            ids, titles, texts = (col.take(take).to_pylist() for col in self._columns[b])
            for pos, i, t, x in zip(positions.tolist(), ids, titles, texts, strict=True):
                out[pos] = Passage(i, t, x)
        return out

    def ids(self) -> pa.ChunkedArray:
        """The id column (memory-mapped; `.to_pylist()` it only for small stores)."""
        return self._ids

    def row_of(self, passage_id: str) -> int:
        """The row of a passage id; the id -> row map is built on first use (O(N) memory)."""
        if self._row_of is None:
            self._row_of = {pid: row for row, pid in enumerate(self._ids.to_pylist())}
        try:
            return self._row_of[passage_id]
        except KeyError:
            raise KeyError(f"passage id {passage_id!r} is not in {self.path}") from None

    def _check_row(self, row: int) -> int:
        if isinstance(row, bool) or not isinstance(row, int | np.integer):
            raise TypeError(f"row must be an integer, got {type(row).__name__}")
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for passage store {self.path} of {len(self)} rows")
        return int(row)
