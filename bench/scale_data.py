"""Structured synthetic 768-d vectors standing in for DPR's passage and question embeddings.

No DPR vectors are available offline, so the scale benchmarks index vectors with the structure that
makes approximate search hard or easy: passages belong to one of `topics` topics whose centres lie on a
random 128-dimensional subspace (Wikipedia articles cluster by subject), vary within their topic
along the same subspace, and carry isotropic noise; a question is a random passage plus isotropic
noise, so its true top 10 are its own passage and near neighbours in the same topic. Inner-product
search, unnormalised, as DPR's.

Chunks are generated from (seed, chunk index) alone, so any chunk can be regenerated, a file can be
written in resumable pieces, and the 1M and 21M benchmarks draw from the same distribution.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

DIM = 768
LATENT = 128
CHUNK = 1 << 16  # vectors per generated chunk


class StructuredVectors:
    def __init__(self, dim: int = DIM, topics: int = 8192, seed: int = 0) -> None:
        rng = np.random.default_rng([seed, 0])
        self.dim, self.seed = dim, seed
        self.basis = (rng.standard_normal((LATENT, dim)) / np.sqrt(LATENT)).astype(np.float32)  # (L, D)
        self.centres = (rng.standard_normal((topics, LATENT)).astype(np.float32) @ self.basis)  # (T, D)

    def chunk(self, index: int, rows: int = CHUNK) -> np.ndarray:
        """Passage vectors of chunk `index`: (rows, D) float32."""
        rng = np.random.default_rng([self.seed, 1, index])
        topic = rng.integers(0, len(self.centres), rows)
        within = rng.standard_normal((rows, LATENT), dtype=np.float32) @ self.basis  # (rows, D)
        noise = rng.standard_normal((rows, self.dim), dtype=np.float32)
        return self.centres[topic] + 0.6 * within + 0.4 * noise

    def passages(self, n: int) -> Iterator[np.ndarray]:
        """The first n passage vectors, chunk by chunk."""
        for i, start in enumerate(range(0, n, CHUNK)):
            yield self.chunk(i, min(CHUNK, n - start))

    def queries(self, n: int, count: int, seed: int = 1) -> np.ndarray:
        """`count` questions, each a random passage among the first n plus noise: (count, D) float32."""
        rng = np.random.default_rng([self.seed, 2, seed])
        rows = np.sort(rng.choice(n, size=count, replace=False))
        out = np.empty((count, self.dim), np.float32)
        for c in np.unique(rows // CHUNK):
            sel = np.flatnonzero(rows // CHUNK == c)
            out[sel] = self.chunk(int(c), min(CHUNK, n - int(c) * CHUNK))[rows[sel] % CHUNK]
        return out + 0.5 * rng.standard_normal(out.shape, dtype=np.float32)


def write_vectors(path: Path, n: int, dtype: np.dtype, vectors: StructuredVectors) -> None:
    """The first n vectors as an (n, D) .npy of dtype, written chunk by chunk; a file finished earlier
    (its .done marker) is kept."""
    from rag.npy import open_matrix, write_matrix

    if path.is_file():
        try:
            m = open_matrix(path)
            if (m.rows, m.dim, m.dtype) == (n, vectors.dim, np.dtype(dtype)) and path.with_suffix(".done").is_file():
                return
        except ValueError:
            pass
    write_matrix(path, vectors.passages(n), n, vectors.dim, np.dtype(dtype))
    path.with_suffix(".done").write_text("ok")
