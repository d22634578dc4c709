"""Retrieval benchmark: knowledge-base build speed, exact and approximate MIPS search, index sizes.

    python bench/bench_retrieval.py            # full run (builds the default knowledge base in a temp dir)
    python bench/bench_retrieval.py --no-build # reuse the cached default knowledge base

Everything runs side by side in one process so that the hardware bounds (memory bandwidth, matrix
multiply rate) are measured under the same conditions as the searches they bound. Prints a table
and writes bench/out/bench_retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from rag.config import CorpusConfig, EncoderConfig, IndexConfig  # noqa: E402
from rag.index import DenseIndex  # noqa: E402
from rag.mips import exact_search  # noqa: E402

K = 10
ROUNDS = 3  # alternating rounds of the exact-search timings
BATCHES = (1, 64, 1024)
OUT = Path(__file__).resolve().parent / "out" / "bench_retrieval.json"


def best_time(fn: Callable[[], Any], reps: int, min_s: float = 0.3) -> float:
    """Best wall time of one call over `reps` calls (at least min_s in total): the least disturbed run."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < reps or time.perf_counter() - start < min_s:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 50 * reps:
            break
    return min(times)


# ---------------------------------------------------------------- data


def load_data(build: bool, tmp: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Passage embeddings X (N, D), real query vectors Q (1024, D), and how they were made."""
    try:
        from rag.encoders import load_encoder
        from rag.knowledge import (
            build_knowledge_base,
            default_knowledge_base,
            open_knowledge_base,
            query_encoder_config,
        )
    except ImportError as e:  # the knowledge module is not there: same shape, synthetic data
        print(f"WARNING: rag.knowledge unavailable ({e}); using clustered random data of the same shape")
        return *clustered(12_300, 384, 1024), {"source": "synthetic clustered (knowledge base unavailable)"}
    info: dict[str, Any] = {
        "source": "default knowledge base (built-in Wikipedia summaries, all-MiniLM-L6-v2)"
    }
    if build:
        t0 = time.perf_counter()
        from rag.encoders import passage_dtype

        encoder = EncoderConfig(dtype=passage_dtype("auto"))  # the default build (bench_build.py compares)
        kb_info = build_knowledge_base(CorpusConfig(), encoder, IndexConfig(), tmp / "kb", progress=False)
        seconds = time.perf_counter() - t0
        info["build"] = {
            "passages": kb_info.passages,
            "documents": kb_info.documents,
            "seconds": seconds,
            "passages_per_s": kb_info.passages / seconds,
        }
        kb = open_knowledge_base(tmp / "kb")
    else:
        kb = open_knowledge_base(default_knowledge_base(progress=False))
    x = np.ascontiguousarray(kb.index.embeddings(np.arange(len(kb.index))))
    rng = np.random.default_rng(0)
    rows = rng.choice(len(kb.passages), size=BATCHES[-1], replace=False)
    questions = [f"What is {p.title}?" for p in kb.passages.get(rows)]
    q = load_encoder(query_encoder_config(kb.meta)).encode(questions, batch_size=128)
    info["queries"] = "'What is <title>?' for 1024 random passages, encoded by q(x)"
    return x, np.ascontiguousarray(q, dtype=np.float32), info


def clustered(n: int, d: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((n // 60, d)).astype(np.float32)

    def draw(count: int) -> np.ndarray:
        v = centres[rng.integers(0, len(centres), count)] + rng.standard_normal((count, d)).astype(np.float32)
        return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)

    return draw(n), draw(m)


# ---------------------------------------------------------------- hardware bounds


def read_bandwidth(x: np.ndarray) -> dict[str, float]:
    """GB/s of a plain streaming read (sum) of a matrix-sized array and of a 512 MB array, 1 and 2 threads."""
    out: dict[str, float] = {}
    pool = ThreadPoolExecutor(2)
    for name, arr in (("same_size", x.copy()), ("512MB", np.ones(128 << 20, np.float32))):
        flat = arr.reshape(-1)
        halves = [flat[: flat.size // 2], flat[flat.size // 2 :]]
        t1 = best_time(lambda a=flat: a.sum(), 10)
        t2 = best_time(lambda h=halves: list(pool.map(np.sum, h)), 10)  # numpy drops the GIL in sum
        out[f"{name}_1thread"] = flat.nbytes / t1 / 1e9
        out[f"{name}_2threads"] = flat.nbytes / t2 / 1e9
    pool.shutdown()
    return out


def matmul_rate(x: np.ndarray, b: int) -> dict[str, float]:
    """GFLOP/s of the (b, D) x (D, N) product alone (numpy sgemm and torch.mm, into a reused output)."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((b, x.shape[1])).astype(np.float32)
    out = np.empty((b, x.shape[0]), np.float32)
    flops = 2.0 * b * x.shape[0] * x.shape[1]
    xt, qt, ot = torch.from_numpy(x), torch.from_numpy(q), torch.from_numpy(out)
    t_np = best_time(lambda: np.matmul(q, x.T, out=out), 5)
    t_torch = best_time(lambda: torch.mm(qt, xt.T, out=ot), 5)
    return {"numpy": flops / t_np / 1e9, "torch": flops / t_torch / 1e9}


# ---------------------------------------------------------------- searches


def numpy_baseline(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    """Plain `X @ q` + argpartition (+ sorting the k winners)."""
    scores = x @ q[0] if q.shape[0] == 1 else q @ x.T
    scores = scores.reshape(q.shape[0], -1)  # (B, N)
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, 1), axis=1)
    return np.take_along_axis(part, order, 1)


