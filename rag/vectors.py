"""Given passage embeddings d(z): vectors computed elsewhere, matched to the passage store by id.

`rag index build --corpus psgs_w100.tsv --embeddings FILE` indexes vectors that were already
computed (DPR's released Wikipedia embeddings took days of GPU time) instead of encoding again.
FILE is one of:
- `.npy`, (N, D) float32 or float16: row i is the vector of passage i (the file has no ids, so
  its row count must equal the corpus's passage count);
- Parquet (`.parquet`) or Arrow (`.arrow`/`.feather`, IPC file or stream as HF datasets writes)
  with an id column and a vector column (a list or fixed-size list of floats): HF's `wiki_dpr`
  layout is `id, text, title, embeddings`.

`align_embeddings` writes the (N, D) matrix in passage-store row order, streaming chunk by chunk:
each chunk's ids are looked up in a sorted array of the store's ids (about 20 bytes per passage,
not a Python dict), and its vectors are written at their rows with positioned writes, so memory
stays bounded whatever N is and the ids may come in any order. Every mismatch is an error naming
the file: row count, dimension, dtype, a null or ragged vector, an id the corpus lacks, a repeated
id, and passages left without a vector.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from rag.npy import CHUNK_BYTES, MatrixFile, iter_chunks, open_matrix, write_matrix
from rag.store import PassageStore

VECTOR_COLUMNS = ("embeddings", "embedding", "vector", "vectors")  # tried in order when not named
_FLOAT_TYPES = {pa.float16(): np.float16, pa.float32(): np.float32, pa.float64(): np.float64}


class EmbeddingsError(ValueError):
    """A given embeddings file that cannot serve the corpus; the message names the file."""


@dataclass(frozen=True)
class EmbeddingsFile:
    """An opened embeddings file: what it holds, checked before any work is done."""

    path: Path
    kind: Literal["npy", "parquet", "arrow-file", "arrow-stream"]
    rows: int | None  # None: an Arrow stream, counted while reading
    dim: int
    dtype: np.dtype  # of the stored values
    id_column: str | None  # None for .npy: row i is passage i
    vector_column: str | None


def open_embeddings(path: Path | str, id_column: str = "id", vector_column: str = "") -> EmbeddingsFile:
    """Read the header or schema of an embeddings file; errors name the file and column."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"embeddings file {path} does not exist")
    if path.suffix == ".npy":
        try:
            matrix = open_matrix(path)
        except ValueError as error:
            raise EmbeddingsError(str(error)) from None
        if matrix.dtype.kind != "f" or matrix.dtype.itemsize not in (2, 4):
            raise EmbeddingsError(f"{path}: dtype {matrix.dtype}; expected float32 or float16 vectors")
        if matrix.dim == 0:
            raise EmbeddingsError(f"{path}: vectors of dimension 0")
        return EmbeddingsFile(path, "npy", matrix.rows, matrix.dim, matrix.dtype, None, None)
    kind, schema, rows = _arrow_schema(path)
    if id_column not in schema.names:
        raise EmbeddingsError(f"{path}: no id column {id_column!r} (columns: {schema.names}); "
                              "name it with --embeddings-id-column")  # fmt: skip
    if not (pa.types.is_string(schema.field(id_column).type) or pa.types.is_large_string(schema.field(id_column).type)
            or pa.types.is_integer(schema.field(id_column).type)):  # fmt: skip
        raise EmbeddingsError(f"{path}: column {id_column!r} has type {schema.field(id_column).type}; "
                              "expected string or integer ids")  # fmt: skip
    vector_column = vector_column or next((c for c in VECTOR_COLUMNS if c in schema.names), "")
    if vector_column not in schema.names:
        raise EmbeddingsError(f"{path}: no vector column (tried {list(VECTOR_COLUMNS)}; columns: {schema.names}); "
                              "name it with --embeddings-column")  # fmt: skip
    vtype = schema.field(vector_column).type
    if not (pa.types.is_list(vtype) or pa.types.is_large_list(vtype) or pa.types.is_fixed_size_list(vtype)):
        raise EmbeddingsError(f"{path}: column {vector_column!r} has type {vtype}; expected a list of floats")
    if vtype.value_type not in _FLOAT_TYPES:
        raise EmbeddingsError(f"{path}: column {vector_column!r} holds {vtype.value_type}; expected float16/32/64")
    dim = vtype.list_size if pa.types.is_fixed_size_list(vtype) else _first_length(path, kind, vector_column)
    if dim <= 0:
        raise EmbeddingsError(f"{path}: column {vector_column!r}: vectors of dimension {dim}")
    return EmbeddingsFile(path, kind, rows, dim, np.dtype(_FLOAT_TYPES[vtype.value_type]), id_column, vector_column)


