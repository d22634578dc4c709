"""The one command behind results/retrievers.md: `python bench/run_retrievers.py` (the paper's Table 6
ablation: the learned dense retriever against BM25, and hybrid retrieval beside them).

Stages, run in this order and each saved to the JSON and the Markdown as it finishes (each resumable:
rag.evaluation run folders under --out; re-running continues, and a changed default generator gets new
folders, so the file can be refreshed once another reader ships):
- recall: per question set of results/evaluation.md (Wikipedia summaries + Red-Trivia, SQuAD-open, NQ gold
  passages with distractors; development four fifths, positions i % 5 != 4, of each), the hybrid fusion
  is chosen on --tune development questions disjoint from the --recall sample it is then reported on
  (rag.hybrid; stored in the knowledge base as hybrid.json), then recall@1/5/20 of dense, BM25 and both
  hybrid fusions on the sample;
- speed: on the default knowledge base, BM25 build time beside dense d(z) encoding, and q/s of each
  retriever at batch 64 (best of --repeats, the retrievers alternating);
- fever: Climate-FEVER (../shared/data) claims over its evidence sentences, SUPPORTS/REFUTES claims of the
  development positions: evidence recall@k (a gold SUPPORTS/REFUTES evidence sentence retrieved) and the
  zero-shot (untrained) label accuracy of the default generator (rag eval's classification: one-token
  labels true/false), dense against BM25;
- em: exact match of RAG-Token (k = 5, greedy) with the default generator (RagConfig().generator,
  whatever it is when this runs), --cell questions of each recall sample, per retriever.
JSON goes to --out/run_retrievers.json, Markdown to --results (bench/retrievers_report.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from retrievers_report import markdown
from run_results import KB_ROOT, log, nq_kb, question_sets, sample, squad_kb

from rag.bm25 import BM25_DIR, bm25_meta, build_bm25_index, open_bm25_index
from rag.config import (
    CorpusConfig,
    DecodingConfig,
    EncoderConfig,
    EvalConfig,
    FusionConfig,
    GeneratorConfig,
    IndexConfig,
    RagConfig,
    to_dict,
)
from rag.encoders import load_encoder, passage_text
from rag.evaluation import evaluate
from rag.fusion import load_fusion
from rag.generators import load_generator
from rag.generators.loading import generator_dtype
from rag.hybrid import choose_hybrid_fusion
from rag.io import atomic_write_text
from rag.knowledge import (
    META_FILE,
    PASSAGES_FILE,
    build_knowledge_base,
    default_knowledge_base,
    query_encoder_config,
)
from rag.retriever import BM25Retriever, HybridRetriever, Retriever
from rag.store import PassageStore
from rag.tasks import FEVER_2WAY, Example, split_reserved

STAGES = ("recall", "speed", "fever", "em")  # the order they run in
RECALL_KS = (1, 5, 20)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recall", type=int, default=1000, help="questions per set for recall@k (the reported sample)")
    p.add_argument("--tune", type=int, default=1000, help="dev questions per set the fusion is chosen on")
    p.add_argument("--cell", type=int, default=120, help="questions per exact-match cell")
    p.add_argument("--fever", type=int, default=100, help="Climate-FEVER claims")
    p.add_argument("--speed-questions", type=int, default=1024)
    p.add_argument("--speed-batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="speed: best of N, retrievers alternating")
    p.add_argument("--dense-sample", type=int, default=2000, help="passages encoded to time the dense build")
    p.add_argument("--bm25-temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--only", default="", help="comma-separated stages (default: all); results accumulate")
    p.add_argument("--report-only", action="store_true", help="rewrite --results from the JSON")
    p.add_argument("--results", default="results/retrievers.md")
    p.add_argument("--out", default="bench/out/retrievers")
    return p.parse_args(argv)


def generator_slug(config: GeneratorConfig) -> str:
    """A folder-name-safe identity of the generator: a new default reader gets new run folders."""
    digest = hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:8]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(config.path).name)
    return f"{name}-{digest}"


def splits(pool: list[Example], args: argparse.Namespace) -> tuple[list[Example], list[Example]]:
    """(reported sample, tuning questions): disjoint, both from the development positions."""
    reported = sample(pool, args.recall)
    taken = {id(ex) for ex in reported}
    return reported, sample([ex for ex in pool if id(ex) not in taken], args.tune, seed=2)


def best_of(tried: list[dict[str, Any]], method: str) -> FusionConfig:
    row = max((t for t in tried if t["method"] == method),
              key=lambda t: (t["recall_at_5"], t["recall_at_1"] + t["recall_at_20"], -abs(t["weight"] - 0.5)))  # fmt: skip
    return FusionConfig(method=method, weight=row["weight"])


def retrievers(kb: Path, encoder: Any, temperature: float, fusions: dict[str, FusionConfig]) -> dict[str, Any]:
    dense = Retriever.open(kb, query_encoder=encoder)
    bm25 = BM25Retriever(open_bm25_index(kb, build=True), dense.passages, temperature)
    out: dict[str, Any] = {"dense": dense, "bm25": bm25}
    for label, fusion in fusions.items():
        out[label] = HybridRetriever(dense, bm25.index, fusion, temperature)
    return out


# ------------------------------------------------------------------------------------- stages


def recall_stage(name: str, kb: Path, pool: list[Example], encoder: Any, args: argparse.Namespace) -> dict[str, Any]:
    reported, tune = splits(pool, args)
    base = retrievers(kb, encoder, args.bm25_temperature, {"hybrid": FusionConfig()})["hybrid"]
    log(f"{name}: choosing the hybrid fusion on {len(tune)} dev questions")
    started = time.perf_counter()
    provenance = {"set": name, "questions_from": "development positions, disjoint from the reported sample",
                  "command": "python bench/run_retrievers.py"}  # fmt: skip
    choice = choose_hybrid_fusion(base, tune, k=5, kb_dir=kb, provenance=provenance)
    tune_s = time.perf_counter() - started
    fusions = {f"hybrid-{m}": best_of(choice.tried, m) for m in ("rrf", "interpolation")}
    out: dict[str, Any] = {"kb": str(kb), "passages": len(base.passages), "pool": len(pool), "recall_n": len(reported),
                           "tune_n": len(tune), "tune_s": tune_s, "chosen": to_dict(choice.config),
                           "tried": choice.tried, "retrievers": {}}  # fmt: skip
    for label, retriever in retrievers(kb, encoder, args.bm25_temperature, fusions).items():
        folder = label if label in ("dense", "bm25") else f"{label}-w{fusions[label].weight:.2f}"
        log(f"{name}: recall of {folder} on {len(reported)} questions")
        result = evaluate(reported, Path(args.out) / name / f"recall-{folder}", retriever=retriever,
                          config=EvalConfig(mode="retrieval-only", recall_ks=RECALL_KS, batch_size=64, progress=False),
                          task={"set": name, "n": len(reported)})  # fmt: skip
        out["retrievers"][label] = {"recall": {str(k): v for k, v in result.recall.items()},
                                    "fusion": to_dict(fusions[label]) if label in fusions else None}  # fmt: skip
    return out


def em_stage(name: str, kb: Path, pool: list[Example], encoder: Any, generator: Any,
             args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    cell = sample(splits(pool, args)[0], args.cell, seed=1)
    fusion, _ = load_fusion(kb)  # chosen by the recall stage
    slug = generator_slug(generator.generator_config)
    config = EvalConfig(kind="token", k=5, recall_ks=(1, 5), batch_size=8, progress=False,
                        decoding=DecodingConfig(num_beams=1, max_new_tokens=args.max_new_tokens))  # fmt: skip
    out: dict[str, Any] = {"n": len(cell), "generator": to_dict(generator.generator_config), "fusion": to_dict(fusion),
                           "retrievers": {}}  # fmt: skip
    for label, retriever in retrievers(kb, encoder, args.bm25_temperature, {"hybrid": fusion}).items():
        log(f"{name}: exact match with {label} retrieval on {len(cell)} questions")
        result = evaluate(cell, Path(args.out) / name / f"em-{label}-{slug}", retriever=retriever, generator=generator,
                          config=config, task={"set": name, "n": len(cell), "fusion": to_dict(fusion)})  # fmt: skip
        out["retrievers"][label] = {"exact_match": result.metrics["exact_match"], "f1": result.metrics["f1"],
                                    "contains_answer": result.metrics["contains_answer"],
                                    "recall_at_5": result.recall.get(5), "questions_per_s": result.timing.questions_per_s}  # fmt: skip
    return out


def climate_fever(data: Path, root: Path) -> tuple[Path, list[Example], dict[str, set[str]], float | None]:
    """Its evidence sentences as a knowledge base (built once; build seconds when built now), and the
    SUPPORTS/REFUTES claims of the development positions with their gold evidence ids."""
    rows = [json.loads(line) for line in open(data / "climate_fever" / "climate-fever.jsonl", encoding="utf-8")]
    kb, built_s = root / "kb-climate-fever", None
    if not (kb / META_FILE).is_file():
        sentences = {ev["evidence_id"]: {"id": ev["evidence_id"], "title": ev["article"], "text": ev["evidence"]}
                     for r in rows for ev in r["evidences"]}  # fmt: skip
        corpus = root / "corpus-climate-fever.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in sentences.values()), encoding="utf-8")
        log(f"building the Climate-FEVER knowledge base ({len(sentences)} sentences)")
        started = time.perf_counter()
        build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"), EncoderConfig(), IndexConfig(), kb,
                             progress=False)
        built_s = time.perf_counter() - started
    claims, gold = [], {}
    for i, r in enumerate(rows):
        if r["claim_label"] not in FEVER_2WAY.labels:
            continue
        claims.append(Example(id=str(r["claim_id"]), input=r["claim"], targets=(FEVER_2WAY.target(r["claim_label"]),),
                              answers=(), position=i, label=r["claim_label"]))  # fmt: skip
        gold[str(r["claim_id"])] = {ev["evidence_id"] for ev in r["evidences"] if ev["evidence_label"] != "NOT_ENOUGH_INFO"}
    return kb, split_reserved(claims, "dev"), gold, built_s


def evidence_recall(retriever: Any, claims: list[Example], gold: dict[str, set[str]]) -> dict[str, float]:
    """Share of claims (with gold evidence) with a gold evidence sentence among the top k."""
    judged = [ex for ex in claims if gold[ex.id]]
    hits = []
    for start in range(0, len(judged), 64):
        batch = judged[start : start + 64]
        got = retriever.retrieve([ex.input for ex in batch], max(RECALL_KS))
        for ex, ids in zip(batch, got.ids, strict=True):
            hits.append([pid.rsplit("-", 1)[0] in gold[ex.id] for pid in ids])  # passage id = evidence id + "-0"
    return {str(k): float(np.mean([any(h[:k]) for h in hits])) for k in RECALL_KS} | {"n": len(judged)}


def supports_auc(records: list[dict[str, Any]]) -> float:
    """ROC AUC of p(SUPPORTS) between SUPPORTS and REFUTES claims (Mann-Whitney; ties count half): how
    well the scores separate the labels whatever the model's bias towards one label."""
    p = np.array([r["class_probs"][FEVER_2WAY.labels.index("SUPPORTS")] for r in records])
    positive = np.array([r["label"] == "SUPPORTS" for r in records])
    pos, neg = p[positive], p[~positive]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def fever_stage(data: Path, encoder: Any, generator: Any, args: argparse.Namespace) -> dict[str, Any]:
    kb, claims, gold, built_s = climate_fever(data, KB_ROOT)
    chosen = sample(claims, args.fever)
    slug = generator_slug(generator.generator_config)
    config = EvalConfig(metric="classification", labels=FEVER_2WAY, kind="token", k=5, recall_ks=(1, 5),
                        batch_size=8, progress=False)  # fmt: skip
    out: dict[str, Any] = {"kb": str(kb), "passages": len(PassageStore.open(kb / PASSAGES_FILE)), "claims_dev": len(claims),
                           "n": len(chosen), "majority": max(float(np.mean([ex.label == lab for ex in chosen])) for lab in FEVER_2WAY.labels),
                           "supports_share": float(np.mean([ex.label == "SUPPORTS" for ex in chosen])),
                           "dense_build_s": built_s, "retrievers": {}}  # fmt: skip
    for label, retriever in retrievers(kb, encoder, args.bm25_temperature, {}).items():
        log(f"fever: {label} evidence recall and zero-shot accuracy on {len(chosen)} claims")
        recall = evidence_recall(retriever, chosen, gold)
        result = evaluate(chosen, Path(args.out) / "fever" / f"acc-{label}-{slug}", retriever=retriever,
                          generator=generator, config=config, task={"set": "climate-fever-2way", "n": len(chosen)})  # fmt: skip
        records = [json.loads(line) for line in open(result.out_dir / "predictions.jsonl", encoding="utf-8")]
        out["retrievers"][label] = {"evidence_recall": recall, "accuracy": result.metrics["accuracy"],
                                    "predicted_supports": float(np.mean([r["prediction"] == "SUPPORTS" for r in records])),
                                    "auc": supports_auc(records)}  # fmt: skip
    return out


