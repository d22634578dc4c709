"""The training experiments of results/training.md, reproduced by one command.

    python bench/train_experiment.py              # synthetic task + the real experiment (CPU: ~25 min idle)
    python bench/train_experiment.py --synthetic-only

1. Synthetic (rag.synthetic): tiny models from scratch; held-out recall@1 and exact match before
   training, after training q(x) + generator, and with q(x) frozen.
2. Real: the default knowledge base (10,033 Wikipedia summaries, all-MiniLM-L6-v2 as q(x) and d(z)),
   SmolLM2-135M-Instruct as generator, k = 5; Red-Trivia questions of the general-knowledge lists
   (rag.tasks.RED_TRIVIA_GENERAL_LISTS) whose answer (any alias) occurs in
   a passage of the knowledge base (DPR's has_answer), deduplicated by question and split at random
   into train / dev / test with no question in two splits. Test exact match and answer recall@5 for:
   closed book, RAG before fine-tuning, RAG-Token and RAG-Sequence after fine-tuning, and RAG-Token
   fine-tuned with q(x) frozen. Every fine-tuning run starts from the same weights and sees the same
   batches. Nothing was tuned on the test split; dev figures are logged at the end of each run.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # rag, and run_results' question selection

from run_results import answers_in_kb  # noqa: E402

from rag.config import DecodingConfig, RagConfig  # noqa: E402
from rag.evaluation import EvalConfig, evaluate  # noqa: E402
from rag.io import atomic_write_text  # noqa: E402
from rag.knowledge import default_knowledge_base  # noqa: E402
from rag.model import RagModel  # noqa: E402
from rag.resources import red_trivia_dir  # noqa: E402
from rag.synthetic import SyntheticConfig, build_world, make_task  # noqa: E402
from rag.tasks import RED_TRIVIA_GENERAL_LISTS, Example, read_task  # noqa: E402
from rag.training import TrainConfig, evaluate_dev, train  # noqa: E402


def synthetic(out: Path) -> list[dict[str, Any]]:
    config = SyntheticConfig(seed=0)
    task = make_task(config)
    rag, reader = build_world(task, out / "synthetic-world", config, reader_steps=400, k=8)
    train_set = [Example.pair(p.question, p.answer) for p in task.train]
    test_set = [Example.pair(p.question, p.answer) for p in task.test]
    rows = []
    for name, frozen in (("before training", None), ("q(x) + generator trained", False), ("q(x) frozen", True)):
        model = RagModel.from_config(rag)
        if frozen is not None:
            tc = TrainConfig(rag=rag, steps=200, batch_size=16, lr=3e-3, generator_lr=1e-4, schedule="constant",
                             freeze_query_encoder=frozen)  # fmt: skip
            train(model, train_set, tc)
        dev = evaluate_dev(model, test_set, TrainConfig())
        rows.append({"setting": name, "recall@1": dev.recall_at_1, "recall@8": dev.recall_at_k,
                     "exact_match": dev.exact_match, "questions": dev.questions, "reader_accuracy": reader})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def splits(args: argparse.Namespace, kb_dir: Path) -> dict[str, list[Example]]:
    questions = read_task("red-trivia", red_trivia_dir(), subsets=list(RED_TRIVIA_GENERAL_LISTS))
    pool = answers_in_kb(list(questions), kb_dir, one_per_question=True)
    random.Random(args.seed).shuffle(pool)
    n = (args.train, args.dev, args.test)
    if sum(n) > len(pool):
        raise ValueError(f"only {len(pool)} answerable questions for {sum(n)} requested")
    return {"train": pool[: n[0]], "dev": pool[n[0] : n[0] + n[1]], "test": pool[n[0] + n[1] : sum(n)],
            "pool": pool}  # fmt: skip


def run_eval(model: RagModel, test: list[Example], out: Path, mode: str, kind: str) -> dict[str, Any]:
    config = EvalConfig(mode=mode, kind=kind, k=5, recall_ks=(1, 5), batch_size=8, progress=False,
                        decoding=DecodingConfig(num_beams=1, max_new_tokens=16))  # fmt: skip
    start = time.perf_counter()
    with torch.inference_mode():  # without it a trained model's decoding kept autograd graphs (16 GB, OOM)
        result = evaluate(test, out, retriever=model.retriever if mode == "rag" else None,
                          generator=model.generator, config=config)  # fmt: skip
    metrics: dict[str, Any] = dict(result.metrics)
    metrics.update({f"recall@{k}": v for k, v in result.recall.items()})
    metrics["eval_questions_per_s"] = len(test) / (time.perf_counter() - start)
    return metrics


def real(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    kb_dir = default_knowledge_base()
    data = splits(args, kb_dir)
    print({k: len(v) for k, v in data.items()}, flush=True)
    base = RagModel.from_config(RagConfig(kind="token", k=5, index_dir=str(kb_dir)))
    initial = copy.deepcopy(base.state_dict())
    rows: dict[str, Any] = {}
    if not args.no_baselines:
        rows["closed book"] = run_eval(base, data["test"], out / "closed-book", "closed-book", "token")
        print("closed book", rows["closed book"], flush=True)
        rows["RAG-Token, before fine-tuning"] = run_eval(base, data["test"], out / "rag-before", "rag", "token")
        print(rows["RAG-Token, before fine-tuning"], flush=True)
    runs = {"token": ("RAG-Token, fine-tuned", "token", False), "sequence": ("RAG-Sequence, fine-tuned", "sequence", False),
            "frozen": ("RAG-Token, fine-tuned, q(x) frozen", "token", True)}  # fmt: skip
    for name, kind, frozen in (runs[r] for r in args.runs):
        base.load_state_dict(initial)
        base.kind = kind
        config = TrainConfig(rag=dataclasses.replace(RagConfig(kind=kind, k=5), index_dir=str(kb_dir)),
                             steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr, generator_lr=args.generator_lr, warmup_steps=args.steps // 10,
                             schedule="linear", bf16=not args.fp32, seed=args.seed, freeze_query_encoder=frozen)  # fmt: skip
        start = time.perf_counter()
        # the target is Example.target, the first alias: Red-Trivia lists the canonical answer first
        result = train(base, data["train"], config, data["dev"],
                       out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", ""))  # fmt: skip
        seconds = time.perf_counter() - start
        metrics = run_eval(base, data["test"], out / f"eval-{kind}-{'frozen' if frozen else 'trained'}", "rag", kind)
        metrics["train_questions_per_s"] = args.steps * args.batch_size * args.grad_accum / seconds
        metrics["train_losses"] = result.losses
        metrics["dev"] = dataclasses.asdict(result.dev) if result.dev else None
        rows[name] = metrics
        print(name, metrics, flush=True)
    return {"sizes": {k: len(v) for k, v in data.items()}, "rows": rows}


def tables(result: dict[str, Any]) -> str:
    lines: list[str] = []
    if "synthetic" in result:
        lines += ["| synthetic task (16 held-out questions, 64 passages, k = 8) | recall@1 | recall@8 | exact match |",
                  "|---|---:|---:|---:|"]  # fmt: skip
    for r in result.get("synthetic", []):
        lines.append(f"| {r['setting']} | {r['recall@1']:.2f} | {r['recall@8']:.2f} | {r['exact_match']:.2f} |")
    if "real" in result:
        sizes = result["real"]["sizes"]
        lines += ["", f"| real: Red-Trivia over Wikipedia summaries, k = 5 (test: {sizes['test']} questions) "
                  "| exact match | recall@5 | train questions/s | eval questions/s |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, m in result["real"]["rows"].items():
            recall = f"{m['recall@5']:.3f}" if "recall@5" in m else "-"
            speed = f"{m['train_questions_per_s']:.3f}" if "train_questions_per_s" in m else "-"
            lines.append(f"| {name} | {m['exact_match']:.3f} | {recall} | {speed} | {m['eval_questions_per_s']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=160, help="training questions")
    parser.add_argument("--dev", type=int, default=0, help="dev questions (EM/recall in each run's log)")
    parser.add_argument("--test", type=int, default=120)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=1, help="questions per micro-batch (memory)")
    parser.add_argument("--grad-accum", type=int, default=4, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=1e-4, help="q(x)'s learning rate (a 22M encoder, few steps)")
    parser.add_argument("--generator-lr", type=float, default=2e-5)
    parser.add_argument("--fp32", action="store_true", help="no bfloat16 autocast in training (about 2x slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--synthetic-only", action="store_true")
    parser.add_argument("--no-synthetic", action="store_true")
    parser.add_argument("--no-baselines", action="store_true", help="skip closed book and RAG before fine-tuning")
    parser.add_argument("--runs", nargs="+", choices=["token", "sequence", "frozen"],
                        default=["token", "sequence", "frozen"], help="fine-tuning runs")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "train_experiment")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"settings": {k: str(v) for k, v in vars(args).items()}}
    if not args.no_synthetic:
        with tempfile.TemporaryDirectory() as tmp:
            result["synthetic"] = synthetic(Path(tmp))
    if not args.synthetic_only:
        run_dir = args.out / time.strftime("%Y%m%d-%H%M%S")
        result["real"] = real(args, run_dir)
    name = "result-synthetic.json" if args.synthetic_only else "result.json"
    atomic_write_text(args.out / name, json.dumps(result, indent=2))
    print(tables(result))
    print(f"wrote {args.out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
