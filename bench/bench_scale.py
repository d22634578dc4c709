"""Scale benchmark: 1M x 768 indexes measured on this machine, the figures behind `rag index plan`.

    python bench/bench_scale.py                         # every stage (a few CPU-hours on one core)
    python bench/bench_scale.py --stages data,ivfpq     # some stages; artefacts in bench/out/scale/
    python bench/bench_scale.py --clean                 # delete this benchmark's large artefacts

Indexes over N structured synthetic 768-d vectors (bench/scale_data.py: DPR-sized, clustered):
- flat: the exact index (float32, memory-mapped);
- hnsw: FAISS HNSW (M, efConstruction), candidates scored exactly;
- ivfpq: IVF-PQ (lists, PQ bytes) proposing k * rerank candidates, re-ranked exactly from float16
  vectors memory-mapped from disk; on-disk inverted lists.
For each: bytes per passage (on disk, and resident while searching), build time, q/s at batch 1 and
64, recall@10 against exact search, peak RSS. Also: the given-embeddings knowledge-base build through
`rag index build --embeddings` (peak RSS against the target of 2 GB above the input's page cache), and
a live update of 1,000 passages in a 100k-passage knowledge base against a rebuild (encoded with the
default d(z), and with given vectors).

Every build and search runs in a child process with one thread; its peak RSS (ru_maxrss) and CPU
seconds come from wait4, beside wall time. CPU seconds are the figure to compare and extrapolate on a
shared machine: wall time also counts the time other processes held the cores (the load average at
the start and end of each child is recorded). Prints tables; writes bench/out/bench_scale.json.
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
sys.path.insert(0, str(ROOT))  # run from a checkout without installing
sys.path.insert(0, str(ROOT / "bench"))

from scale_data import StructuredVectors, write_vectors  # noqa: E402

OUT = ROOT / "bench" / "out"
WORK = OUT / "scale"
RESULT = OUT / "bench_scale.json"
K = 10
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


# ---------------------------------------------------------------- children: one measured process each


def run_child(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    """Run one stage in a fresh one-thread process; its JSON result with peak RSS and CPU seconds."""
    result = WORK / f".result-{stage}.json"
    result.unlink(missing_ok=True)
    command = [sys.executable, __file__, "--child", stage, "--params", json.dumps(params), "--result", str(result)]
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.Popen(command, env={**os.environ, **ONE_THREAD, "PYTHONPATH": str(ROOT)})
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0 or not result.is_file():
        raise RuntimeError(f"stage {stage} failed (status {status})")
    out = json.loads(result.read_text())
    out.update(peak_rss_gib=usage.ru_maxrss / 2**20, cpu_s=usage.ru_utime + usage.ru_stime,
               wall_s=time.perf_counter() - start, load_before=load, load_after=os.getloadavg()[0])  # fmt: skip
    return out


def child(stage: str, params: dict[str, Any]) -> dict[str, Any]:
    import faiss

    faiss.omp_set_num_threads(1)
    return CHILDREN[stage.split(":")[0]](**params)


# ---------------------------------------------------------------- data


def make_data(n: int, queries: int) -> dict[str, Any]:
    from rag.mips import exact_search

    gen = StructuredVectors()
    t0 = time.process_time()
    write_vectors(WORK / "vectors.npy", n, np.float32, gen)
    q = gen.queries(n, queries)
    np.save(WORK / "queries.npy", q)
    gen_s = time.process_time() - t0
    t0 = time.process_time()
    matrix = np.load(WORK / "vectors.npy", mmap_mode="r")
    truth = exact_search(matrix, q, 100)
    np.save(WORK / "truth.npy", truth.rows)
    return {"n": n, "queries": queries, "generate_cpu_s": gen_s, "truth_cpu_s": time.process_time() - t0}


# ---------------------------------------------------------------- builds


def build(kind: str, config: dict[str, Any], name: str) -> dict[str, Any]:
    """The index from the float32 vectors file: ivfpq first converts to its float16 store (timed)."""
    from rag.config import IndexConfig
    from rag.index import DenseIndex, store_dtype
    from rag.npy import iter_chunks, open_matrix, write_matrix

    index_config = IndexConfig(kind=kind, **config)
    out = WORK / name
    shutil.rmtree(out, ignore_errors=True)
    source = WORK / "vectors.npy"
    stages = WORK / f"{name}.stages"
    shutil.rmtree(stages, ignore_errors=True)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    phases = []
    if store_dtype(index_config) != np.float32:
        matrix = open_matrix(source)
        source = WORK / f"{name}.store.npy"
        write_matrix(source, (c for _, c in iter_chunks(matrix)), matrix.rows, matrix.dim, store_dtype(index_config))
        phases.append({"phase": "convert", "cpu_s": time.process_time() - t_cpu})
    DenseIndex.build_from_file(source, index_config, out, stages)
    if source != WORK / "vectors.npy":
        source.unlink()  # the folder holds it (hard link)
    timings = stages / "timings.jsonl"
    phases += [json.loads(line) for line in timings.read_text().splitlines()] if timings.is_file() else []
    shutil.rmtree(stages, ignore_errors=True)
    return {"build_wall_s": time.perf_counter() - t_wall, "build_cpu_s": time.process_time() - t_cpu,
            "phases": phases, "files": {p.name: p.stat().st_size for p in out.iterdir()}}  # fmt: skip


def search(name: str, settings: list[dict[str, Any]], single: int = 100) -> dict[str, Any]:
    """q/s at batch 1 (the first `single` queries one by one) and 64 (all), recall@10, per setting."""
    from rag.index import DenseIndex

    index = DenseIndex.load(WORK / name)
    q = np.load(WORK / "queries.npy")
    truth = np.load(WORK / "truth.npy")[:, :K]
    rows = []
    for setting in settings:
        view = index.with_search_params(**setting) if setting else index
        view.search(q[:single], K)  # first touches of the memory-mapped rows the timed batch-1 loop reads
        t0, w0 = time.process_time(), time.perf_counter()
        for i in range(single):
            view.search(q[i : i + 1], K)
        b1, b1_wall = single / (time.process_time() - t0), single / (time.perf_counter() - w0)
        t0, w0, found = time.process_time(), time.perf_counter(), []
        for i in range(0, len(q), 64):
            found.append(view.search(q[i : i + 64], K).rows)
        b64, b64_wall = len(q) / (time.process_time() - t0), len(q) / (time.perf_counter() - w0)
        got = np.concatenate(found)
        recall = float(np.mean([len(set(a) & set(b)) / K for a, b in zip(got, truth, strict=True)]))
        rows.append({"setting": setting, "qps_b1": b1, "qps_b64": b64, "qps_b1_wall": b1_wall,
                     "qps_b64_wall": b64_wall, "recall_at_10": recall})  # fmt: skip
    return {"settings": rows}


# ---------------------------------------------------------------- the knowledge-base build (CLI)


def stand_in_encoder(path: Path) -> Path:
    """A 768-d encoder folder for `rag index build --encoder` to record (the vectors are given; it is
    loaded once to check their dimension): a 1-layer random BERT, never used to encode here."""
    if (path / "config.json").is_file():
        return path
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "passage"]) + "\n")
    BertTokenizerFast(vocab=str(path / "vocab.txt")).save_pretrained(path)
    BertModel(BertConfig(vocab_size=6, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                         intermediate_size=768)).save_pretrained(path)  # fmt: skip
    return path


def kb_build(n: int, index_type: str, extra: list[str]) -> dict[str, Any]:
    """`rag index build --embeddings vectors.npy` of N passages, in this (measured) process."""
    from rag.cli import main

    corpus = WORK / "passages.jsonl"
    if not corpus.is_file():
        with open(corpus, "w", encoding="utf-8") as f:
            for i in range(n):
                f.write(json.dumps({"id": f"p{i}", "title": f"Passage {i}", "text": f"synthetic passage number {i}"}) + "\n")
    out = WORK / f"kb-{index_type}"
    shutil.rmtree(out, ignore_errors=True)
    encoder = stand_in_encoder(WORK / "encoder768")
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    rc = main(["index", "build", "--corpus", str(corpus), "--embeddings", str(WORK / "vectors.npy"), "--encoder",
               str(encoder), "--encoder-kind", "transformers", "--index-type", index_type, "--out", str(out),
               "--no-progress", *extra])  # fmt: skip
    if rc != 0:
        raise RuntimeError(f"rag index build failed ({rc})")
    return {"build_wall_s": time.perf_counter() - t_wall, "build_cpu_s": time.process_time() - t_cpu,
            "bytes_on_disk": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
            "input_bytes": (WORK / "vectors.npy").stat().st_size}  # fmt: skip


# ---------------------------------------------------------------- live updates against a rebuild


def _text_words() -> tuple[np.ndarray, np.ndarray]:
    """The built-in Wikipedia summaries' words and their frequencies (realistic passage lengths in tokens)."""
    from rag.config import CorpusConfig
    from rag.corpus import ReadReport, iter_passages

    counts: dict[str, int] = {}
    for p in iter_passages(CorpusConfig(), ReadReport()):
        for w in p.text.split():
            counts[w] = counts.get(w, 0) + 1
    words = np.array(list(counts))
    freq = np.array(list(counts.values()), dtype=np.float64)
    return words, freq / freq.sum()


