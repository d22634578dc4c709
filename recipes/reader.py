"""The recipe behind the shipped reader (rag/weights/reader): `make reader` runs every stage in order.

    python recipes/reader.py data                 # development questions + grounded targets (reader_data.py)
    python recipes/reader.py train --run main     # resumable: re-run the same command after an interruption
    python recipes/reader.py export --run main    # the run's LoRA deltas -> rag/weights/reader (sha256 manifest)

Every run fine-tunes SmolLM2-135M-Instruct (the default generator) and all-MiniLM-L6-v2's q(x) with LoRA
deltas through the RAG loss (rag.training), d(z) and the index frozen, on the training knowledge base of
reader_data.py, with the "plain" prompt (passage, then "Question: ... / Answer:"). The runs (RUNS) differ
in one setting each, so that results/reader.md can compare them at equal steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "recipes")]

OUT = ROOT / "bench" / "out" / "reader"
# How many training examples each source contributes (in a seeded order), before shuffling them together.
MIX = {"nq-gold": 1058, "squad": 1500, "nq-dev": 1000, "trivia-dev": 900, "wq-train": 300, "red-trivia": 149}


@dataclasses.dataclass(frozen=True)
class Run:
    kind: str = "token"
    k: int = 3
    steps: int = 400  # 3,200 of the 4,907 examples of MIX, 8 per step (what one core allows in hours)
    batch_size: int = 2  # questions per micro-batch (4 peaked at 12 GB of RSS; 2 at 5 GB)
    grad_accum: int = 4  # micro-batches per optimiser step: 8 questions per step
    counterfactual_rate: float = 0.3
    freeze_query_encoder: bool = False
    generator_rank: int = 16
    query_rank: int = 8
    lr: float = 3e-4  # LoRA pairs start at B = 0: higher rates than full fine-tuning
    warmup: int = 30
    seed: int = 0


RUNS = {
    "main": Run(),
    "no-counterfactual": Run(counterfactual_rate=0.0),
    "frozen-q": Run(freeze_query_encoder=True),
    "sequence": Run(kind="sequence"),
}


IDS_FILE = ROOT / "recipes" / "reader-training-ids.txt"  # source:id of every example MIX takes (committed)


def training_rows(data_dir: Path, seed: int = 0) -> list[dict[str, Any]]:
    """The MIX's examples, in training order (a function of the data and the seed)."""
    rows: list[dict[str, Any]] = []
    for name, n in MIX.items():
        source = [json.loads(line) for line in (data_dir / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
        random.Random(f"{seed}-{name}").shuffle(source)
        rows += source[:n]
    random.Random(seed).shuffle(rows)
    return rows


def write_training_ids(data_dir: Path) -> None:
    """The ids the shipped reader may have seen, so that a test can check them against every evaluation."""
    from rag.io import atomic_write_text

    ids = sorted(f"{r['source']}:{r['id']}" for r in training_rows(data_dir))
    atomic_write_text(IDS_FILE, "".join(i + "\n" for i in ids))


def training_examples(data_dir: Path, seed: int = 0) -> list[Any]:
    from rag.training import Example

    rows = training_rows(data_dir, seed)
    return [Example.pair(r["input"], r["target"], tuple(dict.fromkeys([r["target"], *r["answers"]])), id=f"{r['source']}:{r['id']}") for r in rows]


def dev_examples(n: int = 100) -> list[Any]:
    """A development sample for the training curves: NQ-gold questions that results/evaluation.md
    reports (never trained on; reader_data excludes them)."""
    from run_results import question_sets, sample

    from rag.knowledge import default_knowledge_base
    from rag.resources import shared_data_dir
    from rag.training import Example

    sets = question_sets(shared_data_dir(), default_knowledge_base())
    return [Example.pair(e.input, e.answers[0], e.answers, id=e.id) for e in sample(sets["nq"], n)]


def train_config(run: Run, kb: Path) -> Any:
    from rag.config import GeneratorConfig, LoraSpec, RagConfig
    from rag.training import TrainConfig

    rag = RagConfig(kind=run.kind, k=run.k, index_dir=str(kb),
                    generator=GeneratorConfig(prompt="plain", dtype="bfloat16", attention="eager"))  # fmt: skip
    return TrainConfig(
        rag=rag, steps=run.steps, batch_size=run.batch_size, grad_accum=run.grad_accum, lr=run.lr,
        warmup_steps=run.warmup, schedule="linear", bf16=True, seed=run.seed,
        freeze_query_encoder=run.freeze_query_encoder, counterfactual_rate=run.counterfactual_rate,
        generator_lora=LoraSpec(rank=run.generator_rank, alpha=2.0 * run.generator_rank),
        query_lora=None if run.freeze_query_encoder else LoraSpec(rank=run.query_rank, alpha=2.0 * run.query_rank),
        eval_every=100, save_every=20, snapshot_every=100, eval_max_new_tokens=16, eval_batch_size=16,
    )  # fmt: skip


def _report(step: int, record: dict[str, Any]) -> None:
    """Print the step's record with the process's memory, after handing freed heap back to the system:
    glibc keeps it otherwise, and the run grew to 8 GB of RSS (OOM-killed beside other jobs)."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    rss_gb = int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**30
    print(json.dumps({"step": step, **record, "rss_gb": round(rss_gb, 2)}), flush=True)


def train(name: str, threads: int, until: int | None) -> None:
    import torch

    from rag.model import RagModel
    from rag.training import train as run_training

    torch.set_num_threads(threads)
    run = RUNS[name]
    summary = json.loads((OUT / "data" / "summary.json").read_text(encoding="utf-8"))
    config = train_config(run, Path(summary["kb"]))
    out = OUT / "runs" / name
    resume = (out / "checkpoint").is_dir()
    done = json.loads((out / "checkpoint" / "config.json").read_text())["step"] if resume else 0
    stop_after = None if until is None else max(0, until - done)
    model = RagModel.from_config(config.rag)
    examples = training_examples(OUT / "data", run.seed)
    started = time.perf_counter()
    result = run_training(model, examples, config, dev_examples(), out, resume=resume, progress=False,
                          stop_after=stop_after, on_step=_report)  # fmt: skip
    print(json.dumps({"run": name, "steps": result.steps, "seconds_this_call": time.perf_counter() - started,
                      "threads": threads}), flush=True)  # fmt: skip


def export(checkpoint: Path, folder: Path, dtype: str = "bfloat16", info: dict[str, Any] | None = None) -> Path:
    """A run's checkpoint (or snapshot) -> a reader folder (rag.reader): its LoRA deltas and a manifest
    with every file's sha256. The generator's delta is stored in `dtype` (bfloat16 halves the shipped
    size); q(x)'s stays float32 (1.3 MB), which `rag search`'s numpy q(x) can merge without torch."""
    import torch

    from rag.config import DEFAULT_ENCODER, DEFAULT_GENERATOR
    from rag.io import atomic_dir
    from rag.lora import read_delta, save_delta, sha256_file
    from rag.reader import FORMAT, MANIFEST

    parts = {"generator": checkpoint / "generator_delta", "query_encoder": checkpoint / "query_encoder_delta"}
    with atomic_dir(folder) as tmp:
        meta: dict[str, Any] = {"format": FORMAT, "prompt": "plain", "generator_base": DEFAULT_GENERATOR,
                                "query_base": DEFAULT_ENCODER, "source": _shown(checkpoint), **(info or {})}  # fmt: skip
        for name, source in parts.items():
            if not source.is_dir():
                continue  # q(x) frozen: no delta for it
            delta = read_delta(source)
            stored = getattr(torch, dtype) if name == "generator" else torch.float32
            save_delta(tmp / name, delta.tensors, delta.spec, delta.base, dtype=stored)
            meta[name] = name
        meta["files"] = {str(f.relative_to(tmp)): sha256_file(f) for f in sorted(tmp.rglob("*")) if f.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def _record_run(run_dir: Path) -> None:
    """The shipped run's config and log into results/, beside results/reader.md (paths relative to the checkout)."""
    from rag.io import atomic_write_text

    config = json.loads((run_dir / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    text = json.dumps({"rag": config["rag"], "train": config["train"]}, indent=2).replace(f"{ROOT}/", "")
    atomic_write_text(ROOT / "results" / "reader-train-config.json", text + "\n")
    atomic_write_text(ROOT / "results" / "reader-train-log.jsonl", (run_dir / "log.jsonl").read_text(encoding="utf-8"))


def _shown(path: Path) -> str:
    """A path as the manifest records it: relative to the checkout (never this machine's layout)."""
    try:
        return str(path.absolute().relative_to(ROOT))
    except ValueError:
        return path.name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["data", "train", "export"])
    parser.add_argument("--run", default="main", choices=sorted(RUNS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--until", type=int, default=None, help="train up to this step (an ablation's 100)")
    args = parser.parse_args(argv)
    if args.stage == "data":
        from reader_data import build

        print(json.dumps(build(OUT / "data", k=RUNS["main"].k), indent=2))
        write_training_ids(OUT / "data")
    elif args.stage == "train":
        train(args.run, args.threads, args.until)
    elif args.stage == "export":
        from rag.reader import READER_DIR

        run_dir = OUT / "runs" / args.run
        log = [json.loads(line) for line in (run_dir / "log.jsonl").read_text(encoding="utf-8").splitlines()]
        info = {"recipe": "make reader (recipes/reader.py)", "run": args.run, "steps": log[-1]["step"],
                "examples_seen": log[-1]["step"] * RUNS[args.run].batch_size * RUNS[args.run].grad_accum,
                "train_cpu_hours": round(sum(r["seconds"] for r in log) / 3600, 2),
                "settings": dataclasses.asdict(RUNS[args.run])}  # fmt: skip
        print(export(run_dir / "checkpoint", READER_DIR, "bfloat16", info))
        _record_run(run_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
