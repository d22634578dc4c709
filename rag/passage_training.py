"""Optional: train the passage encoder d(z) too, re-indexing every N steps (off by default).

The paper keeps d(z) and the index fixed (sec 2.4: re-indexing is expensive and was not needed).
Later end-to-end retriever work trains d(z) as well; the index then goes stale as d(z) moves, so it
is rebuilt from the current d(z) every N steps. Here:
- retrieval between re-indexings uses the stale index (top-k search is without gradients anyway);
- the k retrieved passages are re-encoded by the trainable d(z) in the graph, so p(z|x) ∝
  exp(q(x)·d(z)) sends gradients to both encoders (RagModel.forward with a passage_encoder,
  rag.encoders.encode_passages);
- `reindex` re-encodes every passage with the current d(z) and swaps a new index in;
- a checkpoint holds d(z) and the knowledge base as it was at that step (exact resume,
  rag.train_checkpoint), and the trained model's knowledge base is what its checkpoint opens.
Re-encoding costs what `rag index build` costs (12,324 passages: about 3 min on 2 CPU cores).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import torch

from rag.encoders import Encoder, load_encoder, passage_text
from rag.index import DenseIndex
from rag.knowledge import default_knowledge_base, encoder_config, open_knowledge_base
from rag.retriever import Retriever

if TYPE_CHECKING:
    from rag.model import RagModel


def attach_passage_encoder(model: RagModel, index_dir: str, device: str | torch.device = "cpu") -> Encoder:
    """Load a trainable copy of the knowledge base's own d(z) (float32) into model.passage_encoder."""
    meta = open_knowledge_base(index_dir or default_knowledge_base()).meta
    config = dataclasses.replace(encoder_config(meta), dtype="float32")
    model.passage_encoder = load_encoder(config, device)
    return model.passage_encoder


@torch.no_grad()
def reindex(model: RagModel, batch_size: int = 64, progress: bool = False) -> None:
    """Re-encode every passage with the current d(z) and put a fresh index (same kind) under the model."""
    encoder = model.passage_encoder
    if encoder is None:
        raise ValueError("reindex: the model has no trainable passage encoder (attach_passage_encoder)")
    old = model.retriever
    rows = np.arange(len(old.passages))
    texts = [passage_text(p.title, p.text) for p in old.passages.get(rows)]
    was_training = encoder.training
    encoder.eval()  # no dropout in the index
    vectors = encoder.encode(texts, batch_size=batch_size, progress=progress)  # (N, D)
    encoder.train(was_training)
    model.retriever = Retriever(DenseIndex.build(vectors, old.index.config), old.passages, model.query_encoder)
