"""The retriever p_eta(z|x): questions in, the top-K passages and the logits of p(z|x) out.

Three retrievers, one interface (`retrieve(questions, k)`) and one typed result, `Retrieved`:
- `Retriever` (dense, the paper's): top-K by maximum inner product q(x) . d(z) over the MIPS index;
- `BM25Retriever`: top-K by BM25 (rag.bm25) over the same passage store; the logits are the BM25
  scores / a temperature, and cannot learn (the paper's Table 6 ablation);
- `HybridRetriever`: both, fused (rag.fusion: reciprocal-rank fusion or score interpolation, chosen on
  development data and stored in the knowledge base); logits w * q(x).d(z) + (1 - w) * BM25 / T.
`open_retriever` opens any of them over a knowledge base folder by RetrieverConfig.kind.

The logits are `scores` = query_weight * q(x).d(z) + fixed_logits: no gradients flow here, and RAG
training recomputes the q(x) part in its own graph from q(x) and the returned embeddings (the paper keeps
d(z) and the index fixed, and so do we); the fixed part (BM25's) stays a constant.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rag.bm25 import BM25Index, open_bm25_index
from rag.config import EncoderConfig, FusionConfig, RetrieverConfig
from rag.encoders import Encoder, load_encoder
from rag.fusion import Candidates, fuse, fused_scores, load_fusion, union_candidates
from rag.index import DenseIndex
from rag.knowledge import KnowledgeBase, data_version, open_knowledge_base, query_encoder_config
from rag.mips import topk_rows
from rag.shards import PartedIndex, PartedPassages
from rag.store import PassageStore


@dataclass(frozen=True)
class Retrieved:
    ids: list[list[str]]  # (B, K) passage ids
    rows: np.ndarray  # (B, K) int64 rows of the index and passage store, best first
    scores: torch.Tensor  # (B, K) float32 logits of p(z|x): query_weight * q(x).d(z) + fixed_logits
    embeddings: torch.Tensor  # (B, K, D) float32, the stored d(z); (B, K, 0) for BM25 alone
    titles: list[list[str]]  # (B, K)
    texts: list[list[str]]  # (B, K)
    # What of the logits does not come from q(x) (BM25's share), and q(x).d(z)'s weight in them:
    # dense None and 1.0, BM25 its logits and 0.0, hybrid (1 - w) * BM25 / T and w.
    fixed_logits: torch.Tensor | None = None  # (B, K) float32
    query_weight: float = 1.0
    # The score the list is ordered by where it is not `scores` (hybrid: the fusion's), else None.
    ranking_scores: torch.Tensor | None = None  # (B, K) float32, best first

    @property
    def k(self) -> int:
        return int(self.rows.shape[1])

    def __len__(self) -> int:
        return int(self.rows.shape[0])


def _check_questions(questions: list[str]) -> None:
    if isinstance(questions, str):
        raise TypeError("retrieve takes a list of questions, not a single string")
    if len(questions) == 0:
        raise ValueError("retrieve: no questions given")
    empty = [i for i, q in enumerate(questions) if not isinstance(q, str) or not q.strip()]
    if empty:
        raise ValueError(f"retrieve: question {empty[0]} is empty")


def _assemble(passages: PassageStore, rows: np.ndarray, scores: torch.Tensor, embeddings: torch.Tensor,
              fixed_logits: torch.Tensor | None = None, query_weight: float = 1.0,
              ranking_scores: torch.Tensor | None = None) -> Retrieved:  # fmt: skip
    """The typed result for rows (B, K) of the passage store."""
    got = passages.get(rows.reshape(-1))
    b, kk = rows.shape
    grid = [got[i * kk : (i + 1) * kk] for i in range(b)]
    return Retrieved(
        ids=[[p.id for p in row] for row in grid],
        rows=rows,
        scores=scores,
        embeddings=embeddings,
        titles=[[p.title for p in row] for row in grid],
        texts=[[p.text for p in row] for row in grid],
        fixed_logits=fixed_logits,
        query_weight=query_weight,
        ranking_scores=ranking_scores,
    )


@dataclass(frozen=True)
class KnowledgeSource:
    """The knowledge base folder a retriever was opened from, at which data version, and how."""

    path: Path
    version: int  # meta.json's data_version when opened (rag.updates increases it)
    ray: str  # "" or the Ray address its shards' actors run on


class Retriever:
    """Index + passage store + query encoder: questions in, top-K passages out (the dense retriever)."""

    kind = "dense"
    query_weight = 1.0  # p(z|x)'s logits are q(x).d(z) alone: trainable through q(x)

    def __init__(self, index: DenseIndex | PartedIndex, passages: PassageStore | PartedPassages,
                 query_encoder: Encoder) -> None:  # fmt: skip
        if len(index) != len(passages):
            raise ValueError(f"index has {len(index)} rows but the passage store has {len(passages)}")
        if query_encoder.dim != index.dim:
            raise ValueError(f"query encoder dim {query_encoder.dim} != index dim {index.dim}")
        self.index = index
        self.passages = passages
        self.query_encoder = query_encoder
        self.source: KnowledgeSource | None = None  # set by open: where a newer version would appear

    @classmethod
    def open(
        cls,
        index_dir: Path | str,
        query_encoder: Encoder | None = None,
        encoder: EncoderConfig | None = None,
        device: str | torch.device = "cpu",
        scale: float | None = None,
        ray: str = "",
    ) -> Retriever:
        """A retriever over a knowledge base folder (sharded or not, live-updated or not).

        q(x) is `query_encoder`, else loaded from the config rag.knowledge.query_encoder_config gives
        (the one rule: `encoder` if given, else the q(x) the knowledge base records; `scale` overrides
        the scale).
        ray: a Ray cluster address (rag.distributed.connect): each shard is then searched by its own
        actor, which holds only that shard (rag.distributed.shards); "" searches in this process.
        """
        if ray:
            from rag.distributed.shards import open_on_ray

            kb = KnowledgeBase(*open_on_ray(index_dir, ray))
        else:
            kb = open_knowledge_base(index_dir)
        if query_encoder is None:
            query_encoder = load_encoder(query_encoder_config(kb.meta, encoder, scale), device)
        retriever = cls(kb.index, kb.passages, query_encoder)
        retriever.source = KnowledgeSource(Path(index_dir), data_version(kb.meta), ray)
        return retriever

    def retrieve(self, questions: list[str], k: int, batch_size: int = 64,
                 query_vectors: torch.Tensor | np.ndarray | None = None) -> Retrieved:  # fmt: skip
        """Top-k passages for each question: (B,) strings -> Retrieved with (B, K) fields.
        query_vectors (B, D): q(x) already computed (training), instead of encoding the questions."""
        _check_questions(questions)
        q = query_vectors if query_vectors is not None else self.query_encoder.encode(list(questions), batch_size=batch_size)
        return self.retrieve_vectors(q, k)  # (B, D) -> (B, K)

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
        return _assemble(self.passages, hits.rows, scores, emb)


def _check_bm25(index: BM25Index, passages: PassageStore, temperature: float) -> None:
    if len(index) != len(passages):
        raise ValueError(f"BM25 index has {len(index)} rows but the passage store has {len(passages)}")
    if not temperature > 0:
        raise ValueError(f"the BM25 temperature must be > 0, got {temperature}")


class BM25Retriever:
    """BM25 index + passage store: top-K passages by BM25; p(z|x)'s logits are BM25 / temperature,
    fixed (no query encoder, nothing to train: the paper's BM25 ablation)."""

    kind = "bm25"
    query_weight = 0.0
    query_encoder = None

    def __init__(self, index: BM25Index, passages: PassageStore, temperature: float = 1.0) -> None:
        _check_bm25(index, passages, temperature)
        self.index = index
        self.passages = passages
        self.temperature = temperature

    @classmethod
    def open(cls, index_dir: Path | str, temperature: float = 1.0, build: bool = True) -> BM25Retriever:
        """Over a knowledge base folder; its BM25 index is built first if it has none (and build)."""
        kb = open_knowledge_base(index_dir)
        return cls(open_bm25_index(index_dir, build=build), kb.passages, temperature)

    def retrieve(self, questions: list[str], k: int, batch_size: int = 64,
                 query_vectors: torch.Tensor | np.ndarray | None = None) -> Retrieved:  # fmt: skip
        """Top-k passages by BM25 (query_vectors is ignored); rag.bm25.BM25QueryError (a ValueError)
        names a question that has no term of the index (empty, stop words only, unknown words)."""
        _check_questions(questions)
        rows, bm25 = self.index.search(list(questions), k)  # (B, K), (B, K)
        logits = torch.from_numpy(bm25 / np.float32(self.temperature))  # (B, K)
        empty = torch.zeros(*rows.shape, 0)  # (B, K, 0): no d(z)
        return _assemble(self.passages, rows, logits, empty, fixed_logits=logits, query_weight=0.0)


class HybridRetriever:
    """Dense and BM25 retrieval fused (rag.fusion); p(z|x)'s logits w * q(x).d(z) + (1 - w) * BM25 / T,
    the product of the two retrievers' priors with the fusion's weight (trainable through q(x))."""

    kind = "hybrid"

    def __init__(self, dense: Retriever, bm25: BM25Index, fusion: FusionConfig | None = None,
                 temperature: float = 1.0) -> None:  # fmt: skip
        _check_bm25(bm25, dense.passages, temperature)
        fusion = fusion or FusionConfig()
        if not 0.0 <= fusion.weight <= 1.0 or fusion.depth < 1 or fusion.rrf_k < 0:
            raise ValueError(f"bad FusionConfig {fusion}: weight in [0, 1], depth >= 1, rrf_k >= 0")
        self.dense = dense
        self.bm25 = bm25
        self.fusion = fusion
        self.temperature = temperature
        self.index = dense.index
        self.passages = dense.passages
        self.query_encoder = dense.query_encoder

    @property
    def query_weight(self) -> float:
        return self.fusion.weight

    @classmethod
    def open(cls, index_dir: Path | str, query_encoder: Encoder | None = None, encoder: EncoderConfig | None = None,
             device: str | torch.device = "cpu", scale: float | None = None, temperature: float = 1.0,
             fusion: FusionConfig | None = None, build: bool = True) -> HybridRetriever:  # fmt: skip
        """Over a knowledge base folder: its dense index, its BM25 index (built if missing and build) and
        its stored fusion (KB/hybrid.json, rag index hybrid), unless `fusion` is given."""
        dense = Retriever.open(index_dir, query_encoder, encoder, device, scale)
        stored, _ = load_fusion(index_dir)
        return cls(dense, open_bm25_index(index_dir, build=build), fusion or stored, temperature)

    def candidates(self, questions: list[str], depth: int, batch_size: int = 64,
                   query_vectors: torch.Tensor | np.ndarray | None = None) -> Candidates:  # fmt: skip
        """Both retrievers' top `depth` and their union with exact scores (rag.fusion.Candidates)."""
        _check_questions(questions)
        depth = min(depth, len(self.passages))
        q = query_vectors if query_vectors is not None else self.query_encoder.encode(list(questions), batch_size=batch_size)
        q = np.ascontiguousarray(q.detach().float().cpu().numpy() if isinstance(q, torch.Tensor) else q, dtype=np.float32)
        dense_hits = self.dense.index.search(q, depth)  # (B, depth)
        term_ids, _ = self.bm25.term_ids(list(questions))  # a question without BM25 terms: dense alone
        full = self.bm25.score_matrix(term_ids)  # (B, N)
        bm25_rows, bm25_top = topk_rows(full, depth)  # (B, depth)
        rows, d_rank, b_rank = union_candidates(dense_hits.rows, bm25_rows, bm25_top > 0)  # (B, C)
        safe = np.maximum(rows, 0)
        emb = self.dense.index.embeddings(safe.reshape(-1)).reshape(*rows.shape, -1)  # (B, C, D)
        dense = np.einsum("bd,bcd->bc", q, emb.astype(np.float32))  # (B, C)
        bm25 = np.take_along_axis(full, safe, 1)  # (B, C)
        return Candidates(rows, dense.astype(np.float32), bm25.astype(np.float32), d_rank, b_rank)

    def retrieve(self, questions: list[str], k: int, batch_size: int = 64,
                 query_vectors: torch.Tensor | np.ndarray | None = None) -> Retrieved:  # fmt: skip
        """Top-k passages by the fused ranking; query_vectors (B, D) as for the dense retriever."""
        cands = self.candidates(questions, max(k, self.fusion.depth), batch_size, query_vectors)
        order = fuse(cands, self.fusion, k)  # (B, K) positions into the candidates
        fused = torch.from_numpy(np.take_along_axis(fused_scores(cands, self.fusion), order, 1).astype(np.float32))
        rows = np.take_along_axis(cands.rows, order, 1)  # (B, K)
        dense = torch.from_numpy(np.take_along_axis(cands.dense, order, 1))  # (B, K) q(x).d(z)
        bm25 = torch.from_numpy(np.take_along_axis(cands.bm25, order, 1) / np.float32(self.temperature))
        w = self.fusion.weight
        fixed = (1.0 - w) * bm25  # (B, K)
        emb = torch.from_numpy(self.dense.index.embeddings(rows.reshape(-1)).reshape(*rows.shape, -1))  # (B, K, D)
        return _assemble(self.passages, rows, w * dense + fixed, emb.float(), fixed_logits=fixed, query_weight=w,
                         ranking_scores=fused)


AnyRetriever = Retriever | BM25Retriever | HybridRetriever


def open_retriever(index_dir: Path | str, config: RetrieverConfig | None = None,
                   query_encoder: Encoder | None = None, encoder: EncoderConfig | None = None,
                   device: str | torch.device = "cpu", scale: float | None = None) -> AnyRetriever:  # fmt: skip
    """The retriever `config.kind` names over a knowledge base folder (for the CLI, the server, RagModel).

    dense and hybrid take q(x) as Retriever.open does (query_encoder, else `encoder`, else the folder's
    d(z) encoder; `scale`); bm25 needs no encoder. A missing BM25 index is built once, into the folder."""
    config = config or RetrieverConfig()
    if config.kind == "dense":
        return Retriever.open(index_dir, query_encoder, encoder, device, scale, ray=config.ray)
    if config.kind == "bm25":
        return BM25Retriever.open(index_dir, config.bm25_temperature)
    if config.kind == "hybrid":
        if config.ray:
            raise ValueError("--ray serves dense retrieval from shard actors; hybrid retrieval runs in one process")
        return HybridRetriever.open(index_dir, query_encoder, encoder, device, scale, config.bm25_temperature)
    raise ValueError(f"retriever kind must be one of dense, bm25, hybrid; got {config.kind!r}")
