"""q(x) without torch: the inference forward of BERT-family sentence encoders in numpy, for `rag search`.

Importing torch and transformers costs 2-5 s of a `rag search` call on two cores; encoding one query
costs milliseconds. For the encoders it covers (BERT architecture, sentence-transformers or plain
transformers layout, mean or CLS pooling, float32, a `tokenizer.json` and a `model.safetensors`), this
module computes what rag.encoders.Encoder computes: embeddings -> L post-LayerNorm layers of multi-head
self-attention and a GELU feed-forward -> pooling -> optional L2 normalisation -> scale, in float32
(tests/test_numpy_encoder.py compares the two on the packaged model). `load_numpy_encoder` returns None
for anything else, and the caller loads the torch Encoder instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from rag.config import EncoderConfig
from rag.encoder_layout import inspect_encoder_dir

_PREFIXES = ("bert.", "model.")  # BertFor* checkpoints and some exports nest the encoder's weights


@dataclass(frozen=True)
class _Layer:
    qkv_w: np.ndarray  # (D, 3D): query, key and value projections side by side, transposed
    qkv_b: np.ndarray  # (3D,)
    out_w: np.ndarray  # (D, D)
    out_b: np.ndarray
    ln1: tuple[np.ndarray, np.ndarray]
    up_w: np.ndarray  # (D, F)
    up_b: np.ndarray
    down_w: np.ndarray  # (F, D)
    down_b: np.ndarray
    ln2: tuple[np.ndarray, np.ndarray]


class NumpyEncoder:
    """encode(texts) -> (N, D) float32, as Encoder.encode; no gradients, no torch."""

    def __init__(self, tokenizer: Any, weights: dict[str, np.ndarray], settings: dict[str, Any], pooling: str,
                 normalize: bool, max_length: int, scale: float) -> None:  # fmt: skip
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`, truncating to max_length (specials included)
        self.pooling, self.normalize, self.scale = pooling, normalize, float(scale)
        self.heads = int(settings["num_attention_heads"])
        self.eps = float(settings.get("layer_norm_eps", 1e-12))
        self.pad_id = int(settings.get("pad_token_id") or 0)
        self.max_length = max_length

        def w(name: str) -> np.ndarray:
            return np.ascontiguousarray(weights[name], dtype=np.float32)

        self.word = w("embeddings.word_embeddings.weight")  # (V, D)
        self.position = w("embeddings.position_embeddings.weight")  # (P, D)
        self.token_type = w("embeddings.token_type_embeddings.weight")[0]  # (D,): one segment
        self.ln0 = (w("embeddings.LayerNorm.weight"), w("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(int(settings["num_hidden_layers"])):
            p = f"encoder.layer.{i}."
            att = p + "attention."
            self.layers.append(_Layer(
                qkv_w=np.concatenate([w(f"{att}self.{n}.weight").T for n in ("query", "key", "value")], axis=1),
                qkv_b=np.concatenate([w(f"{att}self.{n}.bias") for n in ("query", "key", "value")]),
                out_w=np.ascontiguousarray(w(f"{att}output.dense.weight").T), out_b=w(f"{att}output.dense.bias"),
                ln1=(w(f"{att}output.LayerNorm.weight"), w(f"{att}output.LayerNorm.bias")),
                up_w=np.ascontiguousarray(w(p + "intermediate.dense.weight").T), up_b=w(p + "intermediate.dense.bias"),
                down_w=np.ascontiguousarray(w(p + "output.dense.weight").T), down_b=w(p + "output.dense.bias"),
                ln2=(w(p + "output.LayerNorm.weight"), w(p + "output.LayerNorm.bias")),
            ))  # fmt: skip

    @property
    def dim(self) -> int:
        return int(self.word.shape[1])

    def encode(self, texts: list[str], batch_size: int = 64, progress: Any = False) -> np.ndarray:
        """(N,) texts -> (N, D) float32 vectors in the order given (batches of similar lengths)."""
        texts = list(texts)
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        ids = [e.ids for e in self.tokenizer.encode_batch(texts)]
        order = np.argsort([-len(x) for x in ids], kind="stable")
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[r]) for r in rows)
            batch = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=bool)
            for i, r in enumerate(rows):
                batch[i, : len(ids[r])], mask[i, : len(ids[r])] = ids[r], True
            out[rows] = self._forward(batch, mask)
        return out

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """(B, T) ids and mask -> (B, D) pooled, normalised, scaled vectors."""
        b, t = ids.shape
        d, h = self.dim, self.heads
        x = self.word[ids] + self.position[:t] + self.token_type  # (B, T, D)
        x = _layer_norm(x, *self.ln0, self.eps)
        bias = np.where(mask, 0.0, np.finfo(np.float32).min).astype(np.float32)[:, None, None, :]  # (B,1,1,T)
        for layer in self.layers:
            qkv = x @ layer.qkv_w + layer.qkv_b  # (B, T, 3D)
            q, k, v = (qkv[..., i * d : (i + 1) * d].reshape(b, t, h, d // h).transpose(0, 2, 1, 3)
                       for i in range(3))  # (B, H, T, d/H) each  # fmt: skip
            scores = q @ k.transpose(0, 1, 3, 2) / np.float32(np.sqrt(d // h)) + bias  # (B, H, T, T)
            scores = np.exp(scores - scores.max(-1, keepdims=True))
            context = (scores / scores.sum(-1, keepdims=True)) @ v  # (B, H, T, d/H)
            context = context.transpose(0, 2, 1, 3).reshape(b, t, d)
            x = _layer_norm(context @ layer.out_w + layer.out_b + x, *layer.ln1, self.eps)
            up = _gelu(x @ layer.up_w + layer.up_b)  # (B, T, F)
            x = _layer_norm(up @ layer.down_w + layer.down_b + x, *layer.ln2, self.eps)
        if self.pooling == "cls":
            pooled = x[:, 0]
        else:
            weights = mask[..., None].astype(np.float32)  # (B, T, 1)
            pooled = (x * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
        if self.normalize:
            pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return (pooled * self.scale).astype(np.float32)


def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, eps: float) -> np.ndarray:
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + np.float32(eps)) * weight + bias


def _erf(x: np.ndarray) -> np.ndarray:
    """erf in float64 (Abramowitz & Stegun 7.1.26, |error| <= 1.5e-7, below float32's resolution of
    GELU's inputs): numpy has no erf, and BERT's "gelu" is the exact erf form."""
    z = np.abs(x.astype(np.float64))
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(x) * (1.0 - poly * np.exp(-z * z))


def _gelu(x: np.ndarray) -> np.ndarray:
    return (0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))).astype(np.float32)


def load_numpy_encoder(config: EncoderConfig) -> NumpyEncoder | None:
    """A NumpyEncoder for `config`'s directory, or None where this forward does not apply."""
    if config.dtype != "float32":
        return None  # bfloat16: the torch Encoder
    try:
        layout = inspect_encoder_dir(config)
    except (OSError, ValueError):
        return None  # the torch path reports what is wrong with the directory
    tokenizer_file = layout.model_dir / "tokenizer.json"
    weights_file = layout.model_dir / "model.safetensors"
    if layout.kind not in ("sentence-transformers", "transformers") or layout.pooling not in ("cls", "mean"):
        return None
    if not tokenizer_file.is_file() or not weights_file.is_file():
        return None
    try:
        settings = json.loads((layout.model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    plain_bert = (settings.get("model_type") == "bert" and settings.get("hidden_act") == "gelu"
                  and settings.get("position_embedding_type", "absolute") == "absolute")  # fmt: skip
    if not plain_bert:
        return None
    from safetensors.numpy import load_file
    from tokenizers import Tokenizer

    weights = {}
    for name, value in load_file(str(weights_file)).items():
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        weights[name] = value
    if "embeddings.word_embeddings.weight" not in weights:
        return None
    if config.deltas and not _merge_deltas(weights, config.deltas):
        return None  # a delta numpy cannot read (bfloat16) or place: the torch Encoder merges it
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=layout.max_length)
    return NumpyEncoder(tokenizer, weights, settings, layout.pooling, layout.normalize, layout.max_length,
                        config.scale)  # fmt: skip


def _bf16_fingerprint(embedding: np.ndarray) -> str:
    """rag.lora.base_fingerprint in numpy: sha256 of the float32 matrix rounded to bfloat16 (to nearest
    even, as torch rounds), so a delta's base check needs no torch."""
    import hashlib

    bits = np.ascontiguousarray(embedding, dtype=np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return hashlib.sha256(rounded.view(np.int16).tobytes()).hexdigest()


def _merge_deltas(weights: dict[str, np.ndarray], deltas: tuple[str, ...]) -> bool:
    """W += (alpha / r) * B @ A for each float32 LoRA delta folder (rag.lora's layout and checks: the
    file's sha256 and the base fingerprint). False where numpy cannot do it (then torch merges)."""
    from safetensors.numpy import load_file

    from rag.lora import DeltaError, read_delta_meta
    from rag.resources import resolve_path

    for spec in deltas:
        folder = resolve_path(spec)
        meta = read_delta_meta(folder)  # checks the sha256 of the weights file
        fingerprint = meta["base"].get("fingerprint")
        if fingerprint and fingerprint != _bf16_fingerprint(weights["embeddings.word_embeddings.weight"]):
            raise DeltaError(f"{folder}: this delta was trained on other base weights; it cannot be applied")
        try:
            tensors = load_file(str(folder / "delta.safetensors"))
        except (TypeError, ValueError):
            return False  # e.g. bfloat16, which numpy has no type for
        scaling = float(meta["spec"]["alpha"]) / float(meta["spec"]["rank"])
        for name in sorted({key.rsplit(".", 1)[0] for key in tensors}):
            weight = weights.get(name.removeprefix("bert.") + ".weight")
            a, b = tensors.get(f"{name}.lora_A"), tensors.get(f"{name}.lora_B")
            if weight is None or a is None or b is None or weight.shape != (b.shape[0], a.shape[1]):
                return False
            weights[name.removeprefix("bert.") + ".weight"] = weight + scaling * (b.astype(np.float32) @ a.astype(np.float32))
    return True
