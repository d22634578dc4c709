"""The Markdown report of one or more `rag eval` runs, with plots (matplotlib, Agg backend).

Reads each run folder's metrics.json and predictions.jsonl (written by rag.evaluation), so a report can
be rebuilt at any time from what is on disk. Plots: recall@k against k (from the per-question answer
hits of the retrieved passages) and the task metric against k (one line per model and decoding; the
closed-book baseline as a horizontal line).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag import metrics as MT
from rag.eval_store import read_predictions
from rag.io import atomic_path, atomic_write_text


@dataclass(frozen=True)
class RunSummary:
    name: str  # the run's label in tables and plots
    out_dir: Path
    mode: str
    kind: str | None
    decoding: str | None  # RAG-Sequence: thorough | fast
    k: int
    n: int
    metrics: dict[str, float | None]
    recall: dict[int, float]
    questions_per_s: float


def load_run(out_dir: Path | str) -> RunSummary:
    out_dir = Path(out_dir)
    path = out_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (run `rag eval` into {out_dir} first)")
    data = json.loads(path.read_text(encoding="utf-8"))
    config = data["config"]
    mode, kind = config["mode"], config["kind"] if config["mode"] == "rag" else None
    dec = config["decoding"]["decoding"] if kind == "sequence" else None
    return RunSummary(
        name=_label(mode, kind, dec),
        out_dir=out_dir,
        mode=mode,
        kind=kind,
        decoding=dec,
        k=int(config["k"]) if mode == "rag" else 0,
        n=int(data["n"]),
        metrics=data["metrics"],
        recall={int(k): v for k, v in data["recall_at_k"].items()},
        questions_per_s=float(data["timing"]["questions_per_s"]),
    )


def _label(mode: str, kind: str | None, dec: str | None) -> str:
    if mode != "rag":
        return mode
    return "RAG-Token" if kind == "token" else f"RAG-Sequence ({dec})"


def recall_curve(out_dir: Path) -> list[float]:
    """recall@k for k = 1 .. depth, from a run's per-question passage hits."""
    hits = [r["hits"] for r in read_predictions(out_dir / "predictions.jsonl") if "hits" in r]
    if not hits:
        return []
    depth = min(len(h) for h in hits)
    return [v for _, v in sorted(MT.recall_at_k(hits, range(1, depth + 1)).items())]


def _main_metric(run: RunSummary) -> tuple[str, float | None]:
    for name in ("exact_match", "accuracy", "answer_in_top_passage", "qbleu1", "bleu1"):
        if name in run.metrics:
            return name, run.metrics[name]
    return "-", None


def _save(fig: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def plot_recall(curve: list[float], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker=".")
    ax.set(xlabel="k (passages retrieved)", ylabel="recall@k (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    _save(fig, path)
    plt.close(fig)


def plot_metric(runs: Sequence[RunSummary], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    lines: dict[str, list[tuple[int, float]]] = {}
    for run in runs:
        name, value = _main_metric(run)
        if value is None:
            continue
        if run.mode == "closed-book":
            ax.axhline(100 * value, linestyle="--", color="grey", label="closed-book")
        elif run.mode == "retrieval-only":
            ax.scatter([1], [100 * value], marker="x", color="black", label="retrieval-only (top passage)")
        else:
            lines.setdefault(run.name, []).append((run.k, 100 * value))
    for name, points in lines.items():
        points.sort()
        ax.plot([k for k, _ in points], [v for _, v in points], marker="o", label=name)
    ax.set(xlabel="k (passages marginalised)", ylabel="exact match (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)
    plt.close(fig)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def report_markdown(title: str, runs: Sequence[RunSummary], recall: list[float], images: dict[str, str]) -> str:
    lines = [f"# {title}", ""]
    if recall:
        ks = [k for k in (1, 5, 10, 20, 50, 100) if k <= len(recall)]
        lines += ["| " + " | ".join(f"recall@{k}" for k in ks) + " |", "|" + "---|" * len(ks)]
        lines += ["| " + " | ".join(_fmt(recall[k - 1]) for k in ks) + " |", ""]
    lines += ["| run | k | n | metric | value (%) | questions/s |", "|---|---|---|---|---|---|"]
    for run in runs:
        name, value = _main_metric(run)
        lines.append(f"| {run.name} | {run.k or '-'} | {run.n} | {name} | {_fmt(value)} | {run.questions_per_s:.2f} |")
    lines.append("")
    for caption, file in images.items():
        lines += [f"![{caption}]({file})", ""]
    return "\n".join(lines)


def write_report(run_dirs: Sequence[Path | str], out_dir: Path | str, title: str = "rag eval") -> Path:
    """report.md with a table of every run and the two plots, in out_dir; returns the report path."""
    out_dir = Path(out_dir)
    runs = [load_run(d) for d in run_dirs]
    with_hits = [r for r in runs if r.mode != "closed-book"]
    recall = recall_curve(max(with_hits, key=lambda r: r.n).out_dir) if with_hits else []
    images: dict[str, str] = {}
    if recall:
        plot_recall(recall, out_dir / "recall_at_k.png", title)
        images["recall@k against k"] = "recall_at_k.png"
    plot_metric(runs, out_dir / "metric_vs_k.png", title)
    images["metric against k"] = "metric_vs_k.png"
    path = out_dir / "report.md"
    atomic_write_text(path, report_markdown(title, runs, recall, images))
    return path