def floor_mm_maxima(x: np.ndarray, q: np.ndarray) -> None:
    """The fused exact search's floor: its blocked products into the reused score block and the chunk
    maxima (the one extra pass over each block), without the selection that follows: what the fused
    path costs at the least, so that % matmul of this row is the best it could reach as designed."""
    from rag import mips

    qc = min(q.shape[0], 256)
    block_rows = max(mips._CHUNK * K, mips._FUSED_BLOCK_BYTES // (4 * qc))
    buf = torch.empty(qc * min(block_rows, x.shape[0]))
    xt, qt = torch.from_numpy(x), torch.from_numpy(q)
    for q0 in range(0, q.shape[0], qc):
        m = min(qc, q.shape[0] - q0)
        for start in range(0, x.shape[0], block_rows):
            nb = min(block_rows, x.shape[0] - start)
            out = buf[: m * nb].view(m, nb)
            torch.mm(qt[q0 : q0 + m], xt[start : start + nb].T, out=out)
            c = nb // mips._CHUNK
            if c:
                torch.amax(out[:, : c * mips._CHUNK].view(m, mips._CHUNK, c), dim=1)


def time_search(fn: Callable[[np.ndarray], Any], q: np.ndarray, b: int) -> float:
    """Queries per second at batch size b (batch 1: a loop over 64 single queries)."""
    if b == 1:
        singles = [q[i : i + 1] for i in range(64)]
        return 64 / best_time(lambda: [fn(s) for s in singles], 3)
    return b / best_time(lambda: fn(q[:b]), 3 if b <= 64 else 2)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def exact_section(x: np.ndarray, q: np.ndarray, flat: DenseIndex, bw: float) -> dict[str, Any]:
    fi = faiss.IndexFlatIP(x.shape[1])
    fi.add(x)
    methods: dict[str, Callable[[np.ndarray], Any]] = {
        "ours_flat": lambda s: flat.search(s, K),
        "ours_previous": lambda s: exact_search(x, s, K, fused=False),  # numpy sgemm + topk_rows per block
        "numpy_X@q": lambda s: numpy_baseline(x, s, K),
        "faiss_IndexFlatIP": lambda s: fi.search(s, K),
        "floor_mm+maxima": lambda s: floor_mm_maxima(x, s),  # not a search: the fused path's least cost
    }
    truth = flat.search(q, K).rows
    agree = {
        "ours_previous": recall(exact_search(x, q, K, fused=False).rows, truth),
        "numpy_X@q": recall(numpy_baseline(x, q, K), truth),
        "faiss_IndexFlatIP": recall(fi.search(q, K)[1], truth),
    }
    rows: dict[str, Any] = {"agreement_with_ours": agree, "batches": {}}
    for b in BATCHES:
        # Rounds alternate the bound and every method (ABCD ABCD ...), best of each kept, so that a change
        # in the machine's load falls on all of them alike.
        rate, qps_of = 0.0, dict.fromkeys(methods, 0.0)
        for _ in range(ROUNDS):
            rate = max(rate, *matmul_rate(x, b).values()) if b > 1 else 0.0
            for name, fn in methods.items():
                qps_of[name] = max(qps_of[name], time_search(fn, q, b))
        rate = rate or None
        entry: dict[str, Any] = {"matmul_gflops": rate, "bandwidth_bound_qps": bw * 1e9 / x.nbytes}
        for name in methods:
            qps = qps_of[name]
            gflops = qps * 2.0 * x.shape[0] * x.shape[1] / 1e9
            entry[name] = {
                "qps": qps,
                "gflops": gflops,
                "pct_bandwidth_bound": 100 * qps / entry["bandwidth_bound_qps"],
                "pct_matmul_rate": None if rate is None else 100 * gflops / rate,
            }
        rows["batches"][str(b)] = entry
    rows["faiss_flat_bytes"] = len(faiss.serialize_index(fi))
    return rows


def approx_section(x: np.ndarray, q: np.ndarray, truth: np.ndarray, configs: dict[str, IndexConfig]) -> dict:
    out: dict[str, Any] = {}
    for name, config in configs.items():
        t0 = time.perf_counter()
        index = DenseIndex.build(x, config)
        build_s = time.perf_counter() - t0
        out[name] = {
            "config": {k: v for k, v in vars(config).items() if v not in ("", 0)},
            "build_s": build_s,
            "recall@10": recall(index.search(q, K).rows, truth),
            "qps_batch1": time_search(lambda s, i=index: i.search(s, K), q, 1),
            "qps_batch1024": time_search(lambda s, i=index: i.search(s, K), q, 1024),
            "bytes_per_passage": index.nbytes / len(index),
        }
    return out


# ---------------------------------------------------------------- report


def table(res: dict[str, Any]) -> str:
    n, d = res["n"], res["dim"]
    lines = [f"data: {res['data']['source']}; N={n}, D={d}, matrix {res['matrix_mb']:.1f} MB; k={K}"]
    if "build" in res["data"]:
        bld = res["data"]["build"]
        lines.append(
            f"(a) build (encode + index) of the default corpus: {bld['passages']} passages in "
            f"{bld['seconds']:.1f} s = {bld['passages_per_s']:.0f} passages/s"
        )
    bwd = res["bandwidth_gbs"]
    lines.append(
        "(c) read bandwidth GB/s: "
        + ", ".join(f"{k} {v:.1f}" for k, v in bwd.items())
        + f" -> bound {res['bandwidth_bound_gbs']:.1f} GB/s"
    )
    lines.append(
        f"{'(b) exact search':<22}{'batch':>6}{'q/s':>11}{'GFLOP/s':>9}{'% bw bound':>11}{'% matmul':>10}"
    )
    for b, entry in res["exact"]["batches"].items():
        rate = entry["matmul_gflops"]
        bound = f"bound {entry['bandwidth_bound_qps']:.0f} q/s" if b == "1" else f"matmul {rate:.0f} GFLOP/s"
        lines.append(f"  batch {b}: {bound}")
        for name in ("ours_flat", "ours_previous", "numpy_X@q", "faiss_IndexFlatIP", "floor_mm+maxima"):
            m = entry[name]
            pm = "" if m["pct_matmul_rate"] is None else f"{m['pct_matmul_rate']:.0f}%"
            lines.append(
                f"  {name:<20}{b:>6}{m['qps']:>11.0f}{m['gflops']:>9.1f}{m['pct_bandwidth_bound']:>10.0f}%{pm:>10}"
            )
    lines.append(f"  agreement of top-{K} with ours: {res['exact']['agreement_with_ours']}")
    lines.append(f"{'(d) approximate':<22}{'recall@10':>10}{'q/s b=1':>10}{'q/s b=1024':>12}{'build s':>9}")
    for name, a in res["approx"].items():
        lines.append(
            f"  {name:<20}{a['recall@10']:>10.3f}{a['qps_batch1']:>10.0f}{a['qps_batch1024']:>12.0f}{a['build_s']:>9.1f}"
        )
    lines.append(
        "(e) bytes per passage: " + ", ".join(f"{k} {v:.0f}" for k, v in res["bytes_per_passage"].items())
    )
    lines.append(f"load average before/after: {res['loadavg_before']} / {res['loadavg_after']} "
                 f"on {res['machine']['cpus']} CPUs; torch threads {res['threads']['torch']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--no-build", action="store_true", help="skip (a); use the cached default knowledge base"
    )
    parser.add_argument(
        "--pq-subquantizers", type=int, default=48, help="ivfpq: PQ sub-quantizers (D/8 default)"
    )
    parser.add_argument("--nprobe", type=int, default=48, help="ivfpq: inverted lists visited (of ~4 sqrt N)")
    parser.add_argument("--exact-only", action="store_true", help="skip (d), the approximate indexes")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench_retrieval.") as tmp:
        x, q, data = load_data(not args.no_build, Path(tmp))
    flat = DenseIndex.build(x, IndexConfig(kind="flat"))
    bwd = read_bandwidth(x)
    bound = max(bwd.values())
    exact = exact_section(x, q, flat, bound)
    truth = flat.search(q, K).rows
    configs = {
        "hnsw": IndexConfig(kind="hnsw"),
        "ivfpq": IndexConfig(kind="ivfpq", pq_subquantizers=args.pq_subquantizers, nprobe=args.nprobe),
    }
    approx = {} if args.exact_only else approx_section(x, q, truth, configs)
    res: dict[str, Any] = {
        "n": int(x.shape[0]),
        "dim": int(x.shape[1]),
        "matrix_mb": x.nbytes / 1e6,
        "data": data,
        "bandwidth_gbs": bwd,
        "bandwidth_bound_gbs": bound,
        "exact": exact,
        "approx": approx,
        "bytes_per_passage": {
            "ours_flat": flat.nbytes / len(flat),
            "faiss_IndexFlatIP": exact["faiss_flat_bytes"] / len(flat),
            **{name: a["bytes_per_passage"] for name, a in approx.items()},
        },
        "threads": {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "env": {k: os.environ.get(k, "") for k in ("OPENBLAS_CORETYPE", "OMP_NUM_THREADS")},
        "loadavg_before": [round(v, 1) for v in load_before],
        "loadavg_after": [round(v, 1) for v in os.getloadavg()],
    }
    print(table(res))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(res, indent=2))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
