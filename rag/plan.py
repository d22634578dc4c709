"""`rag index plan`: what N passages of dimension D need, from measurements, not guesses.

    rag index plan --passages 21000000 --dim 768 --ram 24GiB --recall 0.95

The figures come from bench/bench_scale.py's run of 1M x 768 indexes on this project's reference
machine (rag/scale_measurements.py, written by that benchmark with --write-plan): for each index kind
and search setting, bytes per passage held in RAM while searching and on disk, recall@10 against
exact search, and q/s per core at batch 1 and 64. Scaling them to N passages in S shards:

- memory: each shard holds n = N / S passages; RAM per machine = n x resident bytes per passage x
  (D / D0) + a fixed reserve (the process, the query encoder; `reserve`), and must stay under the
  machine's RAM x `headroom`. The float16 re-rank store of IVF-PQ is memory-mapped from disk and only
  the candidates' rows are read, so it counts on disk, not in RAM (the page cache keeps what it can).
- speed: every kind's search work per query grows at most linearly with the passages it scans; q/s
  per shard is scaled by n0 / n (flat: exactly; IVF-PQ with the lists growing as sqrt(n) and the same
  fraction of them probed: the same; HNSW: conservatively, its cost grows like log n). A batch of
  queries goes to every shard at once, so a sharded search answers at the q/s of one shard.
- recall: the measured recall@10 at the same setting (flat: 1). An approximate index measured at
  fewer passages than a shard holds is marked extrapolated: its recall falls with N at a fixed
  re-rank depth. Measured on this project's synthetic vectors, IVF-PQ re-ranking 100 candidates had
  recall@10 0.994 to 0.996 at 1M and 0.55 at 21M (nprobe 32 to 128): 21x as many passages crowd the
  true top 10 among PQ's near-ties, and 1,000 to 2,000 candidates were needed for 0.965 to 0.99
  (results/scale.md).

The recommendation is the setting that reaches the recall with the fewest machines, then one whose
recall was measured at the shard's size or more, then the most q/s. bench/bench_21m.py's settings,
measured at 21M, are among the measurements.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

GIB = 2**30


@dataclass(frozen=True)
class Measured:
    """One index kind and search setting, measured at n0 passages of dimension d0 on one core."""

    kind: str  # flat, hnsw, ivfpq
    setting: str  # e.g. "IVF4096,PQ64 nprobe 64 rerank 10"
    n0: int
    d0: int
    resident_bytes: float  # per passage, in RAM while searching
    disk_bytes: float  # per passage, on disk
    recall_at_10: float
    qps_b1: float
    qps_b64: float
    build_cpu_s: float  # to build n0 passages on one core
    scaling: str  # how q/s and recall carry to other N: "linear" or "log"


@dataclass(frozen=True)
class Option:
    measured: Measured
    machines: int
    passages_per_shard: int
    ram_per_machine: float  # bytes
    disk_per_machine: float
    qps_b1: float  # per shard; the sharded search answers at this rate
    qps_b64: float
    recall_at_10: float
    recall_extrapolated: bool
    build_cpu_hours: float  # every shard's build, summed

    @property
    def latency_ms(self) -> float:
        return 1000.0 / self.qps_b1


def parse_bytes(text: str) -> int:
    """'24GiB' or '24G' (binary), '24GB' (decimal), '512MiB', '1.5T', '1000000' (bytes) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT])?(i)?(B)?\s*", text, flags=re.IGNORECASE)
    if not match:
        raise ValueError(f"--ram: expected a size like 24GiB or 64G, got {text!r}")
    unit = (match.group(2) or "").upper()
    decimal = bool(unit) and bool(match.group(4)) and not match.group(3)  # "GB": 10^9; "GiB", "G": 2^30
    return int(float(match.group(1)) * (1000 if decimal else 1024) ** (" KMGT".index(unit or " ")))


def options(passages: int, dim: int, ram: int, measurements: list[Measured], reserve: float = 2 * GIB,
            headroom: float = 0.85, max_machines: int = 1024) -> list[Option]:  # fmt: skip
    """Every measured setting scaled to `passages` x `dim` on the fewest machines of `ram` bytes."""
    if passages < 1 or dim < 1:
        raise ValueError(f"--passages and --dim must be >= 1, got {passages} and {dim}")
    usable = ram * headroom - reserve
    if usable <= 0:
        raise ValueError(f"--ram {ram / GIB:.1f} GiB leaves nothing after the {reserve / GIB:.1f} GiB reserve")
    out = []
    for m in measurements:
        per_passage = m.resident_bytes * dim / m.d0
        machines = max(1, math.ceil(passages * per_passage / usable))
        if machines > max_machines:
            continue
        n = math.ceil(passages / machines)
        factor = m.n0 / n if m.scaling == "linear" else math.log(m.n0) / math.log(max(n, 2))
        factor *= m.d0 / dim  # the scanned bytes grow with D as well
        out.append(Option(m, machines, n, reserve + n * per_passage, n * m.disk_bytes * dim / m.d0,
                          m.qps_b1 * factor, m.qps_b64 * factor, m.recall_at_10,
                          m.kind != "flat" and n > m.n0, m.build_cpu_s * passages / m.n0 / 3600))  # fmt: skip
    return out


def recommend(choices: list[Option], recall: float) -> Option | None:
    """The fewest machines reaching `recall`, then a recall measured at the shard's size or more,
    then the fastest at batch 1."""
    good = [o for o in choices if o.recall_at_10 >= recall]
    return min(good, key=lambda o: (o.machines, o.recall_extrapolated, -o.qps_b1), default=None)


def load_measurements() -> list[Measured]:
    try:
        from rag.scale_measurements import MEASUREMENTS
    except ImportError:
        raise ValueError("no scale measurements: rag index plan gives only figures scaled from a measured run, and "
                         "none is recorded in this install (rag/scale_measurements.py); measure one with "
                         "`python bench/bench_scale.py`, then `--write-plan`") from None  # fmt: skip
    return [Measured(**m) for m in MEASUREMENTS]


def plan_table(passages: int, dim: int, ram: int, recall: float, measurements: list[Measured]) -> dict[str, Any]:
    """The options (best per kind first) and the recommendation, as plain data for printing or JSON."""
    choices = options(passages, dim, ram, measurements)
    best = recommend(choices, recall)
    rows = []
    for o in sorted(choices, key=lambda o: (o.measured.kind, o.machines, -o.recall_at_10, -o.qps_b1)):
        rows.append({"kind": o.measured.kind, "setting": o.measured.setting, "machines": o.machines,
                     "passages_per_shard": o.passages_per_shard, "ram_per_machine_gib": o.ram_per_machine / GIB,
                     "disk_per_machine_gib": o.disk_per_machine / GIB, "recall_at_10": o.recall_at_10,
                     "recall_extrapolated": o.recall_extrapolated, "qps_b1": o.qps_b1, "qps_b64": o.qps_b64,
                     "latency_ms": o.latency_ms, "build_cpu_hours": o.build_cpu_hours,
                     "recommended": o is best})  # fmt: skip
    return {"passages": passages, "dim": dim, "ram_gib": ram / GIB, "recall": recall, "options": rows,
            "recommended": None if best is None else rows[[r["recommended"] for r in rows].index(True)]}  # fmt: skip
