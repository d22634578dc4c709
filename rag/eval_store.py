"""The run folder of rag.evaluation: what was run (run.json) and what was predicted (predictions.jsonl).

A folder holds one run. `run_identity` is what must match for a re-run to append to it (settings,
data, generator configuration); `read_predictions` reads the appended lines and repairs a torn last one.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rag.config import EvalConfig, to_dict
from rag.io import atomic_write_text


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


def check_run(out_dir: Path, identity: dict[str, Any]) -> None:
    run_file = out_dir / "run.json"
    if run_file.exists():
        previous = json.loads(run_file.read_text(encoding="utf-8"))
        if previous != identity:
            raise ValueError(
                f"{out_dir}: holds predictions of a different run (see run.json); use another output "
                "folder, or delete it to start over"
            )
    else:
        atomic_write_text(run_file, json.dumps(identity, indent=2, sort_keys=True))
