"""The one command behind results/evaluation.md: `python bench/run_results.py`.

Three knowledge bases, each queried with its own questions, with the default models (all-MiniLM-L6-v2 as
q(x) and d(z), SmolLM2-135M-Instruct as generator):
- wiki: the packaged Wikipedia summaries (the default knowledge base) with the Red-Trivia questions whose
  answer occurs in one of its passages;
- squad: SQuAD-open, the 2,067 SQuAD v1.1 dev paragraphs as corpus (../shared/data);
- nq: NQ-open questions over their 2,655 gold passages plus the summaries and SQuAD paragraphs as
  distractors (../shared/data/README.md's NQ knowledge base).
SQuAD and NQ are "reserved" sets: figures are on the development four fifths (position i % 5 != 4).
Per knowledge base: recall@{1,5,10,20} (retrieval alone) and exact match of closed-book, RAG-Token and
RAG-Sequence (thorough, fast) at k in {1,5,10}; then the hot-swap 2x2 table and the throughput of
`rag eval` (RAG-Token, k = 5) on --throughput questions. Every run is resumable (rag.evaluation):
re-running continues where an interrupted run stopped. JSON goes to bench/out/results/run_results.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from results_report import KS, NAMES, RECALL_KS, markdown

from rag import metrics as MT
from rag.config import CorpusConfig, DecodingConfig, EncoderConfig, GeneratorConfig, IndexConfig, RagConfig
from rag.corpus import Passage
from rag.eval_report import recall_curve, write_report
from rag.evaluation import EvalConfig, evaluate, evaluate_many
from rag.generators.loading import generator_dtype
from rag.hotswap import hotswap_experiment, hotswap_markdown
from rag.io import atomic_write_text
from rag.knowledge import (
    build_knowledge_base,
    default_knowledge_base,
    open_knowledge_base,
    write_knowledge_base,
)
from rag.model import RagModel
from rag.resources import red_trivia_dir, shared_data_dir
from rag.tasks import RED_TRIVIA_GENERAL_LISTS, Example, read_task, split_reserved

KB_ROOT = Path("bench/out/results")  # knowledge bases built here once, shared by every run


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------ knowledge bases


def _jsonl(path: Path, docs: list[dict[str, str]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    return path


def _build(name: str, docs: list[dict[str, str]], root: Path) -> Path:
    out = root / f"kb-{name}"
    if not (out / "meta.json").is_file():
        log(f"building knowledge base {name} ({len(docs)} documents)")
        corpus = _jsonl(root / f"corpus-{name}.jsonl", docs)
        build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"), EncoderConfig(), IndexConfig(), out)
    return out


def squad_kb(data: Path, root: Path) -> Path:
    rows = [json.loads(line) for line in open(data / "squad_v1.1_dev" / "paragraphs.jsonl", encoding="utf-8")]
    docs = [{"id": f"squad-{r['pid']}", "title": r["title"].replace("_", " "), "text": r["context"]} for r in rows]
    return _build("squad", docs, root)


def nq_kb(data: Path, root: Path, wiki: Path, squad: Path) -> Path:
    """Gold passages (encoded here) + the wiki and SQuAD bases' passages and vectors as distractors."""
    out = root / "kb-nq"
    if (out / "meta.json").is_file():
        return out
    gold: dict[tuple[str, str], None] = {}
    with gzip.open(data / "nq_open_gold_passages" / "nq-open-oracle.jsonl.gz", "rt", encoding="utf-8") as f:
        for line in f:
            for ctx in json.loads(line)["ctxs"]:
                if ctx.get("isgold"):
                    gold[(ctx["title"], ctx["text"])] = None
    docs = [{"id": f"nq-{i}", "title": t, "text": x} for i, (t, x) in enumerate(gold)]
    parts = {"nq": _build("nq-gold", docs, root), "wiki": wiki, "squad": squad}
    passages: list[Passage] = []
    vectors = []
    for prefix, path in parts.items():
        kb = open_knowledge_base(path)
        rows = np.arange(len(kb.passages))
        passages += [Passage(f"{prefix}:{p.id}", p.title, p.text) for p in kb.passages.get(rows)]
        vectors.append(kb.index.embeddings(rows).astype(np.float32))
    meta = dict(open_knowledge_base(parts["nq"]).meta, fingerprint="nq-gold+wiki+squad",
                merged_from={k: str(v) for k, v in parts.items()})
    log(f"merging knowledge base nq ({len(passages)} passages)")
    return write_knowledge_base(passages, np.concatenate(vectors), meta, out)


# ------------------------------------------------------------------------------ question sets


