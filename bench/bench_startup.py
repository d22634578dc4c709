"""Start-up: whole-process time of `rag --help`, `rag index info` and `rag search`, this tree against an
earlier one (--before DIR: a checkout, e.g. `git worktree add /tmp/before abb17d6`), in alternating rounds.

    python bench/bench_startup.py --before /tmp/before --kb ~/.cache/rag/kb/default

Each command runs as its own process (`python -m rag.cli ...` with PYTHONPATH set to the tree), warm (the
files in the page cache after a first run). Wall time is what a user waits; CPU time (user + system of the
child) is what the command costs, and varies less with the machine's load. Older trees spell
`rag search KB QUERY` and `rag index info KB`, newer ones `--index KB`: --before-search-style picks. Prints a
table and writes bench/out/bench_startup.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out" / "bench_startup.json"
QUERY = "What is the capital of Angola?"


def commands(kb: str, search_style: str) -> dict[str, list[str]]:
    if search_style == "positional":  # rag search KB QUERY, rag index info KB
        search, info = ["search", kb, QUERY], ["index", "info", kb]
    else:  # one --index convention on every command
        search, info = ["search", QUERY, "--index", kb], ["index", "info", "--index", kb]
    return {"rag --help": ["--help"], "rag index info": info, "rag search": [*search, "-k", "5"]}


def run_once(tree: Path, args: list[str]) -> tuple[float, float]:
    """(wall seconds, child CPU seconds) of one `python -m rag.cli ARGS` process."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    # cwd=tree: `python -m` puts the working directory first on sys.path, before PYTHONPATH
    done = subprocess.run([sys.executable, "-m", "rag.cli", *args], env=env, capture_output=True, text=True, cwd=tree)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{tree}: rag {' '.join(args)} failed: {done.stderr[-500:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the earlier tree (a checkout)")
    parser.add_argument("--before-search-style", choices=["positional", "flag"], default="positional")
    parser.add_argument("--kb", required=True, help="a knowledge base folder both trees can open")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    sides = {"before": (args.before, commands(args.kb, args.before_search_style)),
             "after": (ROOT, commands(args.kb, "flag"))}  # fmt: skip
    for tree, cmds in sides.values():  # warm the page cache (and any one-off conversion) first
        for cmd in cmds.values():
            run_once(tree, cmd)
    load_before = os.getloadavg()
    samples: dict[str, dict[str, list[tuple[float, float]]]] = {s: {c: [] for c in sides[s][1]} for s in sides}
    for _ in range(args.rounds):
        for name in sides["after"][1]:
            for side, (tree, cmds) in sides.items():  # alternating: before, after, before, after ...
                samples[side][name].append(run_once(tree, cmds[name]))
    res: dict[str, Any] = {"rounds": args.rounds, "kb": args.kb, "before": str(args.before), "commands": {},
                           "loadavg_before": [round(v, 1) for v in load_before],
                           "loadavg_after": [round(v, 1) for v in os.getloadavg()], "cpus": os.cpu_count()}  # fmt: skip
    print("\n| command (whole process, warm) | before wall s (best / median) | after wall s (best / median) "
          "| before CPU s | after CPU s | target |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---:|")
    for name in sides["after"][1]:
        row = {}
        for side in sides:
            walls, cpus = zip(*samples[side][name], strict=True)
            row[side] = {"wall_best": min(walls), "wall_median": statistics.median(walls),
                         "cpu_best": min(cpus), "cpu_median": statistics.median(cpus)}  # fmt: skip
        res["commands"][name] = row
        b, a = row["before"], row["after"]
        target = "1.5" if name == "rag search" else ""
        print(f"| {name} | {b['wall_best']:.2f} / {b['wall_median']:.2f} | {a['wall_best']:.2f} / {a['wall_median']:.2f} "
              f"| {b['cpu_median']:.2f} | {a['cpu_median']:.2f} | {target} |")  # fmt: skip
    print(f"load average before/after: {res['loadavg_before']} / {res['loadavg_after']} on {res['cpus']} CPUs")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
