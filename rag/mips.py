"""Exact maximum inner product search as pure numpy functions.

- `topk_rows`: per-row top-k of a score matrix;
- `exact_search`: blocked exact MIPS of queries against an (N, D) matrix, rows masked out by `live`
  never returned (a deleted passage of a live-updated knowledge base);
- `rerank`: exact re-ranking of an approximate index's candidates;
- `merge_topk`: the exact merge of per-part top-k lists (shards, update segments) into one top-k.

Ties are broken by the lower row everywhere, so a search split over parts returns what one search
over the concatenated rows returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_SCORE_BLOCK_BYTES = 64 << 20  # the (B, rows) score block of a batched exact search (numpy path)
_FUSED_BLOCK_BYTES = 16 << 20  # the (query chunk, rows) score block of the fused path
_FUSED_MIN_BATCH = 8  # from this many queries on, blocked torch.mm products with a fused top-k
_CHUNK = 64  # scores per chunk of the fused top-k


class DenseIndexError(ValueError):
    """A bad index folder, a bad query or a bad build input; the message names what is wrong."""


@dataclass(frozen=True)
class SearchResult:
    rows: np.ndarray  # (B, K) int64, best first
    scores: np.ndarray  # (B, K) float32, q . d(z) of the stored embeddings


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
        order = np.lexsort((part, -vals), axis=1)  # best first, then the lower row
        return np.take_along_axis(part, order, 1).astype(np.int64), np.take_along_axis(vals, order, 1)
    m = n // k
    thr = scores[:, : m * k].reshape(b, k, m).max(axis=2).min(axis=1)  # (b,)
    flat = np.flatnonzero(scores >= thr[:, None])  # candidates, row-major
    row, col = np.divmod(flat, n)
    vals = scores.reshape(-1)[flat]
    counts = np.bincount(row, minlength=b)
    if counts.min() < k:  # only NaN scores can break the bound
        raise DenseIndexError("search: scores contain NaN (are the embeddings or queries finite?)")
    order = np.lexsort((-vals, row))  # by row, then best first (stable: the lower column first)
    take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]  # (b, k)
    return col[take].astype(np.int64), vals[take]


def exact_search(
    matrix: np.ndarray,
    queries: np.ndarray,
    k: int,
    block_rows: int = 0,
    query_chunk: int = 256,
    live: np.ndarray | None = None,
    fused: bool | None = None,
) -> SearchResult:
    """Exact MIPS top-k of queries (B, D) float32 against matrix (N, D), streaming over row blocks.

    One query: a matrix-vector product per block (memory-bound sgemv). A few: a matrix product per
    (query chunk, row block) into one reused score buffer, numpy only. _FUSED_MIN_BATCH or more: the
    same blocks through torch.mm with the top-k selected while each block is in cache (_fused_topk).
    Memory stays bounded by query_chunk * block_rows scores whatever N and B are. fused: force the
    path (None: by batch size; the benchmark runs both). live (N,) bool: rows that may
    be returned (None: all); a dead row scores -inf, and so do the slots of a result with fewer than
    k live rows (the caller checks k against the live count).
    """
    n, b = matrix.shape[0], queries.shape[0]
    qc = min(b, query_chunk)
    if (b >= _FUSED_MIN_BATCH) if fused is None else fused:
        block_rows = block_rows if block_rows > 0 else max(_CHUNK * k, _FUSED_BLOCK_BYTES // (4 * qc))
        return _fused_topk(matrix, queries, k, qc, block_rows, live)
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
        dead = None if live is None else np.flatnonzero(~live[start : start + nb])
        r, s = np.empty((b, kb), np.int64), np.empty((b, kb), np.float32)
        if buf is None:
            scores = np.dot(block, queries[0])[None]  # (1, n_b) sgemv
            if dead is not None:
                scores[:, dead] = -np.inf
            r[:], s[:] = topk_rows(scores, kb)
        for q0 in range(0, b if buf is not None else 0, qc):
            q = queries[q0 : q0 + qc]
            out = buf[: q.shape[0] * nb].reshape(q.shape[0], nb)  # contiguous view of the reused buffer
            np.matmul(q, block.T, out=out)  # (qc, n_b) sgemm
            if dead is not None:
                out[:, dead] = -np.inf
            r[q0 : q0 + qc], s[q0 : q0 + qc] = topk_rows(out, kb)
        best_r = np.concatenate([best_r, r + start], axis=1)
        best_s = np.concatenate([best_s, s], axis=1)
        if best_s.shape[1] > k:
            best_r, best_s = _best(best_r, best_s, k)
    return SearchResult(best_r, best_s)


def _fused_topk(matrix: np.ndarray, queries: np.ndarray, k: int, qc: int, block_rows: int,
                live: np.ndarray | None) -> SearchResult:  # fmt: skip
    """Top-k per query from blocked products, selecting while each (qc, n_b) score block is in cache.

    Per block: scores S = Q B^T (torch.mm: MKL's sgemm beats numpy's OpenBLAS at small batches). The
    block's columns are dealt into `c` strided chunks of _CHUNK columns (column j*c + i is in chunk i);
    their maxima (one elementwise pass) are k distinct scores each, so the k-th largest chunk maximum seen
    so far is a threshold that at least k scores reach. Only the chunks whose maximum reaches it are
    scanned, and only their scores at or above it are kept (tens per query in all). The threshold only
    rises, so every score of the final top-k was kept when its block passed; one sort of the kept scores
    (row, then score descending, then column: ties go to the lower row, as in topk_rows) ends it. Dead rows
    (live False) score -inf, as in the numpy path.
    """
    import torch

    n, b = matrix.shape[0], queries.shape[0]
    buf = np.empty(qc * min(block_rows, n), np.float32)  # one reused score block
    buf_t = torch.from_numpy(buf)
    queries_t = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    rows, scores = np.empty((b, k), np.int64), np.empty((b, k), np.float32)
    for q0 in range(0, b, qc):
        q = queries_t[q0 : q0 + qc]
        m = q.shape[0]
        best_max = np.empty((m, 0), np.float32)  # the k largest chunk maxima so far (m, <=k)
        thr = np.full(m, -np.inf, np.float32)
        kept_r, kept_c, kept_s = [], [], []
        for start in range(0, n, block_rows):
            block = np.asarray(matrix[start : start + block_rows], dtype=np.float32)  # (n_b, D)
            nb = block.shape[0]
            torch.mm(q, _readonly_tensor(block).T, out=buf_t[: m * nb].view(m, nb))  # (m, n_b) sgemm
            out = buf[: m * nb].reshape(m, nb)
            if live is not None:
                out[:, ~live[start : start + nb]] = -np.inf  # dead rows: -inf, returned only to fill k
            c = nb // _CHUNK  # chunks of this block (0 for a block narrower than one chunk)
            if c:
                dealt = buf_t[: m * nb].view(m, nb)[:, : c * _CHUNK].view(m, _CHUNK, c)
                maxima = torch.amax(dealt, dim=1).numpy()  # (m, c)
                pool = np.concatenate([best_max, maxima], axis=1)
                best_max = np.partition(pool, pool.shape[1] - k, axis=1)[:, -k:] if pool.shape[1] > k else pool
                if best_max.shape[1] == k:
                    thr = np.maximum(thr, best_max.min(axis=1))
                hit_r, hit_c = np.nonzero(maxima >= thr[:, None])  # chunks that may hold winners
                segment = out[:, : c * _CHUNK].reshape(m, _CHUNK, c)[hit_r, :, hit_c]  # (hits, _CHUNK)
                a, j = np.nonzero(segment >= thr[hit_r, None])
                kept_r.append(hit_r[a])
                kept_c.append(start + j * c + hit_c[a])
                kept_s.append(segment[a, j])
            tail = out[:, c * _CHUNK :]  # (m, n_b mod _CHUNK): scanned directly
            r, col = np.nonzero(tail >= thr[:, None])
            kept_r.append(r)
            kept_c.append(start + c * _CHUNK + col)
            kept_s.append(tail[r, col])
        r, col, s = np.concatenate(kept_r), np.concatenate(kept_c), np.concatenate(kept_s)
        keep = s >= thr[r]
        r, col, s = r[keep], col[keep], s[keep]
        counts = np.bincount(r, minlength=m)
        if counts.min() < k:  # only NaN scores can break the bound (-inf ones pass it: -inf >= -inf)
            raise DenseIndexError("search: scores contain NaN (are the embeddings or queries finite?)")
        order = np.lexsort((col, -s, r))
        take = order[(np.cumsum(counts) - counts)[:, None] + np.arange(k)]  # (m, k)
        rows[q0 : q0 + m], scores[q0 : q0 + m] = col[take], s[take]
    return SearchResult(rows, scores)


def _readonly_tensor(array: np.ndarray):
    """A torch view of a (possibly memory-mapped, read-only) array that is only ever read."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def _best(rows: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best k of each row of a few candidates (b, c), best first, ties to the lower row."""
    order = np.lexsort((rows, -scores), axis=1)[:, :k]
    return np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)


def merge_topk(parts: Sequence[SearchResult], offsets: Sequence[int], k: int) -> SearchResult:
    """The exact top-k over several parts' top-k lists: part i's rows are shifted by offsets[i] into
    one row space, then the best k of the union are kept (ties to the lower row).

    Exact because each part returned its own best k: the global top k holds at most k rows of any
    one part, and those are that part's best. Slots scoring -inf (a part with fewer live rows than
    k) sort last and are returned only when fewer than k live rows exist in all.
    """
    if not parts:
        raise DenseIndexError("merge_topk: no parts to merge")
    rows = np.concatenate([p.rows + off for p, off in zip(parts, offsets, strict=True)], axis=1)  # (B, sum K_i)
    scores = np.concatenate([p.scores for p in parts], axis=1)
    rows, scores = _best(rows, scores, k)
    return SearchResult(rows.astype(np.int64), scores.astype(np.float32))


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
    order = np.lexsort((safe, -scores), axis=1)[:, :k]
    out = np.take_along_axis(scores, order, 1)
    if not np.isfinite(out).all():
        raise DenseIndexError(f"the index proposed fewer than k={k} candidates for some queries")
    return SearchResult(np.take_along_axis(safe, order, 1).astype(np.int64), out)
