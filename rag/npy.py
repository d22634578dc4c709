"""(N, D) matrices in .npy files, read and written in row chunks with plain file IO.

A memory map of a multi-GB file counts every page it touches in the process's resident memory; a
read into a chunk-sized buffer leaves the file in the page cache instead, which the kernel can drop.
So builds that pass over every row (copying, sampling, adding to an index) use these, and their
peak RSS is bounded by the chunk size whatever N is. Searches still memory-map the stored matrix:
they touch only the rows they score.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CHUNK_BYTES = 64 << 20  # bytes of rows per read or write


@dataclass(frozen=True)
class MatrixFile:
    """The layout of an (N, D) .npy file: where its rows start, their count, width and dtype."""

    path: Path
    offset: int  # bytes before row 0 (the .npy header)
    rows: int
    dim: int
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def chunk_rows(self, chunk_bytes: int = CHUNK_BYTES) -> int:
        return max(1, chunk_bytes // max(1, self.row_bytes))


def open_matrix(path: Path | str) -> MatrixFile:
    """Read an .npy header; errors name the file. Only C-ordered 2-D numeric arrays qualify."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0  # fmt: skip
            shape, fortran, dtype = read_header(f)
            offset = f.tell()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such embeddings file") from None
    except (ValueError, OSError) as error:
        raise ValueError(f"{path}: not a readable .npy file ({error})") from None
    if len(shape) != 2 or fortran:
        raise ValueError(f"{path}: expected a C-ordered (N, D) matrix, got shape {shape}"
                         f"{' in Fortran order' if fortran else ''}")  # fmt: skip
    if dtype.hasobject:
        raise ValueError(f"{path}: dtype {dtype} holds Python objects; expected float32 or float16")
    expected = offset + shape[0] * shape[1] * dtype.itemsize
    size = path.stat().st_size
    if size < expected:
        raise ValueError(f"{path}: {size} bytes, its header promises {expected} (a truncated file?)")
    return MatrixFile(path, offset, int(shape[0]), int(shape[1]), dtype)


def read_rows(matrix: MatrixFile, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) as a fresh (stop - start, D) array, read through the page cache."""
    count = max(0, min(stop, matrix.rows) - start)
    with open(matrix.path, "rb") as f:
        f.seek(matrix.offset + start * matrix.row_bytes)
        data = np.fromfile(f, dtype=matrix.dtype, count=count * matrix.dim)
    if data.size != count * matrix.dim:
        raise ValueError(f"{matrix.path}: rows {start}..{stop} could not be read (file truncated?)")
    return data.reshape(count, matrix.dim)


def iter_chunks(
    matrix: MatrixFile, start: int = 0, stop: int | None = None, chunk_rows: int = 0
) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, rows) chunks covering [start, stop) in order."""
    stop = matrix.rows if stop is None else min(stop, matrix.rows)
    step = chunk_rows or matrix.chunk_rows()
    for lo in range(start, stop, step):
        yield lo, read_rows(matrix, lo, min(stop, lo + step))


def read_sample(matrix: MatrixFile, rows: np.ndarray) -> np.ndarray:
    """The given sorted rows (S,) as an (S, D) array, in one sequential pass over the file."""
    out = np.empty((len(rows), matrix.dim), matrix.dtype)
    step = matrix.chunk_rows()
    done = 0
    for lo in range(0, matrix.rows, step):
        hi = min(matrix.rows, lo + step)
        upto = int(np.searchsorted(rows, hi))
        if upto > done:
            out[done:upto] = read_rows(matrix, lo, hi)[rows[done:upto] - lo]
            done = upto
    return out


def write_matrix(path: Path | str, chunks: Iterable[np.ndarray], rows: int, dim: int, dtype: np.dtype) -> None:
    """An (rows, dim) .npy of `dtype` from row chunks in order, written sequentially (not mapped)."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (rows, dim)}
    written = 0
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, header)  # np.load and memory maps read it back
        for chunk in chunks:
            if chunk.ndim != 2 or chunk.shape[1] != dim:
                raise ValueError(f"{path}: a chunk of shape {chunk.shape}, expected (n, {dim})")
            f.write(np.ascontiguousarray(chunk, dtype=dtype).tobytes())
            written += chunk.shape[0]
    if written != rows:
        raise ValueError(f"{path}: {written} rows written, {rows} expected")
