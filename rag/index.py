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

IVF kinds may keep their inverted lists on disk (`IndexConfig.ondisk_lists`: faiss
OnDiskInvertedLists, memory-mapped): then only the coarse quantizer and the PQ tables live in RAM.

Building from a file (`build_from_file`) streams: the training sample and every chunk added are read
with plain file IO (rag.npy), so peak memory is the sample plus one chunk whatever N is; on-disk
lists are added block by block into block files (kept in a stages folder, so an interrupted build
resumes at the next block) and merged into one lists file (faiss.contrib.ondisk).

Searches take an optional `live` mask (N,) bool: rows that may be returned. Dead rows (deleted
passages of a live-updated knowledge base) are skipped inside the search (exact search: scored -inf;
FAISS: an IDSelectorBitmap), so results equal those of an index without them.

On disk: `embeddings.npy`, `faiss.index` (not for flat), `lists.ivfdata` (on-disk lists) and
`meta.json`, written last inside an atomic folder; `load` refuses a folder whose meta.json is
missing or does not match its files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import mmap
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from rag.config import IndexConfig, from_dict, to_dict
from rag.io import atomic_dir, atomic_path, atomic_write_text
from rag.mips import DenseIndexError, SearchResult, exact_search, rerank, topk_rows
from rag.npy import MatrixFile, iter_chunks, open_matrix, read_sample, write_matrix

__all__ = ["DenseIndex", "DenseIndexError", "SearchResult", "exact_search", "rerank", "topk_rows",
           "store_dtype", "read_meta"]  # fmt: skip

FORMAT = "rag-dense-index"
VERSION = 1
EMB_FILE = "embeddings.npy"
FAISS_FILE = "faiss.index"
IVFDATA_FILE = "lists.ivfdata"
TRAINED_FILE = "trained.index"  # IVF kinds: the trained index without vectors (update segments add to a copy)
META_FILE = "meta.json"
_ADD_CHUNK = 65536  # rows handed to FAISS at a time


def store_dtype(config: IndexConfig) -> np.dtype:
    if config.store_dtype == "auto":
        return np.dtype(np.float16 if config.kind == "ivfpq" else np.float32)
    return np.dtype(config.store_dtype)


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
        try:
            return faiss.index_factory(dim, config.factory, ip)
        except RuntimeError as error:
            raise DenseIndexError(f"factory string {config.factory!r}: {error}") from None
    raise DenseIndexError(f"unknown index kind {config.kind!r} (flat, hnsw, ivfpq, factory)")


