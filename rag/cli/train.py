"""`rag train`: fine-tune q(x) and the generator end to end; `rag train plot` draws a run's curves.

    rag train --train train.jsonl --dev dev.jsonl --out runs/rag-token --kind token -k 5 --steps 500
    rag train --train train.jsonl --out runs/rag-token --resume          # continue from runs/.../checkpoint
    rag train plot runs/rag-token/log.jsonl --out curves.png

Defaults: the default knowledge base and its own encoder as q(x), SmolLM2-135M-Instruct as generator.
The run folder gets log.jsonl (one JSON object per step) and checkpoint/ (loads with
rag.train_checkpoint.load_rag_model(path)).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from rag.cli.model_options import (
    add_index_arguments,
    add_retriever_arguments,
    knowledge_base,
    query_encoder,
    retriever_config,
)
from rag.cli.numbers import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, integer, number
from rag.config import PROMPT_STYLES, GeneratorConfig, LoraSpec, RagConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="fine-tune the query encoder and generator (RAG-Token/Sequence)")
    p.add_argument("--train", dest="train_file",
                   help="training examples in any format `rag eval` reads (--task; default open-qa: JSON Lines "
                        "input+target or question+answer(s), or a DPR question<TAB>answers file)")
    p.add_argument("--dev", dest="dev_file", help="dev set (same --task): exact match and recall@k per evaluation")
    p.add_argument("--task", default="open-qa",
                   help="task format of --train and --dev: a rag.tasks reader (open-qa, nq-open, dpr-qa, kilt, jeopardy, ...); "
                        "fever, scifact, climate-fever train one-token labels (the paper's classification)")
    p.add_argument("--subset", action="append", help="red-trivia: a list name (repeatable)")
    p.add_argument("--out", help="run folder: log.jsonl and checkpoint/")
    add_index_arguments(p)
    add_retriever_arguments(p)  # bm25: p(z|x) is fixed, only the generator learns (the paper's ablation)
    p.add_argument("--prompt", choices=PROMPT_STYLES, default="short-answer", help="causal generators: short-answer (demonstrations, answer ends at a newline), chat, plain")
    p.add_argument("--generator", default="", help="generator folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--kind", choices=["token", "sequence"], default="token")
    p.add_argument("-k", type=COUNT, default=5, help="passages retrieved and marginalised")
    p.add_argument("--steps", type=COUNT, default=1000, help="optimiser steps")
    p.add_argument("--batch-size", type=COUNT, default=8)
    p.add_argument("--grad-accum", type=COUNT, default=1, help="micro-batches per optimiser step")
    p.add_argument("--lr", type=NON_NEGATIVE, default=3e-5)
    p.add_argument("--generator-lr", type=NON_NEGATIVE, default=None, help="default: --lr")
    p.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    p.add_argument("--warmup", type=OPTIONAL_COUNT, default=0, help="warm-up steps")
    p.add_argument("--schedule", choices=["linear", "cosine", "constant"], default="linear")
    p.add_argument("--max-grad-norm", type=NON_NEGATIVE, default=1.0, help="0: no clipping")
    p.add_argument("--label-smoothing", type=number(min=0, lt=1), default=0.0)
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    p.add_argument("--seed", type=integer(min=0, max=2**32 - 1), default=0)
    p.add_argument("--freeze-query-encoder", action="store_true", help="the frozen-retriever ablation")
    p.add_argument("--freeze-generator", action="store_true")
    p.add_argument("--lora-rank", type=OPTIONAL_COUNT, default=0,
                   help="train the generator as a LoRA delta of this rank on every linear layer (0: every weight)")
    p.add_argument("--query-lora-rank", type=OPTIONAL_COUNT, default=0, help="the same for q(x) (0: every weight)")
    p.add_argument("--counterfactual-rate", type=number(min=0, max=1), default=0.0,
                   help="share of examples whose retrieved passages state another answer of the same type, "
                        "the new target (knowledge conflicts; rag.counterfactual)")
    p.add_argument("--closed-book", action="store_true",
                   help="the paper's BART baseline: the generator alone learns from (input, target), nothing retrieved")
    p.add_argument("--train-passage-encoder", action="store_true",
                   help="optional: train d(z) too (the index is rebuilt every --reindex-every steps and at the end)")
    p.add_argument("--passage-lr", type=NON_NEGATIVE, default=None, help="d(z)'s learning rate (default: --lr)")
    p.add_argument("--reindex-every", type=OPTIONAL_COUNT, default=0, help="steps between re-indexings (0: at the end)")
    p.add_argument("--eval-every", type=OPTIONAL_COUNT, default=0, help="steps between dev evaluations (0: at the end)")
    p.add_argument("--save-every", type=OPTIONAL_COUNT, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint exactly")
    p.add_argument("--overwrite", action="store_true", help="start over in --out, replacing the run there")
    p.add_argument("--stop-after", type=COUNT, default=None, help="stop after N steps of this invocation")
    p.add_argument("--device", default="cpu")
    p.add_argument("--ray-workers", type=OPTIONAL_COUNT, default=0,
                   help="train data-parallel on N Ray Train workers (DDP over gloo, batch per worker; the "
                        "knowledge base served once by shard actors); on the --ray cluster, else a local one")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="train_command")
    plot = sub.add_parser("plot", help="draw a run's curves (loss, lr, grad norm, p(z|x) entropy, dev) to a PNG")
    plot.add_argument("log", help="the run's log.jsonl")
    plot.add_argument("--out", dest="png", required=True, help="PNG file to write (an existing file: --overwrite)")
    plot.add_argument("--overwrite", action="store_true", help="replace the file at --out")
    plot.set_defaults(func=run_plot)


def rag_config(args: argparse.Namespace) -> RagConfig:
    """The model the flags name; q(x) by the one rule (the knowledge base's recorded q(x))."""
    index_dir = knowledge_base(args)
    generator = GeneratorConfig(prompt=args.prompt)
    generator = dataclasses.replace(generator, path=args.generator) if args.generator else generator
    return RagConfig(kind=args.kind, k=args.k, query_encoder=query_encoder(args, index_dir), generator=generator,
                     index_dir=index_dir, retriever=retriever_config(args))  # fmt: skip


def _lora(rank: int, flag: str) -> LoraSpec | None:
    if rank < 0:
        raise ValueError(f"{flag} must be >= 0, got {rank}")
    return LoraSpec(rank=rank, alpha=2.0 * rank) if rank else None


def run(args: argparse.Namespace) -> int:
    from rag.model import RagModel
    from rag.tasks import CLASSIFICATION_LABELS, read_task
    from rag.train_checkpoint import check_run_folder
    from rag.training import TrainConfig, read_examples, train

    if not args.train_file or not args.out:
        raise ValueError("rag train needs --train FILE and --out FOLDER (or: rag train plot LOG --out PNG)")
    # every flag first (TrainConfig checks each field and range), then the output folder, then the data:
    # all before the knowledge base or a model is loaded
    config = TrainConfig(
        rag=RagConfig(kind=args.kind, k=args.k), steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
        lr=args.lr, generator_lr=args.generator_lr, weight_decay=args.weight_decay,
        warmup_steps=args.warmup, schedule=args.schedule, max_grad_norm=args.max_grad_norm,
        label_smoothing=args.label_smoothing, bf16=args.bf16, seed=args.seed,
        freeze_query_encoder=args.freeze_query_encoder, freeze_generator=args.freeze_generator,
        train_passage_encoder=args.train_passage_encoder, passage_lr=args.passage_lr,
        reindex_every=args.reindex_every, eval_every=args.eval_every, save_every=args.save_every,
        generator_lora=_lora(args.lora_rank, "--lora-rank"), query_lora=_lora(args.query_lora_rank, "--query-lora-rank"),
        counterfactual_rate=args.counterfactual_rate,
        labels=CLASSIFICATION_LABELS.get(args.task), closed_book=args.closed_book,
    )  # fmt: skip
    inputs = [f for f in (args.train_file, args.dev_file) if f]
    check_run_folder(args.out, args.resume, args.overwrite, [*inputs, *([args.index] if args.index else [])])
    options = {"subsets": args.subset} if args.subset else {}
    train_data = read_examples(args.train_file, args.task, **options)
    dev_data = read_task(args.task, args.dev_file, **options) if args.dev_file else []
    config = dataclasses.replace(config, rag=rag_config(args))
    if args.ray_workers:
        from rag.train_distributed import train_on_ray

        done = train_on_ray(config, train_data, dev_data, args.out, args.ray_workers, address=args.ray or "",
                            resume=args.resume, stop_after=args.stop_after, overwrite=args.overwrite)  # fmt: skip
        print(json.dumps({"steps": done["steps"], "checkpoint": str(Path(args.out) / "checkpoint"),
                          "workers": args.ray_workers}))  # fmt: skip
        return 0
    model = RagModel.from_config(config.rag, args.device)
    result = train(model, train_data, config, dev_data, args.out, resume=args.resume,
                   progress=not args.quiet, stop_after=args.stop_after, overwrite=args.overwrite,
                   inputs=inputs)  # fmt: skip
    summary = {"steps": result.steps, "checkpoint": str(result.checkpoint)}
    if result.dev is not None:
        summary["dev"] = dataclasses.asdict(result.dev)
    print(json.dumps(summary))
    return 0


CURVES = (
    ("loss", "training loss"),
    ("lr", "learning rate"),
    ("grad_norm", "gradient norm (before clipping)"),
    ("doc_entropy", "entropy of p(z|x) (nats)"),
    ("distinct_passages", "distinct passages per batch"),
    ("dev", "dev exact match / recall@k"),
)


def run_plot(args: argparse.Namespace) -> int:
    path = Path(args.log)
    png = Path(args.png)
    if png.resolve() == path.resolve():
        raise ValueError(f"--out {png} is the log itself; give a .png file")
    if (png.exists() or png.is_symlink()) and not (args.overwrite and png.is_file()):
        raise ValueError(f"{png}: exists; --overwrite replaces it" if png.is_file() else f"{png}: exists and is not a file")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from rag.io import atomic_path

    records = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: line {line_no}: not valid JSON ({error.msg})") from None
    if not records:
        raise ValueError(f"{path}: no records")
    fig, axes = plt.subplots(2, 3, figsize=(13, 7))
    for ax, (key, title) in zip(axes.flat, CURVES, strict=True):
        names = ("dev_exact_match", "dev_recall_at_k", "dev_recall_at_1") if key == "dev" else (key,)
        for name in names:
            points = [(r["step"], r[name]) for r in records if name in r]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o" if key == "dev" else None, label=name)
        ax.set_title(title)
        ax.set_xlabel("step")
        if key == "dev":
            ax.legend()
    fig.tight_layout()
    with atomic_path(args.png) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    print(args.png)
    return 0
