"""The retriever p_eta(z|x): top-K passages by maximum inner product q(x) . d(z).

`retrieve` encodes questions with the query encoder q(x), searches the MIPS index and returns one
typed result: the passages' rows, ids, titles and texts, their stored embeddings d(z) and the scores.
No gradients flow here: RAG training recomputes the scores in its own graph from q(x) and the returned
embeddings (the paper keeps d(z) and the index fixed, and so do we).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rag.config import EncoderConfig
from rag.encoders import Encoder, inspect_encoder_dir, load_encoder
from rag.index import DenseIndex
from rag.knowledge import encoder_config, open_knowledge_base
from rag.store import PassageStore


@dataclass(frozen=True)
class Retrieved:
    ids: list[list[str]]  # (B, K) passage ids
    rows: np.ndarray  # (B, K) int64 rows of the index and passage store
    scores: torch.Tensor  # (B, K) float32, q(x) . d(z), best first
    embeddings: torch.Tensor  # (B, K, D) float32, the stored d(z)
    titles: list[list[str]]  # (B, K)
    texts: list[list[str]]  # (B, K)

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return int(self.rows.shape[0])


class Retriever:
    """Index + passage store + query encoder: questions in, top-K passages out."""

    def __init__(self, index: DenseIndex, passages: PassageStore, query_encoder: Encoder) -> None:
        if len(index) != len(passages):
            raise ValueError(f"index has {len(index)} rows but the passage store has {len(passages)}")
        if query_encoder.dim != index.dim:
            raise ValueError(f"query encoder dim {query_encoder.dim} != index dim {index.dim}")
        self.index = index
        self.passages = passages
        self.query_encoder = query_encoder

    @classmethod
    def open(
        cls,
        index_dir: Path | str,
        query_encoder: Encoder | None = None,
        encoder: EncoderConfig | None = None,
        device: str | torch.device = "cpu",
        scale: float | None = None,
    ) -> Retriever:
        """A retriever over a knowledge base folder.

        q(x) is `query_encoder`, else loaded from `encoder`, else a fresh copy of the folder's d(z)
        encoder; `scale` (if given) sets the loaded q(x)'s temperature (EncoderConfig.scale).
        """
        kb = open_knowledge_base(index_dir)
        if query_encoder is None:
            config = encoder or encoder_config(kb.meta)
            config = config if scale is None else dataclasses.replace(config, scale=scale)
            if inspect_encoder_dir(config).kind == "dpr-context":
                raise ValueError(
                    f"{index_dir}: d(z) is a DPR context encoder ({config.path}); give the matching "
                    "DPR question encoder for q(x) (Retriever.open(encoder=...), rag search --query-encoder)"
                )
            query_encoder = load_encoder(config, device)
        return cls(kb.index, kb.passages, query_encoder)

    def retrieve(self, questions: list[str], k: int, batch_size: int = 64) -> Retrieved:
        """Top-k passages for each question: (B,) strings -> Retrieved with (B, K) fields."""
        if isinstance(questions, str):
            raise TypeError("retrieve takes a list of questions, not a single string")
        if len(questions) == 0:
            raise ValueError("retrieve: no questions given")
        q = self.query_encoder.encode(list(questions), batch_size=batch_size)  # (B, D)
        return self.retrieve_vectors(q, k)

    @torch.no_grad()
    def retrieve_vectors(self, q: np.ndarray | torch.Tensor, k: int) -> Retrieved:
        """Top-k passages for query vectors (B, D); scores are q . d(z) of the stored d(z)."""
        if isinstance(q, torch.Tensor):
            q = q.detach().float().cpu().numpy()
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2:
            raise ValueError(f"query vectors must have shape (B, D), got {q.shape}")
        hits = self.index.search(q, k)  # rows (B, K)
        emb = torch.from_numpy(self.index.embeddings(hits.rows))  # (B, K, D)
        scores = torch.einsum("bd,bkd->bk", torch.from_numpy(q), emb)  # (B, K)
        passages = self.passages.get(hits.rows.reshape(-1))
        b, kk = hits.rows.shape
        grid = [passages[i * kk : (i + 1) * kk] for i in range(b)]
        return Retrieved(
            ids=[[p.id for p in row] for row in grid],
            rows=hits.rows,
            scores=scores,
            embeddings=emb,
            titles=[[p.title for p in row] for row in grid],
            texts=[[p.text for p in row] for row in grid],
        )