def is_index_folder(path: Path) -> bool:
    """Whether `path` holds a DenseIndex folder (its meta.json says so): what save may replace."""
    try:
        meta = json.loads((Path(path) / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def check_buildable(config: IndexConfig, n: int, dim: int) -> None:
    """Fail now, not after hours of encoding, on a config that cannot index n rows of dim D."""
    if config.kind != "flat":
        index = _faiss_index(dim, n, config)
        if config.ondisk_lists and _ivf(index) is None:
            raise DenseIndexError(f"ondisk_lists needs an IVF index; {config.kind} "
                                  f"{config.factory!r} has no inverted lists")  # fmt: skip


def _ivf(index: faiss.Index) -> Any:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:  # an index without inverted lists
        return None


def training_rows(n: int, index: faiss.Index) -> np.ndarray:
    """An evenly spread sample of rows to train on: 40 points per centroid of the largest codebook
    (PQ: 256; IVF: its lists) is enough, and k-means cost is linear in the sample."""
    ivf = _ivf(index)
    lists = ivf.nlist if ivf is not None else 0
    return np.unique(np.linspace(0, n - 1, min(n, max(256 * 40, 40 * lists))).astype(np.int64))


def _fill_faiss(matrix: np.ndarray, config: IndexConfig) -> faiss.Index:
    """Train (on an evenly spread sample) and add all rows of an in-memory matrix, chunk by chunk."""
    n, dim = matrix.shape
    index = _faiss_index(dim, n, config)
    if not index.is_trained:
        index.train(np.ascontiguousarray(matrix[training_rows(n, index)], dtype=np.float32))
    for start in range(0, n, _ADD_CHUNK):
        add_rows(index, matrix[start : start + _ADD_CHUNK])
    return index


def add_rows(index: faiss.Index, rows: np.ndarray, ids: np.ndarray | None = None) -> None:
    """index.add (or add_with_ids), with the heavy arithmetic of an IVF index over a flat coarse
    quantizer done by numpy's BLAS: the list assignment (the argmax of the quantizer's own search)
    and, for IVF-PQ with 8-bit codes, the PQ encoding of the residuals (nearest sub-centroid). The
    faiss-cpu wheel's bundled BLAS runs at about a quarter of numpy's on one core here, and FAISS
    encodes sub-vectors of under 16 dimensions without BLAS at all; together these are nearly all of
    an add's work (21M x 768: hours on one core)."""
    x = np.ascontiguousarray(rows, dtype=np.float32)
    xids = None if ids is None else np.ascontiguousarray(ids, dtype=np.int64)
    quantizer = faiss.downcast_index(index.quantizer) if isinstance(index, faiss.IndexIVF) else None
    if not isinstance(quantizer, faiss.IndexFlat) or quantizer.metric_type not in (faiss.METRIC_INNER_PRODUCT, faiss.METRIC_L2):
        index.add(x) if xids is None else index.add_with_ids(x, xids)
        return
    centroids = quantizer.reconstruct_n(0, quantizer.ntotal)  # (L, D)
    # L2: argmin |x - c|^2 = argmax x.c - |c|^2 / 2
    offset = -0.5 * np.einsum("ld,ld->l", centroids, centroids) if quantizer.metric_type == faiss.METRIC_L2 else 0.0

    def nearest_list(block: np.ndarray) -> np.ndarray:  # (b, D) -> (b,) the list each row goes to
        return (block @ centroids.T + offset).argmax(1)

    pq = index.pq if isinstance(index, faiss.IndexIVFPQ) and index.pq.nbits == 8 else None
    if pq is None:
        assign = np.empty(len(x), np.int64)
        for lo in range(0, len(x), 4096):  # (4096, L) scores at a time: bounded memory
            assign[lo : lo + 4096] = nearest_list(x[lo : lo + 4096])
        index.add_core(len(x), faiss.swig_ptr(x), None if xids is None else faiss.swig_ptr(xids), faiss.swig_ptr(assign))
        return
    codebooks = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)  # (M, 256, D / M)
    half_norms = 0.5 * np.einsum("mkd,mkd->mk", codebooks, codebooks)[:, None, :]  # (M, 1, 256)
    codebooks_t = np.ascontiguousarray(codebooks.transpose(0, 2, 1))  # (M, D / M, 256)
    coarse = index.coarse_code_size()  # the list number, little-endian, before each PQ code
    codes = np.empty((len(x), coarse + pq.M), np.uint8)
    for lo in range(0, len(x), 4096):  # (4096, L) coarse scores at a time: bounded memory
        block = x[lo : lo + 4096]
        assign = nearest_list(block)  # (b,)
        residual = block - centroids[assign] if index.by_residual else block  # (b, D)
        codes[lo : lo + len(block), :coarse] = assign[:, None].astype("<u8").view(np.uint8).reshape(-1, 8)[:, :coarse]
        for at in range(0, len(block), 128):  # (M, 128, 256) distances stay in cache: 3x faster than 1024 rows
            sub = residual[at : at + 128].reshape(-1, pq.M, pq.dsub).transpose(1, 0, 2)  # (M, r, D / M)
            distances = sub @ codebooks_t  # (M, r, 256)
            # nearest sub-centroid: argmin |r - c|^2 = argmax r.c - |c|^2 / 2
            distances -= half_norms
            codes[lo + at : lo + at + len(sub[0]), coarse:] = distances.argmax(2).T
    index.add_sa_codes(codes, xids)


def _faiss_from_file(matrix: MatrixFile, config: IndexConfig, out: Path, stages: Path,
                     progress: bool) -> faiss.Index:  # fmt: skip
    """Train on a sample read from the file, then add it chunk by chunk (on-disk lists: block by
    block into stages/, then merged into out/lists.ivfdata). Finished stages are reused; each
    phase's CPU and wall seconds are appended to stages/timings.jsonl."""
    stages.mkdir(parents=True, exist_ok=True)
    trained_path = stages / "trained.index"
    if trained_path.is_file():
        index = faiss.read_index(str(trained_path))
    else:
        with _timed(stages, "train"):
            index = _faiss_index(matrix.dim, matrix.rows, config)
            if not index.is_trained:
                index.train(np.ascontiguousarray(read_sample(matrix, training_rows(matrix.rows, index)), np.float32))
        _write_faiss(index, trained_path)
    bar = _bar(progress, matrix.rows, "adding to the index")
    try:
        if not config.ondisk_lists:
            with _timed(stages, "add", rows=matrix.rows):
                for _, chunk in iter_chunks(matrix, chunk_rows=_ADD_CHUNK):
                    add_rows(index, chunk)
                    _tick(bar, len(chunk))
            return index
        blocks = []
        for i, lo in enumerate(range(0, matrix.rows, config.ondisk_block_rows)):
            hi = min(matrix.rows, lo + config.ondisk_block_rows)
            blocks.append(stages / f"block-{i:05d}.index")
            if not blocks[-1].is_file():
                with _timed(stages, "add", rows=hi - lo, block=i):
                    block = faiss.clone_index(index)
                    for start, chunk in iter_chunks(matrix, lo, hi, chunk_rows=_ADD_CHUNK):
                        ids = np.arange(start, start + len(chunk), dtype=np.int64)  # global rows
                        add_rows(block, chunk, ids)
                    _write_faiss(block, blocks[-1])
                    del block
            _tick(bar, hi - lo)
    finally:
        if bar is not None:
            bar.close()
    from faiss.contrib.ondisk import merge_ondisk

    with _timed(stages, "merge", rows=matrix.rows):
        merge_ondisk(index, [str(b) for b in blocks], str(out / IVFDATA_FILE))
    return index


@contextlib.contextmanager
def _timed(stages: Path, phase: str, **facts: int) -> Iterator[None]:
    """Append the phase's CPU and wall seconds to stages/timings.jsonl (benchmarks read them)."""
    import time

    cpu, wall = time.process_time(), time.perf_counter()
    yield
    record = {"phase": phase, **facts, "cpu_s": round(time.process_time() - cpu, 3),
              "wall_s": round(time.perf_counter() - wall, 3)}  # fmt: skip
    with open(stages / "timings.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _write_faiss(index: faiss.Index, path: Path) -> None:
    with atomic_path(path) as tmp:
        faiss.write_index(index, str(tmp))


def _bar(progress: bool, total: int, desc: str) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="row")


def _tick(bar: Any, n: int) -> None:
    if bar is not None:
        bar.update(n)


def _search_params(index: faiss.Index, config: IndexConfig, selector: Any) -> Any:
    """Per-call FAISS search parameters (nprobe, efSearch, the live-row selector): views made by
    with_search_params share one FAISS object, so nothing is set on it."""
    base = faiss.downcast_index(index)
    if isinstance(base, faiss.IndexPreTransform):
        return faiss.SearchParametersPreTransform(index_params=_search_params(base.index, config, selector))
    if isinstance(base, faiss.IndexHNSW):
        return faiss.SearchParametersHNSW(efSearch=config.hnsw_ef_search, sel=selector)
    if isinstance(base, faiss.IndexIVF):
        return faiss.SearchParametersIVF(nprobe=config.nprobe, sel=selector)
    return faiss.SearchParameters(sel=selector) if selector is not None else None


# ---------------------------------------------------------------- the index


class DenseIndex:
    """Inner-product index over N stored passage embeddings of dimension D; row i = passage i."""

    def __init__(
        self,
        embeddings: np.ndarray,
        config: IndexConfig,
        faiss_index: faiss.Index | None,
        faiss_bytes: int | None = None,  # known file sizes; else measured by serialising the index
    ) -> None:
        self.config = config
        self._emb = embeddings  # (N, D) in store_dtype(config), maybe memory-mapped
        self._faiss = faiss_index  # may be shared by views from with_search_params
        if faiss_bytes is None:
            faiss_bytes = 0 if faiss_index is None else len(faiss.serialize_index(faiss_index))
        self._faiss_bytes = faiss_bytes
        self.path: Path | None = None  # the folder it was loaded from

    # -- construction
    @classmethod
    def build(cls, embeddings: np.ndarray, config: IndexConfig) -> DenseIndex:
        """An in-memory index over an (N, D) matrix (on-disk lists need build_from_file)."""
        emb = _check_matrix(np.asarray(embeddings), "embeddings")
        if config.ondisk_lists:
            raise DenseIndexError("ondisk_lists: build the index from a file (DenseIndex.build_from_file)")
        stored = np.ascontiguousarray(emb, dtype=store_dtype(config))
        return cls(stored, config, None if config.kind == "flat" else _fill_faiss(stored, config))

    @classmethod
    def build_from_file(
        cls,
        embeddings: Path | str,
        config: IndexConfig,
        out_dir: Path | str,
        stages: Path | str | None = None,
        progress: bool = False,
    ) -> DenseIndex:
        """Index an (N, D) .npy already in store_dtype(config), streaming; returns the loaded index.

        The file becomes the folder's embeddings.npy by a hard link where it can (no copy of a
        multi-GB matrix; the index never writes to it), else by a copy. `stages` keeps the trained
        index and on-disk list blocks of an interrupted build (default: a temporary folder).
        """
        matrix = open_matrix(embeddings)
        _check_shape(matrix.rows, matrix.dim, str(embeddings))
        if matrix.dtype != store_dtype(config):
            raise DenseIndexError(f"{embeddings}: dtype {matrix.dtype}, the index stores {store_dtype(config)}")
        check_buildable(config, matrix.rows, matrix.dim)
        with _stages(stages, Path(out_dir)) as stage_dir, atomic_dir(out_dir, replaces=is_index_folder) as tmp:
            link_or_copy(matrix.path, tmp / EMB_FILE)
            index = None
            if config.kind != "flat":
                index = _faiss_from_file(open_matrix(tmp / EMB_FILE), config, tmp, stage_dir, progress)
            if index is not None and config.ondisk_lists:
                link_or_copy(stage_dir / TRAINED_FILE, tmp / TRAINED_FILE)
            _write_rest(tmp, index, config, matrix.rows, matrix.dim)
            del index
        return cls.load(out_dir)

    @classmethod
    def build_from_shards(
        cls, shards: Sequence[Path | str], config: IndexConfig, out_dir: Path | str, progress: bool = False
    ) -> DenseIndex:
        """Stream shard .npy files (each (n_i, D), in order) into one index folder at out_dir.

        The shards are read chunk by chunk into one embeddings file (rag.npy: nothing is held in
        RAM but a chunk), which is then indexed by build_from_file. The folder appears when complete.
        """
        if not shards:
            raise DenseIndexError("build_from_shards: no shard files given")
        files = [open_matrix(p) for p in shards]
        for f in files:
            _check_shape(f.rows, f.dim, str(f.path))
            if f.dtype.kind != "f":
                raise DenseIndexError(f"{f.path}: expected floating point embeddings, got {f.dtype}")
        dims = {f.dim for f in files}
        if len(dims) != 1:
            raise DenseIndexError(f"shards disagree on the embedding dim: {sorted(dims)} ({shards})")
        n, dim = sum(f.rows for f in files), dims.pop()
        check_buildable(config, n, dim)
        out_dir = Path(out_dir)
        with _stages(None, out_dir) as work:
            chunks = (chunk for f in files for _, chunk in iter_chunks(f))
            write_matrix(work / EMB_FILE, chunks, n, dim, store_dtype(config))
            return cls.build_from_file(work / EMB_FILE, config, out_dir, work / "stages", progress)

    # -- persistence
    def save(self, path: Path | str) -> None:
        """Write the index folder atomically; meta.json is written last."""
        if self.config.ondisk_lists:
            raise DenseIndexError("an index with on-disk lists is saved where it is built (build_from_file)")
        with atomic_dir(path, replaces=is_index_folder) as tmp:
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
        index = None
        if config.kind != "flat":
            _advise_random(emb)
            flags = faiss.IO_FLAG_ONDISK_SAME_DIR if config.ondisk_lists else 0  # lists beside the index
            try:
                index = faiss.read_index(str(path / FAISS_FILE), flags)
            except RuntimeError as error:
                raise DenseIndexError(f"{path / FAISS_FILE}: not a readable FAISS index ({error})") from None
        if index is not None and index.ntotal != meta["count"]:
            raise DenseIndexError(
                f"{path / FAISS_FILE}: {index.ntotal} vectors, meta.json says {meta['count']}"
            )
        faiss_bytes = sum(size for name, size in meta["files"].items() if name in (FAISS_FILE, IVFDATA_FILE))
        loaded = cls(emb, config, index, faiss_bytes)
        loaded.path = path
        return loaded

    def build_segment(self, embeddings: np.ndarray, out_dir: Path | str) -> DenseIndex:
        """An index folder over new rows (an update segment) of the same kind and settings: IVF kinds
        add them to a copy of this index's trained quantizer and codebooks (no retraining, any count);
        HNSW builds its own graph; lists are held in RAM (segments are small)."""
        config = dataclasses.replace(self.config, ondisk_lists=False)
        emb = _check_matrix(np.asarray(embeddings), "embeddings")
        if emb.shape[1] != self.dim:
            raise DenseIndexError(f"segment: vectors of dim {emb.shape[1]}, the index has {self.dim}")
        stored = np.ascontiguousarray(emb, dtype=store_dtype(config))
        if self._faiss is None or self.config.kind == "hnsw":
            segment = DenseIndex(stored, config, None if self._faiss is None else _fill_faiss(stored, config))
        else:
            trained = self.path / TRAINED_FILE if self.path is not None else None
            if trained is None or not trained.is_file():
                raise DenseIndexError(f"{self.path}: no {TRAINED_FILE} to add new rows to (rebuild the index)")
            index = faiss.read_index(str(trained))
            for start in range(0, len(stored), _ADD_CHUNK):
                add_rows(index, stored[start : start + _ADD_CHUNK])
            segment = DenseIndex(stored, config, index)
        segment.save(out_dir)
        return DenseIndex.load(out_dir)

    def with_search_params(self, **changes: Any) -> DenseIndex:
        """The same stored data with other search-time settings (nprobe, hnsw_ef_search, rerank_factor)."""
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
        """Bytes of the index, stored embeddings (and on-disk lists) included."""
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

    def search(self, queries: np.ndarray, k: int, live: np.ndarray | None = None) -> SearchResult:
        """Top-k rows by inner product for queries (B, D) float32, best first; only rows where
        live (N,) bool is True when it is given."""
        available = len(self) if live is None else int(np.count_nonzero(live))
        q = self._check_queries(queries, k, available)
        if live is not None and live.shape != (len(self),):
            raise DenseIndexError(f"search: live mask of shape {live.shape}, expected ({len(self)},)")
        if self._faiss is None:
            return exact_search(self._emb, q, k, live=live)
        c = k if self.config.kind == "hnsw" else min(available, k * max(1, self.config.rerank_factor))
        selector = None
        if live is not None:
            bitmap = np.packbits(live, bitorder="little")  # faiss: bit i & 7 of byte i >> 3
            selector = faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(bitmap))
        params = _search_params(self._faiss, self.config, selector)
        try:
            _, cand = self._faiss.search(q, c, params=params)  # (B, C) candidate rows, -1 where none
        except RuntimeError as error:
            raise DenseIndexError(f"search: {self.config.kind} index: {error}") from None
        return rerank(self._emb, q, cand, k)

    def _check_queries(self, queries: np.ndarray, k: int, available: int) -> np.ndarray:
        q = np.asarray(queries)
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DenseIndexError(f"search: queries must have shape (B, {self.dim}), got {q.shape}")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= available:
            raise DenseIndexError(f"search: k must be an int in [1, {available}], got {k!r}")
        if q.dtype.kind != "f":
            raise DenseIndexError(f"search: queries must be floating point, got {q.dtype}")
        return np.ascontiguousarray(q, dtype=np.float32)


