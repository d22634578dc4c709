"""The run folder of rag.evaluation: what was run (run.json) and what was predicted (predictions.jsonl).

A folder holds one run. `run_identity` is what must match for a re-run to append to it (settings,
data, generator configuration); `read_predictions` reads the appended lines and repairs a torn last one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rag.config import EvalConfig, to_dict
from rag.io import atomic_write_text, check_output_dir


def run_identity(config: EvalConfig, task: dict[str, Any], generator: Any = None,
                 retriever: Any = None) -> dict[str, Any]:  # fmt: skip
    """What must match for a re-run to append to a folder: the settings, the data, the generator's
    configuration (its path and prompt style; a resumed run must not mix two prompts) and, unless it is
    the dense one, the retriever (BM25's temperature, the hybrid's fusion)."""
    settings = to_dict(config)
    settings.pop("progress")
    settings.pop("batch_size")
    identity = {"config": json.loads(json.dumps(settings, default=str)), "task": task}
    if generator is not None and config.mode != "retrieval-only":
        identity["generator"] = json.loads(json.dumps(to_dict(generator.generator_config), default=str))
    kind = getattr(retriever, "kind", "dense")
    if retriever is not None and config.mode != "closed-book" and kind != "dense":
        identity["retriever"] = {"kind": kind, "bm25_temperature": retriever.temperature}
        if kind == "hybrid":
            identity["retriever"]["fusion"] = to_dict(retriever.fusion)
    return identity


def read_predictions(path: Path) -> list[dict[str, Any]]:
    """Every complete line of a predictions file (a torn last line, from an interrupted write, is
    left out; `drop_torn_line` cuts it off before a run appends). Reading never changes the file."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    records = []
    for number, line in enumerate(raw[: raw.rfind(b"\n") + 1].splitlines(), start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise ValueError(f"{path}, line {number}: not a JSON object ({err})") from None
        if not isinstance(record, dict) or "id" not in record:
            raise ValueError(f"{path}, line {number}: not a prediction record (a JSON object with an id)")
        records.append(record)
    return records


def drop_torn_line(path: Path) -> None:
    """Cut a torn last line (an interrupted write) off the run's own predictions file, so that
    appending continues on a clean line; only ever called on a run folder that is this run's."""
    if not path.exists():
        return
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(max(0, size - (1 << 20)))
        tail = f.read()
        cut = tail.rfind(b"\n")
        keep = size - len(tail) + cut + 1 if cut >= 0 else (0 if size <= (1 << 20) else None)
        if keep is None:
            raise ValueError(f"{path}: last line is over 1 MiB without a newline; not a predictions file")
        if keep < size:
            f.truncate(keep)


RUN_FILE, PREDICTIONS_FILE, METRICS_FILE = "run.json", "predictions.jsonl", "metrics.json"
EVAL_MARKER = "rag_eval.json"  # marks a `rag eval --out` folder (it holds run folders and the report)
_REPORT_NAMES = ("report.md", "hotswap.md", "index-facts-b")


def is_eval_run(path: Path) -> bool:
    """Whether `path` is one evaluation's run folder (its run.json is an identity this module wrote)."""
    try:
        identity = json.loads((path / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(identity, dict) and "config" in identity and "task" in identity


def is_eval_output(path: Path) -> bool:
    """Whether `path` is a `rag eval --out` folder: its marker, or (from before the marker) nothing but
    run folders and the report's files."""
    if (path / EVAL_MARKER).is_file():
        return True
    entries = [p for p in path.iterdir() if not p.name.startswith(".")]
    return bool(entries) and all(
        is_eval_run(p) or p.name in _REPORT_NAMES or (p.suffix == ".png" and p.is_file()) for p in entries
    )


def check_run(out_dir: Path, identity: dict[str, Any], overwrite: bool = False) -> None:
    """The run folder holds this run (resume), or nothing: then it is claimed for this run. A folder of
    another run is replaced only with `overwrite` (its own files only); a folder of anything else never.
    Call it holding the folder's lock (evaluate_many does)."""
    check_output_dir(out_dir, what="evaluation run", is_own=is_eval_run, reuse_own=True)
    run_file = out_dir / RUN_FILE
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous == identity:
            return
        if not overwrite:
            raise ValueError(
                f"{out_dir}: holds predictions of a different run (see run.json); use another output "
                "folder, or --overwrite to start this run over there"
            )
        for name in (PREDICTIONS_FILE, METRICS_FILE, RUN_FILE):
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_text(run_file, json.dumps(identity, indent=2, sort_keys=True))