def _documents(ids: range, seed: int, words: np.ndarray, p: np.ndarray) -> dict[str, tuple[str, str]]:
    rng = np.random.default_rng(seed)
    return {f"u{i}": (f"Article {i}", " ".join(rng.choice(words, size=100, p=p))) for i in ids}


def _write_jsonl(path: Path, docs: dict[str, tuple[str, str]]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for key, (title, text) in docs.items():
            f.write(json.dumps({"id": key, "title": title, "text": text}) + "\n")
    return path


def update(n: int, changed: int, mode: str) -> dict[str, Any]:
    """`changed` passages (half replaced, half new) into an n-passage knowledge base (exact index),
    timed against `rag index build` of the final corpus; then the two searched side by side.

    mode "encode": d(z) is the default encoder in float32, the rebuild encodes all n passages and the
    update only the changed ones. The base knowledge base is made from the rebuild's stored vectors
    (and the replaced passages' old texts encoded once): it is the update's starting point, untimed.
    mode "given": the vectors are given (.npy / Parquet): the rebuild indexes n vectors, the update adds
    the changed ones; scores must then be bit-identical."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rag.config import CorpusConfig, EncoderConfig, GivenEmbeddings, IndexConfig
    from rag.encoders import load_encoder, passage_text
    from rag.knowledge import build_knowledge_base, open_knowledge_base
    from rag.retriever import Retriever
    from rag.updates import read_change, update_knowledge_base

    root = WORK / f"update-{mode}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    words, p = _text_words()
    old = _documents(range(n), seed=1, words=words, p=p)
    half = changed // 2
    new = _documents(range(n - half, n + half), seed=2, words=words, p=p)  # u{n-half}.. replaced, the rest new
    final = {**old, **new}
    encoder = EncoderConfig(dtype="float32")
    corpus = CorpusConfig(source=str(_write_jsonl(root / "final.jsonl", final)), words_per_passage=100)
    given = None
    if mode == "given":
        rng = np.random.default_rng(3)
        vectors = {k: rng.standard_normal(384).astype(np.float32) for k in final}
        vectors_old = {**vectors, **{k: rng.standard_normal(384).astype(np.float32) for k in new if k in old}}
        np.save(root / "final.npy", np.stack([vectors[k] for k in final]))
        given = GivenEmbeddings(str(root / "final.npy"))
    load_encoder(encoder).encode(["warm up: imports and first calls are not the build's work"])
    t0, c0 = time.perf_counter(), time.process_time()
    build_knowledge_base(corpus, encoder, IndexConfig(), root / "rebuilt", progress=False, given=given)
    rebuild = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    rebuilt = open_knowledge_base(root / "rebuilt")
    if mode == "encode":  # the base's vectors: the rebuild's, and the replaced passages' old texts encoded
        stored = dict(zip([i.split("-")[0] for i in rebuilt.passages.ids().to_pylist()],
                          rebuilt.index.embeddings(np.arange(len(rebuilt.index))), strict=True))  # fmt: skip
        d_z = load_encoder(encoder)
        replaced = [k for k in new if k in old]
        again = d_z.encode([passage_text(old[k][0], old[k][1]) for k in replaced], batch_size=64)
        vectors_old = {**stored, **dict(zip(replaced, again, strict=True))}
    base_ids = list(old)
    table = pa.table({"id": [f"{k}-0" for k in base_ids],
                      "embeddings": pa.array([vectors_old[k].tolist() for k in base_ids], pa.list_(pa.float32()))})  # fmt: skip
    pq.write_table(table, root / "base.parquet")
    base_corpus = CorpusConfig(source=str(_write_jsonl(root / "base.jsonl", old)), words_per_passage=100)
    build_knowledge_base(base_corpus, encoder, IndexConfig(), root / "kb", progress=False,
                         given=GivenEmbeddings(str(root / "base.parquet")))  # fmt: skip
    update_corpus = CorpusConfig(source=str(_write_jsonl(root / "update.jsonl", new)), words_per_passage=100)
    # a knowledge base in use has been opened before it is updated: its first open checks every file's
    # SHA-256 against the manifest once (rag.manifest; later opens compare sizes and stat stamps), a
    # cost of the base's size that is paid once, not by each update
    open_knowledge_base(root / "kb")
    t0, c0 = time.perf_counter(), time.process_time()
    if mode == "given":
        np.save(root / "update.npy", np.stack([vectors[k] for k in new]))
        change = read_change(root / "kb", update_corpus, GivenEmbeddings(str(root / "update.npy")), delete=False)
    else:
        change = read_change(root / "kb", update_corpus, None, delete=False)
    info = update_knowledge_base(root / "kb", change)
    updated_s = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    # side by side: the same q(x) over both
    one = Retriever.open(root / "rebuilt")
    two = Retriever.open(root / "kb", query_encoder=one.query_encoder)
    rng = np.random.default_rng(4)
    questions = [" ".join(rng.choice(words, size=8, p=p)) for _ in range(200)]
    a, b = one.retrieve(questions, K), two.retrieve(questions, K)
    same_ids = a.ids == b.ids
    diff = float(np.abs(a.scores.numpy() - b.scores.numpy()).max())
    return {"n": n, "changed": changed, "mode": mode, "rebuild": rebuild, "update": updated_s,
            "speedup_cpu": rebuild["cpu_s"] / updated_s["cpu_s"], "speedup_wall": rebuild["wall_s"] / updated_s["wall_s"],
            "replaced": info.replaced, "added": info.added, "passages": info.passages,
            "same_top10_ids": same_ids, "max_score_difference": diff, "questions": len(questions)}  # fmt: skip


CHILDREN = {"data": make_data, "build": build, "search": search, "kb": kb_build, "update": update}


# ---------------------------------------------------------------- the driver


def bytes_per_passage(files: dict[str, int], n: int, resident: tuple[str, ...]) -> tuple[float, float]:
    disk = sum(v for k, v in files.items() if k not in ("meta.json", "trained.index")) / n
    return disk, sum(files.get(f, 0) for f in resident) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--stages", default="data,flat,ivfpq,hnsw,kb")
    parser.add_argument("--hnsw-ef-construction", type=int, default=40)
    parser.add_argument("--update-n", type=int, default=100_000, help="passages of the live-update knowledge base")
    parser.add_argument("--write-plan", action="store_true",
                        help="write rag/scale_measurements.py from the results (and bench_21m.py's, if it ran)")
    parser.add_argument("--clean", action="store_true", help="delete bench/out/scale (this benchmark's artefacts)")
    parser.add_argument("--child", default="")
    parser.add_argument("--params", default="{}")
    parser.add_argument("--result", default="")
    args = parser.parse_args()
    if args.child:
        Path(args.result).write_text(json.dumps(child(args.child, json.loads(args.params))))
        return 0
    if args.write_plan:
        write_plan(json.loads(RESULT.read_text()))
        return 0
    if args.clean:
        shutil.rmtree(WORK, ignore_errors=True)
        print(f"removed {WORK}")
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    report = json.loads(RESULT.read_text()) if RESULT.is_file() else {}
    report.setdefault("machine", {"cpus": os.cpu_count(), "note": "shared: a training job on one core, other "
                                  "helpers' tests and benchmarks on the other; see load_before/after"})  # fmt: skip
    stages = args.stages.split(",")
    n = args.n
    lists = 2 ** round(np.log2(4 * np.sqrt(n)))  # about 4 sqrt(N): 4096 for 1M
    plan = {
        "flat": ("flat", {}, [{}], ("embeddings.npy",)),
        "ivfpq": ("ivfpq", {"ivf_lists": lists, "pq_subquantizers": 64, "ondisk_lists": True},
                  [{"nprobe": p, "rerank_factor": r} for p in (16, 32, 64, 128) for r in (10, 50)],
                  ("faiss.index", "lists.ivfdata")),
        "ivfpq96": ("ivfpq", {"ivf_lists": lists, "pq_subquantizers": 96, "ondisk_lists": True},
                    [{"nprobe": p, "rerank_factor": r} for p in (32, 64) for r in (10, 50)],
                    ("faiss.index", "lists.ivfdata")),
        "hnsw": ("hnsw", {"hnsw_m": 32, "hnsw_ef_construction": args.hnsw_ef_construction},
                 [{"hnsw_ef_search": e} for e in (64, 128, 256)], ("faiss.index",)),
    }  # fmt: skip
    for stage in stages:
        print(f"== {stage} (N = {n})", flush=True)
        if stage == "data":
            report["data"] = run_child("data", {"n": n, "queries": args.queries})
        elif stage in plan:
            kind, config, settings, resident = plan[stage]
            built = run_child(f"build:{stage}", {"kind": kind, "config": config, "name": stage})
            searched = run_child(f"search:{stage}", {"name": stage, "settings": settings,
                                                     "single": 20 if kind == "flat" else 100})  # fmt: skip
            disk, ram = bytes_per_passage(built["files"], n, resident)
            report[stage] = {"kind": kind, "config": config, "n": n, "build": built, "search": searched,
                             "bytes_per_passage_disk": disk, "bytes_per_passage_resident": ram}  # fmt: skip
        elif stage.startswith("update"):
            mode = stage.split("-")[1] if "-" in stage else "encode"
            report[f"update-{mode}"] = run_child(f"update:{mode}", {"n": args.update_n, "changed": 1000, "mode": mode})
        elif stage == "kb":
            report["kb"] = run_child("kb", {"n": n, "index_type": "ivfpq",
                                            "extra": ["--ivf-lists", str(lists), "--pq", "64", "--ondisk-lists"]})  # fmt: skip
        else:
            raise SystemExit(f"unknown stage {stage}")
        RESULT.write_text(json.dumps(report, indent=2))
        print_tables(report)
    return 0


def write_plan(report: dict[str, Any]) -> None:
    """rag/scale_measurements.py: every measured setting, for `rag index plan` (rag/plan.py)."""
    rows = []
    for name in ("flat", "hnsw", "ivfpq", "ivfpq96"):
        if name not in report:
            continue
        r = report[name]
        c = r["config"]
        base = {"flat": "exact, float32", "hnsw": f"HNSW{c.get('hnsw_m')} efC {c.get('hnsw_ef_construction')}",
                "ivfpq": f"IVF{c.get('ivf_lists')},PQ{c.get('pq_subquantizers')} + float16 re-rank"}[r["kind"]]  # fmt: skip
        for s in r["search"]["settings"]:
            setting = base + "".join(f" {k.replace('hnsw_', '').replace('_factor', '')} {v}" for k, v in s["setting"].items())
            rows.append({"kind": r["kind"], "setting": setting, "n0": r["n"], "d0": 768,
                         "resident_bytes": r["bytes_per_passage_resident"], "disk_bytes": r["bytes_per_passage_disk"],
                         "recall_at_10": round(s["recall_at_10"], 4), "qps_b1": round(s["qps_b1"], 2),
                         "qps_b64": round(s["qps_b64"], 2), "build_cpu_s": round(r["build"]["build_cpu_s"], 1),
                         "scaling": "log" if r["kind"] == "hnsw" else "linear"})  # fmt: skip
    rows += rows_21m()
    text = ('"""Measured by bench/bench_scale.py on the reference machine (one core per measurement; see\n'
            'results/scale.md): per index setting, bytes per passage, recall@10 and q/s at N = n0.\n'
            'Regenerate: python bench/bench_scale.py, then --write-plan. Read by rag/plan.py."""\n\n'
            "MEASUREMENTS = " + json.dumps(rows, indent=4) + "\n")  # fmt: skip
    (ROOT / "rag" / "scale_measurements.py").write_text(text.replace("true", "True").replace("false", "False"))
    print(f"wrote rag/scale_measurements.py ({len(rows)} settings)")


def rows_21m() -> list[dict[str, Any]]:
    """bench/bench_21m.py's settings, measured at 21M (bench/out/bench_21m.json), if it ran."""
    path = OUT / "bench_21m.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    if "search" not in report:
        return []
    n, files = report["n"], report["index"]["files"]
    resident = (files["faiss.index"] + files["lists.ivfdata"]) / n
    disk = sum(v for k, v in files.items() if k not in ("meta.json", "trained.index")) / n
    settings = report["search"]["settings"] + [s for extra in report.get("search-extra", []) for s in extra["settings"]]
    return [{"kind": "ivfpq", "n0": n, "d0": 768, "resident_bytes": resident, "disk_bytes": disk,
             "setting": f"IVF{report['lists']},PQ{report['pq']} + float16 re-rank nprobe {s['nprobe']} "
                        f"rerank {s['rerank_factor']}",
             "recall_at_10": round(s["recall_at_10"], 4), "qps_b1": round(s["qps_b1"], 2),
             "qps_b64": round(s["qps_b64"], 2), "build_cpu_s": round(report["index"]["cpu_s"], 1),
             "scaling": "linear"} for s in settings]  # fmt: skip


def print_tables(report: dict[str, Any]) -> None:
    rows = []
    for name in ("flat", "hnsw", "ivfpq", "ivfpq96"):
        if name not in report:
            continue
        r = report[name]
        for s in r["search"]["settings"]:
            rows.append((name, json.dumps(s["setting"]), f"{r['bytes_per_passage_disk']:.0f}",
                         f"{r['bytes_per_passage_resident']:.0f}", f"{r['build']['build_cpu_s']:.0f}",
                         f"{s['qps_b1']:.1f}", f"{s['qps_b64']:.1f}", f"{s['recall_at_10']:.3f}",
                         f"{r['build']['peak_rss_gib']:.2f}", f"{r['search']['peak_rss_gib']:.2f}"))  # fmt: skip
    header = ("index", "setting", "B/psg disk", "B/psg RAM", "build CPU s", "q/s b1", "q/s b64", "R@10",
              "build RSS GiB", "search RSS GiB")  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in (header, *rows):
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))
    for mode in ("encode", "given"):
        u = report.get(f"update-{mode}")
        if u:
            print(f"update {u['changed']} passages of {u['n']} ({mode}): {u['update']['cpu_s']:.1f} CPU s vs rebuild "
                  f"{u['rebuild']['cpu_s']:.1f} CPU s = {u['speedup_cpu']:.0f}x (wall {u['speedup_wall']:.0f}x); "
                  f"same top-10 ids: {u['same_top10_ids']}, max score difference {u['max_score_difference']:.2e}")
    if "kb" in report:
        kb = report["kb"]
        print(f"rag index build --embeddings (ivfpq, on-disk lists): {kb['build_cpu_s']:.0f} CPU s, "
              f"{kb['build_wall_s']:.0f} s wall, peak RSS {kb['peak_rss_gib']:.2f} GiB "
              f"(input {kb['input_bytes'] / 2**30:.2f} GiB)")


if __name__ == "__main__":
    raise SystemExit(main())
