"""The two sides of the DPR-style bi-encoder: the query encoder q(x) and the passage encoder d(z).

Both are `Encoder` modules: a transformers model, a pooling rule and an optional L2 normalisation.
`forward` is a plain differentiable function of token ids (training updates q(x) through it);
`encode` is the batched, gradient-free path that sorts texts by length to cut padding.
Loading q(x) and d(z) from the same directory twice gives two independent sets of parameters.
The backends and what a directory holds: rag.encoder_layout (torch-free).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rag.config import EncoderConfig
from rag.corpus import passage_text  # noqa: F401  (re-exported: how d(z) sees a passage)
from rag.encoder_layout import (  # noqa: F401  (re-exported)
    EncoderLayout,
    Pooling,
    default_query_scale,
    inspect_encoder_dir,
    native_bfloat16,
    passage_dtype,
)
from rag.lora import apply_deltas


class Encoder(nn.Module):
    """A text encoder: transformers model -> pooled (and optionally normalised) vectors (B, D)."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pooling: Pooling = "mean",
        normalize: bool = False,
        max_length: int = 256,
        dtype: torch.dtype = torch.float32,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if pooling not in ("cls", "mean", "pooler"):
            raise ValueError(f"pooling must be 'cls', 'mean' or 'pooler', not {pooling!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.pooling = pooling
        self.normalize = normalize
        self.max_length = max_length
        # A fixed temperature on the output (EncoderConfig.scale): q(x) = scale * normalize(h) makes
        # p(z|x) = softmax(q . d) as sharp as the contrastive loss the encoder was trained with.
        self.scale = float(scale)
        # bfloat16 weights: on CPUs with AMX / AVX512-BF16 encoding runs ~3x faster than float32 (the
        # matrix products dominate); outputs stay float32. Meant for d(z), which the paper never trains.
        self.model.to(dtype)

    @property
    def dim(self) -> int:
        config = self.model.config
        projection = getattr(config, "projection_dim", 0) or 0
        return int(projection if self.pooling == "pooler" and projection > 0 else config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids and mask -> (B, D) vectors, differentiable."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        if self.pooling == "pooler":
            pooled = out.pooler_output  # (B, D): DPR's CLS state, projected if projection_dim > 0
        else:
            pooled = pool(out.last_hidden_state.float(), attention_mask, self.pooling)  # float32 sums
        pooled = pooled.float()
        pooled = F.normalize(pooled, dim=-1) if self.normalize else pooled
        return pooled * self.scale if self.scale != 1.0 else pooled

    def encode(self, texts: list[str], batch_size: int = 64, progress: bool | Any = False) -> np.ndarray:
        """(N,) texts -> (N, D) float32 vectors, no gradients, in the order given.

        `progress`: True for a tqdm bar of its own, or an open tqdm bar to advance (a caller's total).
        """
        texts = list(texts)
        return self.encode_ids(self.token_ids(texts) if texts else [], batch_size, progress)

    def token_ids(self, texts: list[str]) -> list[list[int]]:
        """The token ids `encode` feeds for each text (truncated, special tokens added, no padding)."""
        return self.tokenizer(list(texts), truncation=True, max_length=self.max_length)["input_ids"]

    def encode_ids(self, ids: list[list[int]], batch_size: int = 64, progress: bool | Any = False) -> np.ndarray:
        """`encode` from token ids (token_ids): a caller can tokenise the next texts while these encode."""
        out = np.zeros((len(ids), self.dim), dtype=np.float32)
        if not ids:
            return out
        pad_id = self.tokenizer.pad_token_id or 0
        bar, own_bar = _progress_bar(len(ids), progress)
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                for rows in batches_by_length([len(x) for x in ids], batch_size):
                    input_ids, mask = pad_batch([ids[r] for r in rows], pad_id)
                    vectors = self(input_ids.to(self.device), mask.to(self.device))
                    out[rows] = vectors.float().cpu().numpy()
                    if bar is not None:
                        bar.update(len(rows))
        finally:
            self.train(was_training)
            if own_bar:
                bar.close()
        return out


def encode_passages(encoder: Encoder, titles: list[list[str]], texts: list[list[str]]) -> torch.Tensor:
    """d(z) of (B, K) passages in the graph (training d(z)): titles and texts -> (B, K, D)."""
    flat = [passage_text(t, x) for row_t, row_x in zip(titles, texts, strict=True)
            for t, x in zip(row_t, row_x, strict=True)]  # fmt: skip
    batch = {name: t.to(encoder.device) for name, t in encoder.tokenize(flat).items()}
    vectors = encoder(batch["input_ids"], batch["attention_mask"])  # (B*K, D)
    return vectors.view(len(titles), len(titles[0]), -1)  # (B, K, D)


def saved_encoder_config(encoder: Encoder, base: EncoderConfig, path: str) -> EncoderConfig:
    """The config that reloads `encoder` from a transformers folder written by save_pretrained."""
    return dataclasses.replace(base, path=path, kind="transformers", pooling=encoder.pooling,
                               normalize=encoder.normalize, max_length=encoder.max_length, scale=encoder.scale)  # fmt: skip


def batches_by_length(lengths: list[int], batch_size: int) -> list[np.ndarray]:
    """Row batches of texts with similar lengths (longest first), so padding stays small."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Literal["cls", "mean"]) -> torch.Tensor:
    """(B, T, D) token states, (B, T) mask -> (B, D)."""
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the batch's longest: (B, T) ids and (B, T) mask."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return input_ids, mask


def _progress_bar(total: int, progress: bool | Any) -> tuple[Any, bool]:
    """(bar or None, whether we opened it and must close it)."""
    if progress is False or progress is None:
        return None, False
    if progress is not True:
        return progress, False
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="encoding", unit="text"), True


def load_encoder(config: EncoderConfig, device: str | torch.device = "cpu") -> Encoder:
    """Load q(x) or d(z); each call builds fresh parameters, even for the same directory."""
    from transformers import AutoModel, AutoTokenizer

    layout = inspect_encoder_dir(config)
    if layout.kind == "dpr-question":
        from transformers import DPRQuestionEncoder as model_class
    elif layout.kind == "dpr-context":
        from transformers import DPRContextEncoder as model_class
    else:
        model_class = AutoModel
    model = model_class.from_pretrained(layout.model_dir)
    apply_deltas(model, config.deltas)
    tokenizer = AutoTokenizer.from_pretrained(layout.model_dir)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    encoder = Encoder(
        model, tokenizer, layout.pooling, layout.normalize, layout.max_length, dtype, config.scale
    )
    return encoder.to(device).eval()
