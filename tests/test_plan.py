"""`rag index plan` (rag.plan): the scaling of measured figures to N passages, checked by hand."""

from __future__ import annotations

import json
import math

import pytest

from rag.cli import main
from rag.plan import GIB, Measured, options, parse_bytes, plan_table, recommend

FLAT = Measured("flat", "exact", 1_000_000, 768, 3072.0, 3072.0, 1.0, 10.0, 12.0, 1.0, "linear")
IVF_LOW = Measured("ivfpq", "nprobe 16", 1_000_000, 768, 80.0, 1700.0, 0.90, 900.0, 2000.0, 600.0, "linear")
IVF_HIGH = Measured("ivfpq", "nprobe 64", 1_000_000, 768, 80.0, 1700.0, 0.97, 300.0, 900.0, 600.0, "linear")


def test_scaling_by_hand():
    ram = 24 * GIB
    usable = ram * 0.85 - 2 * GIB
    flat, low, high = options(21_000_000, 768, ram, [FLAT, IVF_LOW, IVF_HIGH])
    assert flat.machines == math.ceil(21_000_000 * 3072 / usable) == 4
    assert flat.passages_per_shard == 5_250_000
    assert flat.qps_b1 == pytest.approx(10.0 / 5.25)  # a shard scans 5.25x the measured rows
    assert flat.ram_per_machine == pytest.approx(2 * GIB + 5_250_000 * 3072)
    assert high.machines == 1 and high.qps_b1 == pytest.approx(300.0 / 21)
    assert high.disk_per_machine == pytest.approx(21_000_000 * 1700.0)
    assert high.build_cpu_hours == pytest.approx(600.0 * 21 / 3600)
    assert recommend([flat, low, high], 0.95) is high
    assert recommend([flat, low, high], 0.99) is flat
    assert recommend([low], 0.95) is None
    assert high.recall_extrapolated and not flat.recall_extrapolated  # approximate recall falls with N
    # one measured at the full size wins over a faster one whose recall was measured at 1M
    big = Measured("ivfpq", "nprobe 16 rerank 200", 21_000_000, 768, 72.0, 1600.0, 0.96, 5.0, 6.0, 900.0, "linear")
    (at_size,) = options(21_000_000, 768, ram, [big])
    assert not at_size.recall_extrapolated and at_size.qps_b1 == 5.0 < high.qps_b1
    assert recommend([flat, high, at_size], 0.95) is at_size
    # twice the dimension: twice the bytes per passage, half the q/s
    (wide,) = options(1_000_000, 1536, ram, [IVF_HIGH])
    assert wide.ram_per_machine == pytest.approx(2 * GIB + 1_000_000 * 160.0)
    assert wide.qps_b1 == pytest.approx(150.0)


def test_plan_table_and_bad_input():
    table = plan_table(21_000_000, 768, parse_bytes("24GiB"), 0.95, [FLAT, IVF_HIGH])
    assert table["recommended"]["setting"] == "nprobe 64" and table["recommended"]["machines"] == 1
    assert sum(r["recommended"] for r in table["options"]) == 1
    for text, value in (("24GiB", 24 * 2**30), ("64G", 64 * 2**30), ("24GB", 24 * 10**9), ("512MiB", 2**29),
                        ("1000", 1000)):  # fmt: skip
        assert parse_bytes(text) == value
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes("lots")
    with pytest.raises(ValueError, match="leaves nothing"):
        options(10, 768, parse_bytes("1GiB"), [FLAT])


def test_cli_plan_reads_the_measurements(capsys):
    """The committed figures (rag/scale_measurements.py, bench/bench_scale.py --write-plan) plan 21M x 768."""
    assert main(["index", "plan", "--passages", "21000000", "--dim", "768", "--ram", "24GiB", "--recall", "0.95",
                 "--json"]) == 0  # fmt: skip
    table = json.loads(capsys.readouterr().out)
    assert table["passages"] == 21_000_000 and {r["kind"] for r in table["options"]} == {"flat", "hnsw", "ivfpq"}
    best = table["recommended"]
    assert best["recall_at_10"] >= 0.95 and best["ram_per_machine_gib"] <= 24 * 0.85
    assert main(["index", "plan", "--passages", "21000000", "--recall", "2"]) == 2  # argparse's, before any work
    assert "--recall" in capsys.readouterr().err