def _best_time(fn: Any, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def speed_stage(kb: Path, pool: list[Example], encoder: Any, args: argparse.Namespace) -> dict[str, Any]:
    """BM25 build and q/s beside dense, on the same (default) knowledge base, in this one run."""
    store = PassageStore.open(kb / PASSAGES_FILE)
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:  # a twin folder, so the KB's own index stays
        twin = Path(tmp) / "kb"
        twin.mkdir()
        for name in (META_FILE, PASSAGES_FILE):
            os.link(kb / name, twin / name)
        log("speed: BM25 build (a twin folder of the default knowledge base)")
        bm25_build = build_bm25_index(twin).seconds
        bm25_bytes = sum(f.stat().st_size for f in (twin / BM25_DIR).rglob("*") if f.is_file())
    d_z = load_encoder(EncoderConfig())
    n = min(args.dense_sample, len(store))
    texts = [passage_text(p.title, p.text) for p in store.get(np.arange(n))]
    log(f"speed: d(z) encoding of {n} passages")
    started = time.perf_counter()
    d_z.encode(texts, batch_size=64)
    dense_rate = n / (time.perf_counter() - started)
    fusion, _ = load_fusion(kb)
    runs = retrievers(kb, encoder, args.bm25_temperature, {"hybrid": fusion})
    questions = [ex.input for ex in sample(pool, args.speed_questions, seed=3)]
    batches = [questions[i : i + args.speed_batch] for i in range(0, len(questions), args.speed_batch)]
    for retriever in runs.values():  # warm-up
        retriever.retrieve(batches[0], 5)
    best = {label: float("inf") for label in runs}
    log(f"speed: {len(questions)} questions at batch {args.speed_batch}, best of {args.repeats}")
    for _ in range(args.repeats):  # alternating, so load drift falls on every retriever alike
        for label, retriever in runs.items():
            best[label] = min(best[label], _best_time(lambda r=retriever: [r.retrieve(b, 5) for b in batches], 1))
    dense_index = runs["dense"].index
    return {
        "kb": str(kb), "passages": len(store), "questions": len(questions), "batch": args.speed_batch,
        "questions_per_s": {label: len(questions) / s for label, s in best.items()},
        "bm25_build_s": bm25_build, "bm25_bytes": bm25_bytes, "dense_bytes": int(dense_index.nbytes),
        "dense_encode_rate": dense_rate, "dense_encode_sample": n, "dense_build_estimate_s": len(store) / dense_rate,
        "fusion": to_dict(fusion),
    }  # fmt: skip


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "run_retrievers.json"
    command = "python bench/run_retrievers.py" + ("" if not argv else " " + " ".join(argv))
    if args.report_only:
        atomic_write_text(Path(args.results), markdown(json.loads(json_path.read_text(encoding="utf-8"))))
        return 0
    started, load = time.perf_counter(), os.getloadavg()[0]
    torch.set_grad_enabled(False)
    torch.set_num_threads(args.threads)
    stages = [s for s in args.only.split(",") if s] or list(STAGES)
    data = shared_data_dir_or_exit()
    wiki = default_knowledge_base()
    kbs = {"wiki": wiki, "squad": squad_kb(data, KB_ROOT)}
    kbs["nq"] = nq_kb(data, KB_ROOT, wiki, kbs["squad"])
    for kb in kbs.values():
        open_bm25_index(kb, build=True)
    sets = {name: split_reserved(examples, "dev") for name, examples in question_sets(data, wiki).items()}
    encoder = load_encoder(query_encoder_config(wiki))  # the q(x) RagModel uses (scale 20: its logits)
    generator = None
    if {"em", "fever"} & set(stages):
        config = replace(RagConfig().generator, dtype=generator_dtype(args.dtype, "cpu"))
        generator = load_generator(config, "cpu")

    def save(key: str, value: Any) -> None:
        """Merge one stage's (or set's) result into the JSON and the Markdown at once, so an interrupted
        run keeps what it finished; other stages written meanwhile by another run stay."""
        latest = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
        if key == "em":  # set by set
            value = {**latest.get("em", {}), **value}
        latest[key] = value
        latest["bm25_builds"] = {name: bm25_meta(kb).get("build_seconds") for name, kb in kbs.items()}
        atomic_write_text(json_path, json.dumps(latest, indent=2, default=str))
        atomic_write_text(Path(args.results), markdown(latest))

    # cheapest first: recall and speed decide the targets; exact match costs generation time
    if "recall" in stages:
        save("recall", {name: recall_stage(name, kb, sets[name], encoder, args) for name, kb in kbs.items()})
    if "speed" in stages:
        save("speed", speed_stage(wiki, sets["wiki"], encoder, args))
    if "fever" in stages:
        save("fever", fever_stage(data, encoder, generator, args))
    if "em" in stages:
        for name, kb in kbs.items():
            save("em", {name: em_stage(name, kb, sets[name], encoder, generator, args)})
    minutes = (time.perf_counter() - started) / 60
    run = {"command": command, "stages": stages, "minutes": round(minutes, 1),
           "machine": f"{args.threads} torch thread(s), {os.cpu_count()} CPUs, shared with a reader-training job and "
                      f"other helpers' work; load average {load:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"}  # fmt: skip
    latest = json.loads(json_path.read_text(encoding="utf-8")) if json_path.is_file() else {}
    save("runs", [*latest.get("runs", []), run])
    save("args", vars(args))
    log(f"wrote {args.results} and {json_path} in {minutes:.1f} min")
    return 0


def shared_data_dir_or_exit() -> Path:
    from rag.resources import shared_data_dir

    data = shared_data_dir()
    if data is None:
        raise SystemExit("../shared/data is absent: results/retrievers.md needs its SQuAD, NQ and Climate-FEVER sets")
    return data


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
