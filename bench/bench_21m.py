"""The paper's index size on one machine: 21M x 768 IVF-PQ with on-disk inverted lists and exact
re-rank from float16 vectors memory-mapped from disk (about 32 GB), built and queried here.

    python bench/bench_21m.py --estimate     # the CPU time it needs, from bench_scale.py's 1M figures
    nice -n 10 python bench/bench_21m.py     # run it (resumable: rerun the same command after a stop)
    nice -n 10 python bench/bench_21m.py --lists 2048   # fewer IVF lists: less training and assignment
    python bench/bench_21m.py --clean        # delete its artefacts (about 36 GB)

Stages, each finished once (a marker file) and skipped by a rerun:
1. vectors: 21M structured synthetic vectors (bench/scale_data.py, the 1M benchmark's distribution),
   float16, written chunk by chunk (a progress file: a rerun continues at the next chunk);
2. truth: 100 questions and their exact top 100, the vectors streamed from disk in chunks (rag.npy:
   the page cache holds them, not the process) and the per-chunk top lists merged exactly;
3. index: rag's DenseIndex.build_from_file: IVF trained on a sample, vectors added block by block into
   on-disk list blocks (each block kept: a rerun resumes at the next one), merged into one lists file;
   the vectors file itself is hard-linked into the index folder as its float16 re-rank store;
4. search: q/s at batch 1 and 64, recall@10 against the exact top 10, for several nprobe / re-rank.
Stages 3 and 4 run in child processes whose peak RSS comes from wait4. Writes bench/out/bench_21m.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale_data import CHUNK, StructuredVectors  # noqa: E402

N = 21_000_000
QUESTIONS = 100
LISTS = 4096
PQ = 64
WORK = ROOT / "bench" / "out" / "scale21m"
RESULT = ROOT / "bench" / "out" / "bench_21m.json"
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def config() -> Any:
    from rag.config import IndexConfig

    lists = json.loads(RESULT.read_text())["lists"]  # the driver records it before the first stage
    return IndexConfig(kind="ivfpq", ivf_lists=lists, pq_subquantizers=PQ, ondisk_lists=True,
                       ondisk_block_rows=1_000_000, store_dtype="float16")  # fmt: skip


def stage_vectors(n: int) -> dict[str, Any]:
    """Write (n, 768) float16 at vectors.npy, chunk by chunk, resuming after the last chunk written."""
    path, progress = WORK / "vectors.npy", WORK / "vectors.progress"
    gen = StructuredVectors()
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float16)), "fortran_order": False, "shape": (n, gen.dim)}
    if not path.is_file() or not progress.is_file():
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            offset = f.tell()
            f.truncate(offset + n * gen.dim * 2)
        progress.write_text("0")
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    chunks = -(-n // CHUNK)
    cpu = time.process_time()
    with open(path, "r+b") as f:
        for i in range(int(progress.read_text()), chunks):
            rows = min(CHUNK, n - i * CHUNK)
            os.pwrite(f.fileno(), gen.chunk(i, rows).astype(np.float16).tobytes(), offset + i * CHUNK * gen.dim * 2)
            if i % 16 == 15 or i == chunks - 1:
                os.fsync(f.fileno())
                progress.write_text(str(i + 1))
                print(f"  vectors: {min(n, (i + 1) * CHUNK):,} / {n:,}", flush=True)
    return {"cpu_s": time.process_time() - cpu, "bytes": path.stat().st_size}


def stage_truth(n: int) -> dict[str, Any]:
    """100 questions and their exact top 100 over all n vectors, streamed from disk."""
    from rag.mips import SearchResult, exact_search, merge_topk
    from rag.npy import iter_chunks, open_matrix

    gen = StructuredVectors()
    q = gen.queries(n, QUESTIONS)
    cpu = time.process_time()
    best = SearchResult(np.zeros((QUESTIONS, 0), np.int64), np.zeros((QUESTIONS, 0), np.float32))
    for start, chunk in iter_chunks(open_matrix(WORK / "vectors.npy"), chunk_rows=1 << 18):
        part = exact_search(chunk, q, min(100, len(chunk)))
        best = merge_topk([best, part], [0, start], 100)
    np.save(WORK / "queries.npy", q)
    np.save(WORK / "truth.npy", best.rows)
    return {"cpu_s": time.process_time() - cpu}


def stage_index() -> dict[str, Any]:
    from rag.index import DenseIndex

    cpu, wall = time.process_time(), time.perf_counter()
    DenseIndex.build_from_file(WORK / "vectors.npy", config(), WORK / "index", WORK / "stages", progress=True)
    timings = [json.loads(line) for line in (WORK / "stages" / "timings.jsonl").read_text().splitlines()]
    return {"cpu_s": time.process_time() - cpu, "wall_s": time.perf_counter() - wall, "phases": timings,
            "files": {p.name: p.stat().st_size for p in (WORK / "index").iterdir()}}  # fmt: skip


SETTINGS = [(nprobe, rerank) for nprobe in (32, 64, 128) for rerank in (10, 50)]


def batch_queries(count: int = 640, seed: int = 7) -> np.ndarray:
    """Questions for the batch-64 speed: stored rows plus the same noise as StructuredVectors.queries
    (which regenerates a whole 65k-row chunk per question: minutes of CPU at 21M)."""
    from rag.npy import open_matrix, read_sample

    rng = np.random.default_rng([0, 3, seed])
    rows = np.sort(rng.choice(N, size=count, replace=False))
    out = read_sample(open_matrix(WORK / "vectors.npy"), rows).astype(np.float32)
    return out + 0.5 * rng.standard_normal(out.shape, dtype=np.float32)


def stage_search(settings: list[tuple[int, int]] = SETTINGS) -> dict[str, Any]:
    from rag.index import DenseIndex

    index = DenseIndex.load(WORK / "index")
    q = np.load(WORK / "queries.npy")
    truth = np.load(WORK / "truth.npy")[:, :10]
    more = batch_queries()  # batch-64 speed on 10 batches
    rows = []
    for nprobe, rerank in settings:
        view = index.with_search_params(nprobe=nprobe, rerank_factor=rerank)
        view.search(q[:1], 10)
        c0, w0 = time.process_time(), time.perf_counter()
        found = np.concatenate([view.search(q[i : i + 1], 10).rows for i in range(len(q))])
        b1, b1_wall = len(q) / (time.process_time() - c0), len(q) / (time.perf_counter() - w0)
        c0, w0 = time.process_time(), time.perf_counter()
        for i in range(0, len(more), 64):
            view.search(more[i : i + 64], 10)
        b64, b64_wall = len(more) / (time.process_time() - c0), len(more) / (time.perf_counter() - w0)
        recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)]))
        rows.append({"nprobe": nprobe, "rerank_factor": rerank, "recall_at_10": recall, "qps_b1": b1,
                     "qps_b64": b64, "qps_b1_wall": b1_wall, "qps_b64_wall": b64_wall})  # fmt: skip
        print(f"  nprobe {nprobe} rerank {rerank}: recall@10 {recall:.3f}, {b1:.1f} q/s (b1), {b64:.1f} (b64)",
              flush=True)
    return {"settings": rows}


STAGES = {"vectors": lambda: stage_vectors(N), "truth": lambda: stage_truth(N), "index": stage_index,
          "search": stage_search}  # fmt: skip
EXTRA_SETTINGS = "RAG_BENCH_21M_SETTINGS"  # the search-extra child's settings, from --search


def search_extra() -> dict[str, Any]:
    return stage_search([tuple(map(int, s.split(":"))) for s in os.environ[EXTRA_SETTINGS].split(",")])


def run_child(stage: str) -> dict[str, Any]:
    result = WORK / f".result-{stage}.json"
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", stage, "--result", str(result)],
                            env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})  # fmt: skip
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"stage {stage} failed (status {status}); rerun to resume")
    out = json.loads(result.read_text())
    out.update(peak_rss_gib=usage.ru_maxrss / 2**20, child_cpu_s=usage.ru_utime + usage.ru_stime,
               child_wall_s=time.perf_counter() - start, load_before=load, load_after=os.getloadavg()[0])  # fmt: skip
    return out


def estimate() -> dict[str, Any]:
    """CPU hours for the 21M run from the 1M measurements (bench/out/bench_scale.json), per stage:
    vector generation and the exact top 100 scale with N (the latter also with the question count);
    IVF training does not (the same lists, the same sample); adding (assignment to the lists, PQ
    encoding) and merging scale with N; the search stage is a few minutes."""
    one = json.loads((ROOT / "bench" / "out" / "bench_scale.json").read_text())
    n0 = one["data"]["n"]
    phases: dict[str, float] = {}
    for record in one["ivfpq"]["build"].get("phases", []):
        phases[record["phase"]] = phases.get(record["phase"], 0.0) + record["cpu_s"]
    scale = N / n0
    parts = {
        "vectors": one["data"]["generate_cpu_s"] * scale,
        "truth": one["data"]["truth_cpu_s"] * scale * QUESTIONS / one["data"]["queries"],
        "train": phases["train"],
        "add": phases["add"] * scale,
        "merge": phases.get("merge", 0.0) * scale,
        "search": 600.0,
    }
    return {"n0": n0, "cpu_hours": {k: v / 3600 for k, v in parts.items()}, "total_cpu_hours": sum(parts.values()) / 3600}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--estimate", action="store_true")
    parser.add_argument("--clean", action="store_true")
    parser.add_argument("--lists", type=int, default=LISTS, help=f"IVF lists (default {LISTS})")
    parser.add_argument("--search", default="", metavar="NPROBE:RERANK,...",
                        help="after a finished run: search again with these settings (report key search-extra)")
    parser.add_argument("--child", default="")
    parser.add_argument("--result", default="")
    args = parser.parse_args()
    if args.child:
        import faiss

        faiss.omp_set_num_threads(1)
        Path(args.result).write_text(json.dumps({**STAGES, "search-extra": search_extra}[args.child]()))
        return 0
    if args.clean:
        shutil.rmtree(WORK, ignore_errors=True)
        print(f"removed {WORK}")
        return 0
    if args.estimate:
        print(json.dumps(estimate(), indent=2))
        return 0
    resume = RESULT.is_file() and WORK.is_dir()  # after --clean, a fresh run
    WORK.mkdir(parents=True, exist_ok=True)
    report = json.loads(RESULT.read_text()) if resume else {"n": N, "lists": args.lists, "pq": PQ}
    if report["lists"] != args.lists:
        raise SystemExit(f"{RESULT} records a run with --lists {report['lists']}: resume with it, or --clean first")
    RESULT.write_text(json.dumps(report, indent=2))
    if args.search:
        if not (WORK / "index.done").is_file():
            raise SystemExit("--search: the index is not built yet (run without --search first)")
        os.environ[EXTRA_SETTINGS] = args.search
        report.setdefault("search-extra", []).append(run_child("search-extra"))
        RESULT.write_text(json.dumps(report, indent=2))
        return 0
    for stage in STAGES:
        if (WORK / f"{stage}.done").is_file():
            continue
        print(f"== {stage}", flush=True)
        report[stage] = run_child(stage)
        (WORK / f"{stage}.done").write_text("ok")
        RESULT.write_text(json.dumps(report, indent=2))
        if stage == "index":  # the stage blocks are merged into lists.ivfdata: free their space
            shutil.rmtree(WORK / "stages", ignore_errors=True)
    print(json.dumps(report.get("search", {}), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