def answers_in_kb(examples: list[Example], kb_dir: Path, one_per_question: bool = False) -> list[Example]:
    """The examples with an answer that occurs (DPR's has_answer) in some passage of the knowledge base;
    one_per_question keeps only the first example of each question text (case and spaces aside)."""
    kb = open_knowledge_base(kb_dir)
    texts = [p.text for p in kb.passages.get(np.arange(len(kb.passages)))]
    where: dict[str, set[int]] = defaultdict(set)
    for i, text in enumerate(texts):
        for token in set(MT.dpr_tokens(text)):
            where[token].add(i)
    kept, seen = [], set()
    for ex in examples:
        key = ex.input.strip().lower()
        if one_per_question and key in seen:
            continue
        for answer in ex.answers:
            tokens = MT.dpr_tokens(answer)
            if not tokens:
                continue
            rows = set.intersection(*(where.get(t, set()) for t in tokens))
            if any(MT.has_answer([answer], texts[r]) for r in rows):
                kept.append(ex)
                seen.add(key)
                break
    return kept


def sample(examples: list[Example], n: int, seed: int = 0) -> list[Example]:
    if n >= len(examples):
        return list(examples)
    return sorted(random.Random(seed).sample(examples, n), key=lambda e: e.id)


def question_sets(data: Path | None, wiki: Path) -> dict[str, list[Example]]:
    trivia = read_task("red-trivia", red_trivia_dir(), subsets=list(RED_TRIVIA_GENERAL_LISTS))
    sets = {"wiki": answers_in_kb(trivia, wiki)}
    if data is not None:
        sets["squad"] = split_reserved(read_task("squad-open", data / "squad_v1.1_dev"), "dev")
        sets["nq"] = split_reserved(
            read_task("nq-gold", data / "nq_open_gold_passages" / "nq-open-oracle.jsonl.gz"), "dev"
        )
    return sets


# ------------------------------------------------------------------------------ runs


def grid(decoding: DecodingConfig, batch: int) -> list[tuple[str, EvalConfig]]:
    common = {"decoding": decoding, "recall_ks": RECALL_KS, "batch_size": batch}
    runs = [("closed-book", EvalConfig(mode="closed-book", **common))]
    for k in KS:
        runs.append((f"rag-token-k{k}", EvalConfig(kind="token", k=k, **common)))
        for dec in ("thorough", "fast"):
            seq = DecodingConfig(**{**decoding.__dict__, "decoding": dec})
            runs.append((f"rag-sequence-{dec}-k{k}", EvalConfig(kind="sequence", k=k, **{**common, "decoding": seq})))
    return runs


def run_dataset(name: str, kb: Path, examples: list[Example], model: RagModel, args: argparse.Namespace,
                decoding: DecodingConfig) -> dict[str, Any]:
    from rag.retriever import Retriever

    root = Path(args.out) / name
    retriever = Retriever.open(kb, query_encoder=model.query_encoder)
    recall_set = sample(examples, args.recall)
    log(f"{name}: retrieval-only on {len(recall_set)} questions")
    ret = evaluate(recall_set, root / "retrieval-only", retriever=retriever,
                   config=EvalConfig(mode="retrieval-only", recall_ks=RECALL_KS, batch_size=64),
                   task={"set": name, "n": len(recall_set)})
    cell_set = sample(examples, args.cell)
    log(f"{name}: {len(grid(decoding, args.batch))} generation runs on {len(cell_set)} questions")
    results = evaluate_many(cell_set, [(c, root / n) for n, c in grid(decoding, args.batch)],
                            retriever=retriever, generator=model.generator, task={"set": name, "n": len(cell_set)})
    write_report([root / "retrieval-only", *(r.out_dir for r in results)], root, title=NAMES[name])
    return {
        "kb": str(kb), "kb_passages": len(retriever.index), "questions_available": len(examples),
        "recall_n": ret.n, "recall": ret.recall, "answer_in_top_passage": ret.metrics["answer_in_top_passage"],
        "cell_n": len(cell_set),
        "em": {r.out_dir.name: r.metrics["exact_match"] for r in results},
        "f1": {r.out_dir.name: r.metrics["f1"] for r in results},
        "contains": {r.out_dir.name: r.metrics["contains_answer"] for r in results},
        "generation_s": {r.out_dir.name: r.timing.generation_s for r in results},
        "recall_curve": recall_curve(root / "retrieval-only"),
    }


def throughput(examples: list[Example], model: RagModel, decoding: DecodingConfig, n: int,
               batch: int, root: Path) -> dict[str, Any]:
    log(f"throughput: rag eval RAG-Token k=5 on {n} questions")
    import shutil

    out = root / "throughput"
    metrics = out / "metrics.json"
    if metrics.is_file():  # a finished fresh run of the same size is reused as it was measured
        data = json.loads(metrics.read_text(encoding="utf-8"))
        if data["n"] == n and data["timing"]["questions"] == n:
            return data
    if out.exists():  # throughput is measured on a fresh run, never a resumed one
        shutil.rmtree(out)
    result = evaluate(sample(examples, n, seed=1), out, retriever=model.retriever, generator=model.generator,
                      config=EvalConfig(kind="token", k=5, decoding=decoding, batch_size=batch),
                      task={"set": "throughput", "n": n})
    return json.loads((result.out_dir / "metrics.json").read_text(encoding="utf-8"))


