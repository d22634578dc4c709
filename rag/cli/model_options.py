"""The model and decoding flags that `rag ask` and `rag serve` share: one definition, one reading.

    add_model_arguments(parser)        # --kind -k --checkpoint --index --retriever --generator --dtype ...
    asker = load_asker(args)           # rag.answering.Asker with the model and decoding those flags name
"""

from __future__ import annotations

import argparse

from rag.answering import Asker, rag_model_config
from rag.cli.search import add_retriever_arguments
from rag.config import PROMPT_STYLES, DecodingConfig, RagConfig


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kind", choices=["token", "sequence"], default=None, help="default: token (or the checkpoint's)")
    p.add_argument("-k", type=int, default=None, help="passages retrieved and marginalised (default: 5, or the checkpoint's)")
    p.add_argument("--checkpoint", default="", help="a `rag train` checkpoint folder (RUN/checkpoint): its trained model")
    p.add_argument("--beams", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument(
        "--decoding", choices=["thorough", "fast"], default="thorough", help="RAG-Sequence decoding"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-new-tokens", type=int, default=1)
    p.add_argument("--index", default="", help="knowledge base folder (default: the built-in one)")
    add_retriever_arguments(p, default=None)
    p.add_argument("--generator", default="", help="generator path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="generator weights (auto: bfloat16 where the hardware computes it natively)",
    )
    p.add_argument("--prompt", choices=PROMPT_STYLES, default="short-answer", help="causal generators: short-answer (demonstrations, answer ends at a newline), chat, plain")


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
    return rag_model_config(args.kind, args.k, args.index, args.generator, args.dtype, args.prompt,
                            args.checkpoint, args.device, args.retriever, args.bm25_temperature)  # fmt: skip


def load_asker(args: argparse.Namespace) -> Asker:
    """The Asker the flags name; flag errors are raised before any model is loaded."""
    config = decoding_config(args)
    return Asker.load(model_config(args), config, args.device)
