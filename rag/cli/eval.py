"""`rag eval`: a model (or a baseline) on a task's examples; predictions, metrics and a report.

    rag eval --task nq-open --data nq.jsonl -k 1 5 10 --kind token --out runs/nq
    rag eval --task dpr-qa --data nq-test.qa.csv --checkpoint rag-token-nq/ --index dpr-wiki-kb/ --out runs/p
    rag eval --task red-trivia --data LISTS_DIR --mode closed-book --out runs/cb
    rag eval --hotswap-experiment --out runs/hotswap

Each (mode, kind, decoding, k) run is a folder under --out (resumable: re-running skips what is written);
--out/report.md compares every run folder found there, with the recall@k and metric-vs-k plots.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
from typing import Any

from rag.cli.model_options import (
    add_index_arguments,
    add_reader_arguments,
    add_retriever_arguments,
    knowledge_base,
    query_encoder,
    retriever_config,
)
from rag.cli.numbers import COUNT, OPTIONAL_COUNT, integer
from rag.config import DEFAULT_GENERATOR, DecodingConfig, GeneratorConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a model or baseline on a task (predictions, metrics, report)")
    p.add_argument("--task", help="task format: a rag.tasks reader (nq-open, dpr-qa, squad-open, jeopardy, fever, scifact, climate-fever, ...)")
    p.add_argument("--data", help="the task's data file or folder")
    p.add_argument("--subset", action="append", help="red-trivia: a list name (repeatable)")
    p.add_argument("--part", choices=["all", "dev", "reserved"], default="all",
                   help="reserved sets: dev = positions i %% 5 != 4, reserved = i %% 5 == 4 (final figures only)")
    p.add_argument("--limit", type=OPTIONAL_COUNT, default=0, help="the first N examples (after --part)")
    p.add_argument("--mode", choices=["rag", "closed-book", "retrieval-only"], default="rag")
    p.add_argument("--checkpoint", help="a `rag train` checkpoint, or a released RAG checkpoint folder (transformers layout)")
    p.add_argument("--generator", help="generator path (default: the packaged SmolLM2-135M-Instruct)")
    add_reader_arguments(p)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="generator weights (auto: bfloat16 where the hardware computes it natively)")
    add_index_arguments(p)
    add_retriever_arguments(p, default=None)
    p.add_argument("--swap-index", help="hot-swap: load the model with --index, then replace it by this one")
    p.add_argument("-k", type=COUNT, nargs="+", default=None,
                   help="passages marginalised; several values = several runs (default: 5, or the checkpoint's)")
    p.add_argument("--kind", choices=["token", "sequence"], nargs="+",
                   help="RAG-Token and/or RAG-Sequence (default token, or the checkpoint's)")
    p.add_argument("--decoding", choices=["thorough", "fast"], nargs="+", default=["thorough"],
                   help="RAG-Sequence decoding(s)")
    p.add_argument("--beams", type=COUNT, default=1)
    p.add_argument("--max-new-tokens", type=COUNT, default=16)
    p.add_argument("--min-new-tokens", type=OPTIONAL_COUNT, default=1)
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True,
                   help="output folder: new, empty, or an earlier rag eval --out (runs resume there); never the "
                        "current directory, the data, the knowledge base or the checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start a run over where --out holds a run of other settings (default: refuse)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--hotswap-experiment", action="store_true",
                   help="run the built-in knowledge hot-swap experiment (2x2 table in --out/hotswap.md)")
    p.add_argument("--questions", type=integer(min=2), default=40, help="hot-swap experiment: number of questions")
    p.set_defaults(func=run)


def read_examples(args: argparse.Namespace) -> list[Any]:
    from rag.tasks import read_task, split_reserved

    if not args.task or not args.data:
        raise ValueError("--task and --data are required (or --hotswap-experiment)")
    options = {"subsets": args.subset} if args.subset else {}
    examples = read_task(args.task, Path(args.data), **options)
    if args.part != "all":
        examples = split_reserved(examples, args.part)
    return examples[: args.limit] if args.limit else examples


def load_components(args: argparse.Namespace) -> tuple[Any, Any, list[str]]:
    """(retriever or None, generator or None, kinds) for the chosen mode; hot-swap applied."""
    from rag.generators import load_generator
    from rag.generators.loading import generator_dtype
    from rag.train_checkpoint import checkpoint_rag_config, is_training_checkpoint

    kinds = args.kind or ["token"]
    loaded_q, generator = None, None
    trained = None  # a `rag train` checkpoint's RagConfig (that format, not a released checkpoint)
    if args.checkpoint and is_training_checkpoint(args.checkpoint):
        trained = checkpoint_rag_config(args.checkpoint)
    args.k = args.k or [trained.k if trained else 5]
    if any(k < 1 for k in args.k):
        raise ValueError(f"-k values must be >= 1, got {args.k}")
    if trained is not None:
        from rag.encoders import load_encoder

        loaded_q = load_encoder(trained.query_encoder, args.device)
        dtype = generator_dtype(args.dtype, args.device)
        generator = load_generator(replace(trained.generator, dtype=dtype), args.device)  # type: ignore[arg-type]
        kinds, args.index = args.kind or [trained.kind], args.index or trained.index_dir
    elif args.checkpoint:
        from rag.checkpoints import load_rag_checkpoint

        ckpt = load_rag_checkpoint(args.checkpoint, args.device)
        loaded_q, generator, kinds = ckpt.query_encoder, ckpt.generator, args.kind or [ckpt.kind]
        if args.mode != "closed-book" and not args.index:
            raise ValueError("--checkpoint needs --index: a knowledge base built with its DPR context encoder")
    elif args.mode != "retrieval-only":
        config = GeneratorConfig(dtype=generator_dtype(args.dtype, args.device))  # type: ignore[arg-type]
        config = replace(config, path=args.generator) if args.generator else config
        from rag.reader import with_reader

        config, _ = with_reader(_reader(args, config.path), config, None, args.prompt)
        generator = load_generator(config, args.device)
    if args.mode == "closed-book":
        return None, generator, kinds
    retriever = _retriever(args, loaded_q, trained.retriever if trained else None)
    if args.swap_index:
        if retriever.kind != "dense":
            raise ValueError("--swap-index is the dense retriever's hot-swap experiment; drop --retriever")
        from rag.hotswap import swap_index
        from rag.model import RagModel

        model = RagModel(retriever.query_encoder, retriever, generator, kinds[0], max(args.k))
        retriever = swap_index(model, args.swap_index).retriever
    return retriever, generator, kinds


def _retriever(args: argparse.Namespace, trained_query_encoder: Any, trained_retriever: Any = None) -> Any:
    """The retriever over --index (the checkpoint's, or the default knowledge base); q(x) is a loaded
    checkpoint's, else the one rule's (rag.knowledge.query_encoder_config) with the flags."""
    from rag.encoders import load_encoder
    from rag.retriever import open_retriever

    index = knowledge_base(args, progress=not args.no_progress)
    config = retriever_config(args, trained_retriever)
    encoder = trained_query_encoder
    if config.kind != "bm25" and (encoder is None or args.query_encoder or args.query_scale is not None):
        query = query_encoder(args, index)
        if trained_query_encoder is None and not args.checkpoint:  # the reader's q(x) delta, if q(x) is its base
            from rag.reader import default_reader_applies, reader_query_encoder

            if args.reader != "default" or default_reader_applies(args.generator or DEFAULT_GENERATOR):
                query = reader_query_encoder(args.reader, query)
        encoder = load_encoder(query, args.device)
    return open_retriever(index, config, query_encoder=encoder, device=args.device)


def _reader(args: argparse.Namespace, generator_path: str) -> Any:
    """--reader: the default one applies to the default generator only (rag.reader)."""
    from rag.reader import default_reader_applies, load_reader

    if args.checkpoint or (args.reader == "default" and not default_reader_applies(generator_path)):
        return None
    return load_reader(args.reader)


def run_name(mode: str, kind: str, decoding: str, k: int) -> str:
    if mode != "rag":
        return mode
    return f"rag-{kind}-k{k}" if kind == "token" else f"rag-sequence-{decoding}-k{k}"


def run(args: argparse.Namespace) -> int:
    from rag.eval_report import write_report
    from rag.evaluation import EvalConfig, evaluate_many, metric_for_task
    from rag.tasks import CLASSIFICATION_LABELS, FEVER_3WAY

    # the decoding flags together (min <= max) before any work
    DecodingConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    out = claim_output(args)
    if args.hotswap_experiment:
        return run_hotswap(args, out)
    examples = read_examples(args)
    if not examples:
        raise ValueError(f"{args.data}: no examples to evaluate")
    retriever, generator, kinds = load_components(args)
    task = {"format": args.task, "data": str(Path(args.data).resolve()), "part": args.part, "limit": args.limit,
            "subset": args.subset, "swap_index": args.swap_index}
    runs = []
    for kind, dec in _variants(args, kinds):
        decoding = DecodingConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens,
                                  min_new_tokens=args.min_new_tokens, decoding=dec)
        for k in args.k if args.mode == "rag" else args.k[:1]:
            config = EvalConfig(mode=args.mode, kind=kind, k=k, decoding=decoding,
                                metric=metric_for_task(args.task), batch_size=args.batch_size,
                                labels=CLASSIFICATION_LABELS.get(args.task, FEVER_3WAY), progress=not args.no_progress)
            runs.append((config, out / run_name(args.mode, kind, dec, k)))
    for result in evaluate_many(examples, runs, retriever=retriever, generator=generator, task=task,
                                overwrite=args.overwrite):
        shown = ", ".join(f"{n} {100 * v:.1f}" for n, v in result.metrics.items() if v is not None)
        recall = ", ".join(f"R@{k} {100 * v:.1f}" for k, v in result.recall.items())
        print(f"{result.out_dir.name}: n={result.n} {shown} {recall} "
              f"({result.timing.questions_per_s:.2f} questions/s this call)")
    found = sorted(p.parent for p in out.glob("*/metrics.json"))
    print(f"report: {write_report(found, out, title=f'rag eval: {args.task} {Path(args.data).name}')}")
    return 0


def claim_output(args: argparse.Namespace) -> Path:
    """--out checked before any work (rag.io.check_output_dir) and marked as rag eval's."""
    from rag.eval_store import EVAL_MARKER, is_eval_output
    from rag.io import atomic_write_text, check_output_dir

    out = Path(args.out)
    inputs = [p for p in (args.data, args.index, args.checkpoint, args.swap_index) if p]
    check_output_dir(out, what="rag eval output", is_own=is_eval_output, inputs=inputs, reuse_own=True)
    if not (out / EVAL_MARKER).is_file():
        atomic_write_text(out / EVAL_MARKER, '{"format": "rag-eval-output"}\n')
    return out


def _variants(args: argparse.Namespace, kinds: list[str]) -> list[tuple[str, str]]:
    """(kind, decoding) pairs: RAG-Sequence once per --decoding, RAG-Token once."""
    if args.mode != "rag":
        return [(kinds[0], args.decoding[0])]
    return [(kind, dec) for kind in kinds for dec in (args.decoding if kind == "sequence" else args.decoding[:1])]


def run_hotswap(args: argparse.Namespace, out: Path) -> int:
    from rag.hotswap import hotswap_experiment, hotswap_markdown
    from rag.io import atomic_write_text
    from rag.knowledge import default_knowledge_base
    from rag.model import RagModel

    args.mode = "rag"
    retriever, generator, kinds = load_components(args)
    if retriever.kind != "dense":
        raise ValueError("--hotswap-experiment swaps the dense index; drop --retriever")
    model = RagModel(retriever.query_encoder, retriever, generator, kinds[0], args.k[0])
    base = Path(args.index) if args.index else default_knowledge_base(progress=not args.no_progress)
    decoding = DecodingConfig(num_beams=args.beams, max_new_tokens=args.max_new_tokens, decoding=args.decoding[0])
    result = hotswap_experiment(model, base, out, n_questions=args.questions, decoding=decoding)
    text = hotswap_markdown(result)
    atomic_write_text(out / "hotswap.md", text)
    print(text)
    return 0
