"""The MIPS index over the stored passage embeddings d(z).

Row i of the index is passage i of the passage store. Every kind keeps d(z) for each passage in a
`.npy` file (memory-mapped after `load`), so training can recompute scores with gradients and every
returned score equals q . d(z) of the stored vector.

Kinds:
- `flat`: exact search done here, not by FAISS: one matrix-vector product (BLAS sgemv, memory-bound)
  for a single query, and a blocked matrix multiply with a running top-k for batches (compute-bound,
  memory bounded by the block size). FAISS's IndexFlatIP takes a slow non-BLAS path for small batches.
- `hnsw`: FAISS IndexHNSWFlat, inner product.
- `ivfpq`: FAISS IVF-PQ proposes k * rerank_factor candidates; they are re-ranked exactly from the
  stored (float16) embeddings.
- `factory`: any FAISS index_factory string with inner product, candidates re-ranked like ivfpq.

On disk: `embeddings.npy`, `faiss.index` (not for flat) and `meta.json`, written last inside an
atomic folder; `load` refuses a folder whose meta.json is missing or does not match its files.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rag.config import IndexConfig, from_dict, to_dict
from rag.io import atomic_dir, atomic_write_text

FORMAT = "rag-dense-index"
VERSION = 1
EMB_FILE = "embeddings.npy"
FAISS_FILE = "faiss.index"
META_FILE = "meta.json"
_SCORE_BLOCK_BYTES = 64 << 20  # the (B, rows) score block of a batched exact search
_ADD_CHUNK = 65536  # rows handed to FAISS (and copied from shards) at a time


class DenseIndexError(ValueError):
    """A bad index folder, a bad query or a bad build input; the message names what is wrong."""


@dataclass(frozen=True)
class SearchResult:
    rows: np.ndarray  # (B, K) int64, best first
    scores: np.ndarray  # (B, K) float32, q . d(z) of the stored embeddings


def store_dtype(config: IndexConfig) -> np.dtype:
    if config.store_dtype == "auto":
        return np.dtype(np.float16 if config.kind == "ivfpq" else np.float32)
    return np.dtype(config.store_dtype)


# ---------------------------------------------------------------- exact search (pure functions)


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row top-k of scores (b, n), best first -> rows (b, k) int64, values (b, k).

    A full argpartition costs about as much as the matrix product that made the scores, so we first
    find a threshold that at least k entries of each row reach: split the row into k chunks and take
    the smallest of the k chunk maxima. Only the few entries above it (tens for k = 10) are sorted;
    max, compare and flatnonzero are single vectorised passes.
    """
    b, n = scores.shape
    if 8 * k > n:
        part = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.tile(np.arange(n), (b, 1))
        vals = np.take_along_axis(scores, part, 1)
        order = np.argsort(-vals, axis=1, kind="stable")
        return np.take_along_axis(part, order, 1).astype(np.int64), np.take_along_axis(vals, order, 1)
    m = n // k
    thr = scores[:, : m * k].reshape(b, k, m).max(axis=2).min(axis=1)  # (b,)
    flat = np.flatnonzero(scores >= thr[:, None])  # candidates, row-major
    row, col = np.divmod(flat, n)
    vals = scores.reshape(-1)[flat]
    counts = np.bincount(row, minlength=b)
    if counts.min() < k:  # only NaN scores can break the bound
        raise DenseIndexError("search: scores contain NaN (are the embeddings or queries finite?)")
    order = np.lexsort((-vals, row))  # by row, then best first
    take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]  # (b, k)
    return col[take].astype(np.int64), vals[take]