def hotswap(model: RagModel, wiki: Path, n: int) -> dict[str, Any]:
    cache = KB_ROOT / "hotswap" / f"result-{n}-{model.generator.generator_config.prompt}.json"
    if cache.is_file():
        return json.loads(cache.read_text(encoding="utf-8"))
    log(f"hot-swap experiment on {n} questions")
    swap = hotswap_experiment(model, wiki, KB_ROOT / "hotswap", n_questions=n)
    data = {"n": len(swap.facts), "table": swap.table, "top_passage": swap.top_passage,
            "markdown": hotswap_markdown(swap), "seconds": swap.seconds, "answers": swap.answers}
    atomic_write_text(cache, json.dumps(data, indent=2))
    return data


# ------------------------------------------------------------------------------ the results file


STAGES = ("wiki", "squad", "nq", "hotswap", "throughput")
# two workers (one core each) get about the same CPU time with the default sizes
WORKER_STAGES = (("wiki", "squad"), ("nq", "hotswap", "throughput"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", type=int, default=100, help="questions per exact-match cell")
    parser.add_argument("--recall", type=int, default=1000, help="questions for recall@k")
    parser.add_argument("--throughput", type=int, default=1000, help="questions for the throughput run")
    parser.add_argument("--hotswap", type=int, default=40, help="hot-swap questions")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="generator weights (auto: bfloat16 where the CPU computes it natively, as rag ask)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--workers", type=int, default=2, help="processes running stages side by side")
    parser.add_argument("--only", default="", help="comma-separated stages, no report (used by the workers)")
    parser.add_argument("--skip", default="", help="comma-separated stages left out of the report")
    parser.add_argument("--report-only", action="store_true", help="rewrite --results from run_results.json")
    parser.add_argument("--results", default="results/evaluation.md")
    parser.add_argument("--out", default="bench/out/results", help="run folders (resumable) and run_results.json")
    return parser.parse_args(argv)


def run_workers(argv: list[str]) -> None:
    """Each worker runs some stages in its own process; the parent then finds every run finished."""
    import subprocess

    procs = [subprocess.Popen([sys.executable, __file__, *argv, "--only", ",".join(stages)])
             for stages in WORKER_STAGES]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report_only:
        report = json.loads((Path(args.out) / "run_results.json").read_text(encoding="utf-8"))
        atomic_write_text(Path(args.results), markdown(report, report.get("command", "python bench/run_results.py")))
        return 0
    started, load = time.perf_counter(), os.getloadavg()[0]
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)  # more threads than free cores spin-wait (8-13x slower here)
    stages = [s for s in args.only.split(",") if s] or [s for s in STAGES if s not in args.skip.split(",")]
    data = shared_data_dir()
    if data is None:
        log("../shared/data is absent: SQuAD-open and NQ are skipped")
    wiki = default_knowledge_base()
    kbs = {"wiki": wiki}
    if data is not None:  # built (once) before any worker starts, so that no two processes build one
        kbs["squad"] = squad_kb(data, KB_ROOT)
        kbs["nq"] = nq_kb(data, KB_ROOT, wiki, kbs["squad"])
    if not args.only and args.workers > 1:
        run_workers(list(argv or []))
    decoding = DecodingConfig(num_beams=1, max_new_tokens=args.max_new_tokens)
    dtype = generator_dtype(args.dtype, "cpu")
    model = RagModel.from_config(RagConfig(k=5, generator=GeneratorConfig(dtype=dtype)))  # type: ignore[arg-type]
    sets = question_sets(data, wiki)
    report: dict[str, Any] = {"datasets": {}, "dtype": dtype, "prompt": model.generator.generator_config.prompt,
                              "decoding": "greedy (1 beam; RAG-Sequence: greedy under each "
                              f"passage), at most {args.max_new_tokens} new tokens", "args": vars(args)}
    counts: dict[str, int] = defaultdict(int)
    for ex in sets["wiki"]:
        counts[ex.subset or "?"] += 1
    report["wiki_subsets"] = dict(counts)
    for name, kb in kbs.items():
        if name in stages:
            report["datasets"][name] = run_dataset(name, kb, sets[name], model, args, decoding)
    if "hotswap" in stages:
        report["hotswap"] = hotswap(model, wiki, args.hotswap)
    if "throughput" in stages:
        m = throughput(sets["wiki"], model, decoding, args.throughput, args.batch, Path(args.out))
        report["throughput"] = {**m["timing"], "n": m["n"], "batch": args.batch, "exact_match": m["metrics"]["exact_match"]}
    if args.only:
        return 0
    report["wall_s"] = time.perf_counter() - started
    report["machine"] = (f"{args.workers} worker process(es) x {args.threads} torch thread(s), {os.cpu_count()} CPUs; "
                         f"load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    atomic_write_text(Path(args.out) / "run_results.json", json.dumps(report, indent=2, default=str))
    command = "python bench/run_results.py" + ("" if not argv else " " + " ".join(argv))
    report["command"] = command
    atomic_write_text(Path(args.results), markdown(report, command))
    log(f"wrote {args.results} and {Path(args.out) / 'run_results.json'} in {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
