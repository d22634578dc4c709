"""Issue 14's quiet-machine figures in one run: what a new user waits for, with today's defaults.

    python bench/bench_quiet.py                    # the full run: about 12-15 min on a quiet 2-core machine
    python bench/bench_quiet.py --questions 20     # a smoke run (still two knowledge-base builds)

Run it with nothing else on the machine (the figures are absolute, not ratios). Every step is the real
command in its own process, with RAG_CACHE pointing at a fresh temporary cache that this script creates
and deletes at the end (the user's ~/.cache/rag is never read or written):

  (a) the default knowledge-base build from an empty cache (`default_knowledge_base()`: corpus, d(z) in
      the automatic dtype, index), wall seconds;
  (b) the first `make demo` after setup on an empty cache (its `rag ask` with the Makefile's three
      questions: builds the knowledge base, converts the generator, answers), wall seconds;
  (c) `rag eval` RAG-Token k = 5 greedy on N Red-Trivia development questions with the defaults of the day
      (the shipped trained reader), questions per second from its metrics.json (model loading excluded);
  (d) `rag search` whole process, warm (after one run), wall seconds: median and best of --search-runs;
  (e) `rag ask` RAG-Sequence thorough, 4 beams, k = 5: mean seconds per question after a warm-up
      (bench/bench_generation.py's `rag ask` latency, its five questions).

(c)-(e) use the cache (b) filled. Torch uses its default threads (all cores) unless --threads is given.
Prints a table against the issue's targets and writes bench/out/bench_quiet.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "bench_quiet.json"
DEMO_QUESTIONS = ["What is the capital of Angola?", "Who wrote the tragedy Hamlet?",
                  "What is the highest mountain on Earth?"]  # the Makefile's `make demo`  # fmt: skip
SEARCH_QUERY = "What is the capital of Angola?"
TARGETS = {"kb_build_s": ("<=", 30.0), "first_demo_s": ("<=", 60.0), "eval_questions_per_s": (">=", 5.0),
           "search_wall_s": ("<=", 1.5), "ask_sequence_4_beams_s": ("<=", 2.0)}  # fmt: skip


def run(cmd: list[str], cache: Path, threads: int, what: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one process of this tree, RAG_CACHE set to `cache`."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAG_CACHE=str(cache))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)  # cwd: `python -m` reads it first
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({' '.join(cmd[:6])} ...): {done.stderr[-1500:]}")
    return wall, done.stdout


def rag_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "rag.cli", *args]


def step(name: str, results: dict[str, Any], fn) -> None:
    load = os.getloadavg()
    start = time.perf_counter()
    value = fn()
    results["steps"][name] = {"value": value, "load_average_before": load, "load_average_after": os.getloadavg(),
                              "step_wall_s": time.perf_counter() - start}  # fmt: skip
    print(f"{name}: {value if not isinstance(value, float) else round(value, 3)} "
          f"(load {load[0]:.2f} -> {os.getloadavg()[0]:.2f})", flush=True)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=1000, help="(c): Red-Trivia development questions")
    parser.add_argument("--search-runs", type=int, default=5, help="(d): warm runs")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every step (0: torch's default)")
    parser.add_argument("--tmp", type=Path, default=None, help="where the temporary caches go (default: $TMPDIR)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    threads = args.threads
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    results: dict[str, Any] = {"commit": commit.strip(), "cpus": os.cpu_count(), "threads": threads or "default",
                               "questions": args.questions, "steps": {}}  # fmt: skip
    print(f"bench_quiet at {results['commit']}, {os.cpu_count()} CPUs, load average {os.getloadavg()}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="bench_quiet.", dir=args.tmp))  # this script's own: deleted at the end
    try:
        build_cache, cache = work / "cache-build", work / "cache-demo"
        build_cache.mkdir()
        cache.mkdir()
        build = "from rag.knowledge import default_knowledge_base; print(default_knowledge_base(progress=False))"
        step("kb_build_s", results, lambda: run([sys.executable, "-c", build], build_cache, threads, "(a) build")[0])
        shutil.rmtree(build_cache)  # (b) starts from its own empty cache; only one build kept on disk
        step("first_demo_s", results, lambda: run(rag_cli("ask", *DEMO_QUESTIONS), cache, threads, "(b) demo")[0])

        def evaluate() -> float:
            from rag.resources import red_trivia_dir

            out = work / "eval"
            run(rag_cli("eval", "--task", "red-trivia", "--data", str(red_trivia_dir()), "--part", "dev", "--limit",
                        str(args.questions), "-k", "5", "--kind", "token", "--out", str(out), "--no-progress"),
                cache, threads, "(c) eval")  # fmt: skip
            metrics = json.loads(next(out.rglob("metrics.json")).read_text())
            results["eval_metrics"] = {"n": metrics["n"], "exact_match": metrics["metrics"].get("exact_match"),
                                       "timing": metrics["timing"]}  # fmt: skip
            return float(metrics["timing"]["questions_per_s"])

        step("eval_questions_per_s", results, evaluate)

        def search() -> float:
            cmd = rag_cli("search", SEARCH_QUERY, "-k", "5")
            run(cmd, cache, threads, "(d) search")  # warm: files in the page cache
            walls = [run(cmd, cache, threads, "(d) search")[0] for _ in range(args.search_runs)]
            results["search_walls_s"] = walls
            results["search_best_s"] = min(walls)
            return statistics.median(walls)

        step("search_wall_s", results, search)

        def ask() -> float:
            out = work / "ask.json"
            cmd = [sys.executable, str(ROOT / "bench" / "bench_generation.py"), "--no-decoding", "--ask-settings",
                   "sequence:4", "--out", str(out)] + (["--threads", str(threads)] if threads else [])  # fmt: skip
            run(cmd, cache, threads, "(e) ask")
            runs = json.loads(out.read_text())["ask"]["runs"]
            results["ask"] = runs
            return float(runs[0]["mean_s"])

        step("ask_sequence_4_beams_s", results, ask)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["load_average_end"] = os.getloadavg()
    print("\n| measure (quiet machine) | measured | target | met |\n|---|---:|---:|---|")
    for name, (direction, target) in TARGETS.items():
        value = results["steps"][name]["value"]
        met = value <= target if direction == "<=" else value >= target
        print(f"| {name} | {value:.2f} | {direction} {target:g} | {met} |")
    print(f"threads: {results['threads']}, load average at the end: {results['load_average_end']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