def _arrow_schema(path: Path) -> tuple[Any, pa.Schema, int | None]:
    if path.suffix == ".parquet":
        try:
            meta = pq.ParquetFile(path)
        except (pa.ArrowInvalid, OSError) as error:
            raise EmbeddingsError(f"{path}: not a readable Parquet file ({error})") from None
        return "parquet", meta.schema_arrow, int(meta.metadata.num_rows)
    for kind, opener in (("arrow-file", ipc.open_file), ("arrow-stream", ipc.open_stream)):
        try:
            with pa.OSFile(str(path)) as f:
                reader = opener(f)
                rows = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches)) \
                    if kind == "arrow-file" else None  # fmt: skip
                return kind, reader.schema, rows
        except (pa.ArrowInvalid, OSError):
            continue
    raise EmbeddingsError(f"{path}: neither .npy, Parquet nor an Arrow IPC file or stream")


def _first_length(path: Path, kind: str, column: str) -> int:
    for batch in _arrow_batches(path, kind, [column], 1):
        if batch.num_rows:
            value = batch.column(0)[0]
            if not value.is_valid:
                raise EmbeddingsError(f"{path}: column {column!r}: the first vector is null")
            return len(value)
    raise EmbeddingsError(f"{path}: no rows")


def _arrow_batches(path: Path, kind: str, columns: list[str], batch_rows: int) -> Iterator[pa.RecordBatch]:
    """Record batches of the named columns, read through the page cache (not memory-mapped)."""
    if kind == "parquet":
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns)
        return
    with pa.OSFile(str(path)) as f:
        reader = ipc.open_file(f) if kind == "arrow-file" else ipc.open_stream(f)
        batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if kind == "arrow-file" \
            else iter(reader)  # fmt: skip
        for batch in batches:
            batch = batch.select(columns)
            for start in range(0, batch.num_rows, batch_rows):
                yield batch.slice(start, batch_rows)


