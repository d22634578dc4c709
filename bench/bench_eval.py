"""`rag eval` throughput (RAG-Token, k = 5, greedy, the defaults of the day) of this tree against an earlier
one, on the same questions and the same knowledge base, in alternating rounds.

    python bench/bench_eval.py --before /tmp/before --questions 1000 --rounds 1
    python bench/bench_eval.py --before /tmp/before --questions 100 --prompt plain   # the trained reader's prompt

Each run is the real command (`python -m rag.cli eval --task red-trivia --part dev --limit N -k 5 --kind
token ...`, PYTHONPATH set to the tree) into a fresh folder; the figure is its metrics.json's questions per
second (model loading excluded, retrieval and generation included) and its exact match, which must not
move (decoding's numbers do not change). Prints a table and writes bench/out/bench_eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.resources import red_trivia_dir  # noqa: E402

OUT = ROOT / "bench" / "out" / "bench_eval.json"


def run_eval(tree: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "rag.cli", "eval", "--task", "red-trivia", "--data", str(red_trivia_dir()),
           "--part", "dev", "--limit", str(args.questions), "-k", "5", "--kind", "token", "--prompt", args.prompt,
           "--out", str(out), "--no-progress"]  # fmt: skip
    if args.index:
        cmd += ["--index", args.index]
    start = time.perf_counter()
    # cwd=tree: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    done = subprocess.run(cmd, env=dict(os.environ, PYTHONPATH=str(tree)), capture_output=True, text=True, cwd=tree)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: rag eval failed: {done.stderr[-800:]}")
    metrics = json.loads(next(out.rglob("metrics.json")).read_text())
    return {"questions_per_s": metrics["timing"]["questions_per_s"], "n": metrics["n"],
            "exact_match": metrics["metrics"].get("exact_match"), "process_s": time.perf_counter() - start}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the earlier tree (a checkout)")
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--prompt", default="short-answer")
    parser.add_argument("--index", default="", help="knowledge base (default: each tree's default one)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    runs: dict[str, list[dict[str, Any]]] = {"before": [], "after": []}
    with tempfile.TemporaryDirectory(prefix="bench_eval.") as tmp:
        for r in range(args.rounds):
            for side, tree in (("before", args.before), ("after", ROOT)):
                runs[side].append(run_eval(tree, Path(tmp) / f"{side}{r}", args))
                print(f"{side} round {r}: {runs[side][-1]}", flush=True)
    best = {side: max(runs[side], key=lambda x: x["questions_per_s"]) for side in runs}
    res = {"settings": vars(args) | {"before": str(args.before)}, "runs": runs,
           "speedup": best["after"]["questions_per_s"] / best["before"]["questions_per_s"],
           "loadavg_before": [round(v, 1) for v in load_before],
           "loadavg_after": [round(v, 1) for v in os.getloadavg()], "cpus": os.cpu_count()}  # fmt: skip
    print(f"\n| rag eval RAG-Token k=5 greedy, {args.questions} Red-Trivia dev questions, --prompt {args.prompt} "
          "| q/s | exact match |")  # fmt: skip
    print("|---|---:|---:|")
    for side in ("before", "after"):
        print(f"| {side} ({args.before if side == 'before' else 'this tree'}) | {best[side]['questions_per_s']:.2f} "
              f"| {best[side]['exact_match']:.3f} |")  # fmt: skip
    print(f"speed-up {res['speedup']:.2f}x; load average before/after: {res['loadavg_before']} / "
          f"{res['loadavg_after']} on {res['cpus']} CPUs")  # fmt: skip
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
