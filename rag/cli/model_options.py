"""The flags that commands share: one definition, one reading.

    add_index_arguments(parser)        # --index, --query-encoder, --query-scale: every command that reads
    index = knowledge_base(args)       #   a knowledge base (ask, serve, search, eval, train, index info,
    q = query_encoder(args, index)     #   index hybrid, index verify); the same default everywhere
    add_model_arguments(parser)        # --kind -k --checkpoint --index --retriever --generator --dtype ...
    asker = load_asker(args)           # rag.answering.Asker with the model and decoding those flags name
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from rag.answering import Asker, rag_model_config
from rag.cli.numbers import COUNT, OPTIONAL_COUNT, POSITIVE
from rag.config import (
    PROMPT_STYLES,
    RETRIEVER_KINDS,
    DecodingConfig,
    EncoderConfig,
    RagConfig,
    RetrieverConfig,
)

INDEX_HELP = "knowledge base folder (default: the built-in one: Wikipedia summaries, built once into ~/.cache/rag)"


def add_index_arguments(p: argparse.ArgumentParser, query_encoder: bool = True) -> None:
    """--index (and, where q(x) is used, --query-encoder and --query-scale), as every command reads them."""
    p.add_argument("--index", default="", help=INDEX_HELP)
    if query_encoder:
        p.add_argument("--query-encoder", default="",
                       help="q(x) folder (default: the q(x) the knowledge base records, see rag index info)")
        p.add_argument("--query-scale", type=POSITIVE, default=None,
                       help="q(x) = scale * pooled output, the prior's temperature (default: the knowledge "
                            "base's; 20 for a normalised encoder, 1 otherwise)")


def add_retriever_arguments(parser: argparse.ArgumentParser, default: str | None = "dense") -> None:
    """--retriever and --bm25-temperature, as search, ask, eval and train take them."""
    parser.add_argument("--retriever", choices=RETRIEVER_KINDS, default=default,
                        help="dense: q(x).d(z) (the paper's); bm25: BM25 scores as fixed logits (its ablation); "
                             "hybrid: both fused as the knowledge base's hybrid.json says (rag index hybrid). "
                             "A missing BM25 index is built once into the knowledge base"
                             + ("" if default else " (default: dense, or the checkpoint's)"))
    parser.add_argument("--bm25-temperature", type=POSITIVE, default=None,
                        help="p(z|x) logits are BM25 score / this (default 1: the scores themselves, as the paper)")
    parser.add_argument("--ray", default=None, metavar="ADDRESS",
                        help="serve the knowledge base's shards from Ray actors, one per shard, on this cluster: "
                             "auto (the running cluster, `ray start`), local (a private one), or host:port")


def retriever_config(args: argparse.Namespace, base: RetrieverConfig | None = None) -> RetrieverConfig:
    """The RetrieverConfig the flags name, over `base` (a checkpoint's) where a flag is not given."""
    base = base or RetrieverConfig()
    return replace(base, kind=args.retriever or base.kind,
                   bm25_temperature=args.bm25_temperature or base.bm25_temperature,
                   ray=base.ray if args.ray is None else args.ray)  # fmt: skip


def check_index_arguments(args: argparse.Namespace) -> None:
    """Flag errors before any work."""
    scale = getattr(args, "query_scale", None)
    if scale is not None and not (0 < scale < float("inf")):
        raise ValueError(f"--query-scale must be a finite number > 0, got {scale}")


def knowledge_base(args: argparse.Namespace, progress: bool = True) -> str:
    """The --index folder, or the default knowledge base (built once)."""
    from rag.knowledge import default_knowledge_base

    check_index_arguments(args)
    return args.index or str(default_knowledge_base(progress=progress))


def query_encoder(args: argparse.Namespace, index_dir: str) -> EncoderConfig:
    """q(x) by the one rule (rag.knowledge.query_encoder_config), the flags overriding."""
    from rag.knowledge import query_encoder_config

    check_index_arguments(args)
    return query_encoder_config(index_dir, args.query_encoder or None, args.query_scale)


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["token", "sequence"], default=None, help="default: token (or the checkpoint's)")
    p.add_argument("-k", type=COUNT, default=None, help="passages retrieved and marginalised (default: 5, or the checkpoint's)")
    p.add_argument("--checkpoint", default="", help="a `rag train` checkpoint folder (RUN/checkpoint): its trained model")
    p.add_argument("--beams", type=COUNT, default=1, help="beam size (1 = greedy)")
    p.add_argument(
        "--decoding", choices=["thorough", "fast"], default="thorough", help="RAG-Sequence decoding"
    )
    p.add_argument("--max-new-tokens", type=COUNT, default=32)
    p.add_argument("--min-new-tokens", type=OPTIONAL_COUNT, default=1)
    add_index_arguments(p)
    add_retriever_arguments(p, default=None)
    p.add_argument("--generator", default="", help="generator path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="generator weights (auto: bfloat16 where the hardware computes it natively)",
    )
    add_reader_arguments(p)


def add_reader_arguments(p: argparse.ArgumentParser) -> None:
    """--reader and --prompt, as ask, serve and eval take them."""
    p.add_argument("--reader", default="default",
                   help="default: the shipped trained reader (LoRA deltas over the default generator and q(x), "
                        "rag/weights/reader); none: the untrained models; or a reader folder (make reader)")
    p.add_argument("--prompt", choices=PROMPT_STYLES, default=None,
                   help="causal generators: plain (passage + question: the trained reader's, its default), "
                        "short-answer (three demonstrations: the default with --reader none), chat")


def decoding_config(args: argparse.Namespace) -> DecodingConfig:
    if args.beams < 1 or args.max_new_tokens < 1:
        raise ValueError("--beams and --max-new-tokens must be >= 1")
    if args.min_new_tokens < 0 or args.min_new_tokens > args.max_new_tokens:
        raise ValueError("--min-new-tokens must be in 0..--max-new-tokens")
    return DecodingConfig(
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        decoding=args.decoding,
    )


def model_config(args: argparse.Namespace) -> RagConfig:
    if args.k is not None and args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    check_index_arguments(args)
    return rag_model_config(args.kind, args.k, args.index, args.generator, args.dtype, args.prompt,
                            args.checkpoint, args.device, args.retriever, args.bm25_temperature,
                            args.query_encoder, args.query_scale, args.reader, args.ray)  # fmt: skip


def load_asker(args: argparse.Namespace) -> Asker:
    """The Asker the flags name; flag errors are raised before any model is loaded."""
    config = decoding_config(args)
    return Asker.load(model_config(args), config, args.device)