def iter_vectors(source: EmbeddingsFile, chunk_rows: int = 0) -> Iterator[tuple[list[str] | None, np.ndarray]]:
    """(ids or None for .npy, vectors (n, D)) chunks in file order."""
    chunk_rows = chunk_rows or max(1, CHUNK_BYTES // (source.dim * 4))
    if source.kind == "npy":
        for _, chunk in iter_chunks(open_matrix(source.path), chunk_rows=chunk_rows):
            yield None, chunk
        return
    assert source.id_column is not None and source.vector_column is not None
    first = 0
    for batch in _arrow_batches(source.path, source.kind, [source.id_column, source.vector_column], chunk_rows):
        ids = batch.column(0)
        if ids.null_count:
            raise EmbeddingsError(f"{source.path}: column {source.id_column!r}: a null id near row {first}")
        yield [str(i) for i in ids.to_pylist()], _vector_block(batch.column(1), source, first)
        first += batch.num_rows


def _vector_block(column: pa.Array, source: EmbeddingsFile, first: int) -> np.ndarray:
    """A list (or fixed-size list) column of n vectors -> (n, D) array, every length checked."""
    n, d = len(column), source.dim
    if column.null_count:
        bad = first + int(np.flatnonzero(~np.asarray(column.is_valid()))[0])
        raise EmbeddingsError(f"{source.path}: column {source.vector_column!r}: row {bad} is null")
    if pa.types.is_fixed_size_list(column.type):
        values = column.flatten()
    else:
        offsets = np.asarray(column.offsets)
        lengths = np.diff(offsets)
        if (lengths != d).any():
            bad = int(np.flatnonzero(lengths != d)[0])
            raise EmbeddingsError(f"{source.path}: column {source.vector_column!r}: row {first + bad} has "
                                  f"{lengths[bad]} values, earlier rows {d}")  # fmt: skip
        values = column.values.slice(int(offsets[0]), n * d)
    if values.null_count:
        raise EmbeddingsError(f"{source.path}: column {source.vector_column!r}: null values near row {first}")
    return values.to_numpy(zero_copy_only=False).reshape(n, d)


# ---------------------------------------------------------------- matching to the passage store


class IdLookup:
    """Passage ids (row order) as a sorted fixed-width byte array: id -> row by binary search, in
    about 20 bytes per passage where a dict would take about 100."""

    def __init__(self, ids: pa.ChunkedArray) -> None:
        width = max(1, max((pc.max(pc.binary_length(c)).as_py() or 0) for c in ids.chunks))
        self._width = width
        encoded = np.concatenate([np.array(c.cast(pa.binary()).to_pylist(), dtype=f"S{width}") for c in ids.chunks])
        self._order = np.argsort(encoded, kind="stable")  # (N,) rows in id order
        self._sorted = encoded[self._order]

    def rows(self, ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(rows, found) for ids: rows (n,) int64 where found (n,) bool."""
        keys = np.array([i.encode("utf-8") for i in ids], dtype=object)
        too_long = np.array([len(k) > self._width for k in keys], dtype=bool)
        fixed = np.array([k if len(k) <= self._width else b"" for k in keys], dtype=f"S{self._width}")
        pos = np.minimum(np.searchsorted(self._sorted, fixed), len(self._sorted) - 1)
        found = (self._sorted[pos] == fixed) & ~too_long
        return self._order[pos].astype(np.int64), found

    def with_prefix(self, prefix: str) -> tuple[np.ndarray, list[str]]:
        """(rows, ids) of every id that starts with prefix, in id order."""
        key = prefix.encode("utf-8")
        if len(key) > self._width:
            return np.zeros(0, np.int64), []
        lo = int(np.searchsorted(self._sorted, np.array(key, dtype=f"S{self._width}"), side="left"))
        hi = lo
        while hi < len(self._sorted) and self._sorted[hi].startswith(key):
            hi += 1
        return self._order[lo:hi].astype(np.int64), [i.decode("utf-8") for i in self._sorted[lo:hi]]


@dataclass(frozen=True)
class Aligned:
    path: Path  # the (N, D) .npy in store order and the index's dtype
    linked: bool  # True: the given .npy itself (already in order and dtype), not a copy
    rows: int
    dim: int


def align_embeddings(source: EmbeddingsFile, store: PassageStore, out: Path, dtype: np.dtype,
                     progress: bool = False) -> Aligned:  # fmt: skip
    """The given vectors as an (N, D) .npy of `dtype` in the store's row order, written to `out`.

    A .npy already in `dtype` is used as it is (its rows are the passages' rows by definition).
    """
    n = len(store)
    if source.rows is not None and source.rows != n:
        raise EmbeddingsError(f"{source.path}: {source.rows} vectors, the corpus has {n} passages")
    if source.kind == "npy":
        if np.dtype(dtype) == source.dtype:
            return Aligned(source.path, True, n, source.dim)
        chunks = (_finite(v, dtype, source, row) for row, (_, v) in _numbered(iter_vectors(source)))
        write_matrix(out, chunks, n, source.dim, dtype)
        return Aligned(out, False, n, source.dim)
    lookup = IdLookup(store.ids())
    _preallocate(out, n, source.dim, dtype)  # the header and a sparse file; rows are written in place
    matrix = open_matrix(out)
    seen = np.zeros(n, dtype=bool)
    bar = _bar(progress, n)
    done = 0
    with open(out, "r+b") as f:
        for ids, vectors in iter_vectors(source):
            rows, found = lookup.rows(ids)
            if not found.all():
                bad = ids[int(np.flatnonzero(~found)[0])]
                raise EmbeddingsError(f"{source.path}: id {bad!r} (row {done + int(np.flatnonzero(~found)[0])}) "
                                      "is not a passage of the corpus")  # fmt: skip
            repeated = seen[rows] | _repeats(rows)
            if repeated.any():
                raise EmbeddingsError(f"{source.path}: id {ids[int(np.flatnonzero(repeated)[0])]!r} appears twice")
            seen[rows] = True
            _write_rows(f.fileno(), matrix, rows, _finite(vectors, dtype, source, done))
            done += len(ids)
            if bar is not None:
                bar.update(len(ids))
    if bar is not None:
        bar.close()
    if done != n or not seen.all():
        missing = int(np.flatnonzero(~seen)[0]) if not seen.all() else 0
        raise EmbeddingsError(f"{source.path}: {done} vectors for {n} passages; passage "
                              f"{store[missing].id!r} has none")  # fmt: skip
    return Aligned(out, False, n, source.dim)


def _numbered(chunks: Iterator[tuple[Any, np.ndarray]]) -> Iterator[tuple[int, tuple[Any, np.ndarray]]]:
    row = 0
    for item in chunks:
        yield row, item
        row += len(item[1])


def _finite(vectors: np.ndarray, dtype: np.dtype, source: EmbeddingsFile, first: int) -> np.ndarray:
    """vectors in `dtype`; a NaN or infinity (also one made by a float16 overflow) is an error."""
    with np.errstate(over="ignore"):  # an overflow becomes inf, reported below
        out = np.asarray(vectors, dtype=dtype)
    bad = ~np.isfinite(out).all(axis=1)
    if bad.any():
        raise EmbeddingsError(f"{source.path}: vector {first + int(np.flatnonzero(bad)[0])} (in file order) is not "
                              f"finite as {np.dtype(dtype)}")  # fmt: skip
    return out


def _repeats(rows: np.ndarray) -> np.ndarray:
    """True at the second and later occurrences of a row within one chunk."""
    order = np.argsort(rows, kind="stable")
    dup = np.zeros(len(rows), dtype=bool)
    dup[order[1:]] = rows[order[1:]] == rows[order[:-1]]
    return dup


def _preallocate(path: Path, rows: int, dim: int, dtype: np.dtype) -> None:
    """Rewrite the header for (rows, dim) and extend the file to full size (sparse until written)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (rows, dim)}
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)
        f.truncate(f.tell() + rows * dim * np.dtype(dtype).itemsize)


def _write_rows(fd: int, matrix: MatrixFile, rows: np.ndarray, vectors: np.ndarray) -> None:
    """Write vectors at their rows: one positioned write per run of consecutive rows."""
    order = np.argsort(rows, kind="stable")
    rows, vectors = rows[order], np.ascontiguousarray(vectors[order], dtype=matrix.dtype)
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for lo, hi in zip(np.concatenate([[0], breaks]), np.concatenate([breaks, [len(rows)]]), strict=True):
        os.pwrite(fd, vectors[lo:hi].tobytes(), matrix.offset + int(rows[lo]) * matrix.row_bytes)


def _bar(progress: bool, total: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="matching vectors to passages", unit="passage")