# ---------------------------------------------------------------- helpers


def _advise_random(emb: np.ndarray) -> None:
    """HNSW and IVF-PQ read the stored vectors only to score scattered candidates exactly. Without
    this advice each page fault reads ahead far more than one row, and a store larger than the page
    cache thrashes: 21M x 768 float16 read 1.6 GB/s from disk at 500 candidates per query
    (bench/bench_21m.py). Exact (flat) search scans in order, and keeps the read-ahead."""
    mapped = getattr(emb, "_mmap", None)
    if mapped is not None and hasattr(mmap, "MADV_RANDOM"):
        mapped.madvise(mmap.MADV_RANDOM)


def _check_shape(n: int, dim: int, name: str) -> None:
    if n == 0 or dim == 0:
        raise DenseIndexError(f"{name}: expected a non-empty (N, D) matrix, got shape ({n}, {dim})")


def _check_matrix(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DenseIndexError(f"{name}: expected a non-empty (N, D) matrix, got shape {a.shape}")
    if a.dtype.kind != "f":
        raise DenseIndexError(f"{name}: expected floating point embeddings, got {a.dtype}")
    return a


@contextlib.contextmanager
def _stages(stages: Path | str | None, out_dir: Path) -> Iterator[Path]:
    """The given stages folder (kept: the caller resumes from it), or a temporary one beside out_dir."""
    if stages is not None:
        Path(stages).mkdir(parents=True, exist_ok=True)
        yield Path(stages)
        return
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".stages", dir=out_dir.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (no copy of a multi-GB file), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_rest(tmp: Path, index: faiss.Index | None, config: IndexConfig, n: int, dim: int) -> None:
    """FAISS file (and an IVF's trained copy without vectors), then meta.json last: its presence
    marks the folder complete."""
    if index is not None:
        faiss.write_index(index, str(tmp / FAISS_FILE))
        if _ivf(index) is not None and not (tmp / TRAINED_FILE).exists():
            empty = faiss.clone_index(index)  # in-memory lists: the copy is as large, briefly
            empty.reset()
            faiss.write_index(empty, str(tmp / TRAINED_FILE))
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