def exact_search(
    matrix: np.ndarray, queries: np.ndarray, k: int, block_rows: int = 0, query_chunk: int = 256
) -> SearchResult:
    """Exact MIPS top-k of queries (B, D) float32 against matrix (N, D), streaming over row blocks.

    One query: a matrix-vector product per block (memory-bound sgemv). Several: a matrix product per
    (query chunk, row block) into one reused score buffer (compute-bound sgemm), so memory stays
    bounded by query_chunk * block_rows scores whatever N and B are.
    """
    n, b = matrix.shape[0], queries.shape[0]
    qc = min(b, query_chunk)
    if block_rows <= 0:
        block_rows = max(4096, _SCORE_BLOCK_BYTES // (4 * qc))
    buf = np.empty(qc * min(block_rows, n), np.float32) if b > 1 else None
    best_r = np.zeros((b, 0), np.int64)  # running top-k (B, <=K)
    best_s = np.zeros((b, 0), np.float32)
    for start in range(0, n, block_rows):
        block = matrix[start : start + block_rows]
        if block.dtype != np.float32:
            block = block.astype(np.float32)
        nb, kb = block.shape[0], min(k, block.shape[0])
        r, s = np.empty((b, kb), np.int64), np.empty((b, kb), np.float32)
        if buf is None:
            r[:], s[:] = topk_rows(np.dot(block, queries[0])[None], kb)  # (1, n_b) sgemv
        for q0 in range(0, b if buf is not None else 0, qc):
            q = queries[q0 : q0 + qc]
            out = buf[: q.shape[0] * nb].reshape(q.shape[0], nb)  # contiguous view of the reused buffer
            np.matmul(q, block.T, out=out)  # (qc, n_b) sgemm
            r[q0 : q0 + qc], s[q0 : q0 + qc] = topk_rows(out, kb)
        best_r = np.concatenate([best_r, r + start], axis=1)
        best_s = np.concatenate([best_s, s], axis=1)
        if best_s.shape[1] > k:
            best_r, best_s = _merge(best_r, best_s, k)
    return SearchResult(best_r, best_s)


def _merge(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of each row of a few candidates (b, c), best first."""
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def rerank(matrix: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> SearchResult:
    """Exact re-ranking of candidate rows (B, C) (-1 = none) by q . d(z); keep the best k."""
    valid = candidates >= 0
    safe = np.where(valid, candidates, 0)
    scores = np.empty(candidates.shape, np.float32)  # (B, C)
    for start in range(0, queries.shape[0], 256):  # bounds the (b, C, D) gather
        rows = safe[start : start + 256]
        emb = np.asarray(matrix[rows.reshape(-1)], dtype=np.float32).reshape(*rows.shape, -1)
        scores[start : start + 256] = np.einsum("bd,bcd->bc", queries[start : start + 256], emb)
    scores[~valid] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(scores, order, 1)
    if not np.isfinite(out).all():
        raise DenseIndexError(f"the index proposed fewer than k={k} candidates for some queries")
    return SearchResult(np.take_along_axis(safe, order, 1).astype(np.int64), out)


# ---------------------------------------------------------------- FAISS construction


def _faiss_index(dim: int, n: int, config: IndexConfig) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if config.kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, config.hnsw_m, ip)
        index.hnsw.efConstruction = config.hnsw_ef_construction
        return index
    if config.kind == "ivfpq":
        lists = config.ivf_lists or max(1, int(4 * math.sqrt(n)))
        m = config.pq_subquantizers or max(1, dim // 4)
        if dim % m:
            raise DenseIndexError(f"ivfpq: dim {dim} is not a multiple of pq_subquantizers {m}")
        if n < 256:
            raise DenseIndexError(f"ivfpq needs at least 256 vectors to train its 8-bit codebooks, got {n}")
        index = faiss.index_factory(dim, f"IVF{min(lists, n)},PQ{m}x8", ip)
        # polysemous training only helps Hamming-distance filtering, which we do not use, and it
        # dominates the training time
        faiss.downcast_index(faiss.extract_index_ivf(index)).do_polysemous_training = False
        return index
    if config.kind == "factory":
        if not config.factory:
            raise DenseIndexError("kind 'factory' needs IndexConfig.factory (a FAISS index_factory string)")
        return faiss.index_factory(dim, config.factory, ip)
    raise DenseIndexError(f"unknown index kind {config.kind!r} (flat, hnsw, ivfpq, factory)")


def _fill_faiss(matrix: np.ndarray, config: IndexConfig) -> faiss.Index:
    """Train (on an evenly spread sample) and add all rows of matrix, chunk by chunk."""
    n, dim = matrix.shape
    index = _faiss_index(dim, n, config)
    if not index.is_trained:
        # 40 points per centroid of the largest codebook (PQ: 256) is enough, and k-means cost is linear
        lists = faiss.extract_index_ivf(index).nlist if config.kind == "ivfpq" else 0
        sample = np.linspace(0, n - 1, min(n, max(256 * 40, 40 * lists))).astype(np.int64)
        index.train(np.ascontiguousarray(matrix[sample], dtype=np.float32))
    for start in range(0, n, _ADD_CHUNK):
        index.add(np.ascontiguousarray(matrix[start : start + _ADD_CHUNK], dtype=np.float32))
    return index


def _set_search_params(index: faiss.Index, config: IndexConfig) -> None:
    if config.kind == "hnsw":
        index.hnsw.efSearch = config.hnsw_ef_search
    elif config.kind in ("ivfpq", "factory"):
        try:
            faiss.extract_index_ivf(index).nprobe = config.nprobe
        except RuntimeError:  # a factory index that has no inverted lists
            pass


# ---------------------------------------------------------------- the index


class DenseIndex:
    """Inner-product index over N stored passage embeddings of dimension D; row i = passage i."""

    def __init__(
        self,
        embeddings: np.ndarray,
        config: IndexConfig,
        faiss_index: faiss.Index | None,
        faiss_bytes: int | None = None,  # known file size; else measured by serialising the index
    ) -> None:
        self.config = config
        self._emb = embeddings  # (N, D) in store_dtype(config), maybe memory-mapped
        self._faiss = faiss_index  # may be shared by views from with_search_params
        if faiss_bytes is None:
            faiss_bytes = 0 if faiss_index is None else len(faiss.serialize_index(faiss_index))
        self._faiss_bytes = faiss_bytes

    # -- construction
    @classmethod
    def build(cls, embeddings: np.ndarray, config: IndexConfig) -> DenseIndex:
        emb = _check_matrix(np.asarray(embeddings), "embeddings")
        stored = np.ascontiguousarray(emb, dtype=store_dtype(config))
        return cls(stored, config, None if config.kind == "flat" else _fill_faiss(stored, config))

    @classmethod
    def build_from_shards(
        cls, shards: Sequence[Path | str], config: IndexConfig, out_dir: Path | str
    ) -> DenseIndex:
        """Stream shard .npy files (each (n_i, D), in order) into out_dir; returns the loaded index.

        The shards are read memory-mapped and copied chunk by chunk into the final memory-mapped
        embeddings file, so nothing is held twice in RAM. The folder appears only when complete.
        """
        if not shards:
            raise DenseIndexError("build_from_shards: no shard files given")
        arrays = [_check_matrix(np.load(p, mmap_mode="r"), str(p)) for p in shards]
        dims = {a.shape[1] for a in arrays}
        if len(dims) != 1:
            raise DenseIndexError(f"shards disagree on the embedding dim: {sorted(dims)} ({shards})")
        n, dim = sum(a.shape[0] for a in arrays), dims.pop()
        with atomic_dir(out_dir) as tmp:
            out = np.lib.format.open_memmap(tmp / EMB_FILE, "w+", store_dtype(config), (n, dim))
            row = 0
            for arr in arrays:
                for start in range(0, arr.shape[0], _ADD_CHUNK):
                    chunk = arr[start : start + _ADD_CHUNK]
                    out[row : row + chunk.shape[0]] = chunk
                    row += chunk.shape[0]
            out.flush()
            index = None if config.kind == "flat" else _fill_faiss(out, config)
            del out
            _write_rest(tmp, index, config, n, dim)
        return cls.load(out_dir)

    # -- persistence
    def save(self, path: Path | str) -> None:
        """Write the index folder atomically; meta.json is written last."""
        with atomic_dir(path) as tmp:
            np.save(tmp / EMB_FILE, self._emb)
            _write_rest(tmp, self._faiss, self.config, len(self), self.dim)

    @classmethod
    def load(cls, path: Path | str) -> DenseIndex:
        path = Path(path)
        meta = read_meta(path)
        emb = np.load(path / EMB_FILE, mmap_mode="r")
        if emb.shape != (meta["count"], meta["dim"]) or str(emb.dtype) != meta["store_dtype"]:
            raise DenseIndexError(
                f"{path / EMB_FILE}: shape {emb.shape} {emb.dtype} does not match {path / META_FILE} "
                f"({meta['count']}, {meta['dim']}) {meta['store_dtype']}"
            )
        config = from_dict(IndexConfig, meta["config"])
        index = faiss.read_index(str(path / FAISS_FILE)) if config.kind != "flat" else None
        if index is not None and index.ntotal != meta["count"]:
            raise DenseIndexError(
                f"{path / FAISS_FILE}: {index.ntotal} vectors, meta.json says {meta['count']}"
            )
        return cls(emb, config, index, (path / FAISS_FILE).stat().st_size if index is not None else 0)

    def with_search_params(self, **changes: Any) -> DenseIndex:
        """The same stored data with other search-time settings (nprobe, hnsw_ef_search, rerank_factor)."""
        import dataclasses

        config = dataclasses.replace(self.config, **changes)
        return DenseIndex(self._emb, config, self._faiss, self._faiss_bytes)

    # -- queries
    def __len__(self) -> int:
        return int(self._emb.shape[0])

    @property
    def dim(self) -> int:
        return int(self._emb.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes of the index, stored embeddings included."""
        return int(self._emb.nbytes) + self._faiss_bytes

    def embeddings(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """Stored d(z) for rows of any shape (...) -> (..., D) float32."""
        rows = np.asarray(rows)
        if rows.dtype.kind not in "iu":
            raise DenseIndexError(f"embeddings: rows must be integers, got {rows.dtype}")
        if rows.size and (rows.min() < 0 or rows.max() >= len(self)):
            raise DenseIndexError(
                f"embeddings: rows must lie in [0, {len(self)}), got {rows.min()}..{rows.max()}"
            )
        flat = np.asarray(self._emb[rows.reshape(-1)], dtype=np.float32)
        return flat.reshape(*rows.shape, self.dim)

    def search(self, queries: np.ndarray, k: int) -> SearchResult:
        """Top-k rows by inner product for queries (B, D) float32, best first."""
        q = self._check_queries(queries, k)
        if self._faiss is None:
            return exact_search(self._emb, q, k)
        c = k if self.config.kind == "hnsw" else min(len(self), k * max(1, self.config.rerank_factor))
        _set_search_params(self._faiss, self.config)  # per call: views share one FAISS object
        _, cand = self._faiss.search(q, c)  # (B, C) candidate rows, -1 where none
        return rerank(self._emb, q, cand, k)

    def _check_queries(self, queries: np.ndarray, k: int) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DenseIndexError(f"search: queries must have shape (B, {self.dim}), got {q.shape}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= len(self):
            raise DenseIndexError(f"search: k must be an int in [1, {len(self)}], got {k!r}")
        if q.dtype.kind != "f":
            raise DenseIndexError(f"search: queries must be floating point, got {q.dtype}")
        return np.ascontiguousarray(q, dtype=np.float32)


# ---------------------------------------------------------------- helpers


def _check_matrix(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DenseIndexError(f"{name}: expected a non-empty (N, D) matrix, got shape {a.shape}")
    if a.dtype.kind != "f":
        raise DenseIndexError(f"{name}: expected floating point embeddings, got {a.dtype}")
    return a


def _write_rest(tmp: Path, index: faiss.Index | None, config: IndexConfig, n: int, dim: int) -> None:
    """FAISS file, then meta.json last: its presence marks the folder complete."""
    if index is not None:
        faiss.write_index(index, str(tmp / FAISS_FILE))
    files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "count": n,
        "dim": dim,
        "store_dtype": str(store_dtype(config)),
        "config": to_dict(config),
        "files": files,
    }
    atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


def read_meta(path: Path | str) -> dict[str, Any]:
    """meta.json of an index folder, checked against the files beside it."""
    path = Path(path)
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise DenseIndexError(f"{path}: no {META_FILE}; not a finished index (an interrupted build?)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DenseIndexError(f"{meta_path}: not valid JSON ({e})") from e
    missing = [k for k in ("format", "count", "dim", "store_dtype", "config", "files") if k not in meta]
    if missing or meta.get("format") != FORMAT:
        raise DenseIndexError(f"{meta_path}: not a {FORMAT} meta file (missing {missing})")
    for name, size in meta["files"].items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            raise DenseIndexError(f"{f}: missing or not {size} bytes as {meta_path} records")
    return meta
