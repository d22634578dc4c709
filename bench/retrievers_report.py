"""results/retrievers.md from run_retrievers.json: the tables, the targets, and prose read from the numbers."""

from __future__ import annotations

import math
from typing import Any

NAMES = {
    "wiki": "Wikipedia summaries + Red-Trivia (dev 4/5)",
    "squad": "SQuAD-open (dev 4/5)",
    "nq": "NQ gold-passage KB (dev 4/5)",
}
LABELS = {"dense": "dense (all-MiniLM-L6-v2, exact)", "bm25": "BM25 (bm25s)", "hybrid-rrf": "hybrid, reciprocal-rank fusion",
          "hybrid-interpolation": "hybrid, score interpolation", "hybrid": "hybrid (the knowledge base's stored fusion)"}  # fmt: skip


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _se(n: int) -> float:
    return 100 * math.sqrt(0.25 / max(n, 1))


def _fusion(f: dict[str, Any] | None) -> str:
    return "" if not f else f"{f['method']}, dense weight {f['weight']:.2f}"


def _chosen_label(rec: dict[str, Any]) -> str:
    return f"hybrid-{rec['chosen']['method']}"


def _recall_section(recall: dict[str, Any]) -> list[str]:
    lines = ["## Retrieval: recall@k (answer string in the text of one of the top k passages, %)", "",
             "The hybrid's fusion and weight are chosen on development questions disjoint from the ones "
             "reported here (`rag.hybrid.choose_hybrid_fusion`: best recall@5 over both methods and weights "
             "0, 0.05, ..., 1) and stored in each knowledge base as `hybrid.json`; its rows show each "
             "method at its own best weight, the stored choice marked.", ""]  # fmt: skip
    for name, rec in recall.items():
        chosen = _chosen_label(rec)
        lines += [f"### {NAMES[name]}: {rec['passages']:,} passages; {rec['recall_n']} questions reported, "
                  f"fusion chosen on {rec['tune_n']} others", "",
                  "| retriever | fusion (dense weight) | R@1 | R@5 | R@20 |", "|---|---|---|---|---|"]  # fmt: skip
        for label, r in rec["retrievers"].items():
            mark = " (chosen)" if label == chosen else ""
            lines.append(f"| {LABELS[label]}{mark} | {_fusion(r['fusion'])} | {_pct(r['recall']['1'])} | "
                         f"{_pct(r['recall']['5'])} | {_pct(r['recall']['20'])} |")  # fmt: skip
        lines.append("")
    return lines


def _targets(report: dict[str, Any]) -> list[str]:
    lines = ["## Targets", "", "| measure | target | measured | met |", "|---|---|---|---|"]
    recall = report.get("recall", {})

    def r5(name: str, label: str) -> float:
        return 100 * recall[name]["retrievers"][label]["recall"]["5"]

    if "squad" in recall:
        best = max(r5("squad", "dense"), r5("squad", "bm25"))
        hybrid = r5("squad", _chosen_label(recall["squad"]))
        lines.append(f"| hybrid recall@5, SQuAD-open dev | >= max(dense, BM25) + 3 = {best + 3:.1f} | {hybrid:.1f} "
                     f"(dense {r5('squad', 'dense'):.1f}, BM25 {r5('squad', 'bm25'):.1f}) | "
                     f"{'yes' if hybrid >= best + 3 - 1e-9 else 'no'} |")  # fmt: skip
    for name in ("nq", "wiki"):
        if name in recall:
            hybrid, dense = r5(name, _chosen_label(recall[name])), r5(name, "dense")
            lines.append(f"| hybrid recall@5, {NAMES[name]} | >= dense = {dense:.1f} | {hybrid:.1f} | "
                         f"{'yes' if hybrid >= dense - 1e-9 else 'no'} |")  # fmt: skip
    if "speed" in report:
        qps = report["speed"]["questions_per_s"]
        lines.append(f"| BM25 q/s at batch {report['speed']['batch']}, default KB | >= dense exact = {qps['dense']:.0f} | "
                     f"{qps['bm25']:.0f} ({qps['bm25'] / qps['dense']:.1f}x) | {'yes' if qps['bm25'] >= qps['dense'] else 'no'} |")  # fmt: skip
    return lines + [""]


def _em_section(em: dict[str, Any]) -> list[str]:
    any_set = next(iter(em.values()))
    gen = any_set["generator"]
    n = min(s["n"] for s in em.values())
    lines = ["## Exact match (%), RAG-Token, k = 5, greedy", "",
             f"Generator: the default one when this ran, `{gen['path']}` ({gen['dtype']}, prompt `{gen['prompt']}`), "
             f"not fine-tuned. {n} questions per cell (standard error up to {_se(n):.1f} points), the same "
             "questions for every retriever; p(z|x) is each retriever's logits (dense: 20 q(x).d(z); BM25: its "
             "scores; hybrid: the mixture).", "",
             "| retriever | " + " | ".join(NAMES[s].split(" (")[0] + " EM" for s in em) + " | "
             + " | ".join(NAMES[s].split(" (")[0] + " R@5" for s in em) + " |",
             "|---|" + "---|" * (2 * len(em))]  # fmt: skip
    for label in ("dense", "bm25", "hybrid"):
        cells = [_pct(s["retrievers"][label]["exact_match"]) for s in em.values()]
        cells += [_pct(s["retrievers"][label]["recall_at_5"]) for s in em.values()]
        lines.append(f"| {LABELS[label]} | " + " | ".join(cells) + " |")
    lines.append("")
    fusions = "; ".join(f"{NAMES[s].split(' (')[0]}: {_fusion(v['fusion'])}" for s, v in em.items())
    missing = [NAMES[s] for s in NAMES if s not in em]
    pending = [f"Not run yet: {', '.join(missing)} (`python bench/run_retrievers.py --only em` adds it).", ""] if missing else []
    return lines + [f"Hybrid fusions used: {fusions}.", ""] + pending


def _fever_section(fever: dict[str, Any]) -> list[str]:
    lines = ["## FEVER-style claim verification: Climate-FEVER, dense against BM25", "",
             f"Knowledge base: Climate-FEVER's {fever['passages']:,} evidence sentences (title = article). Claims: "
             f"{fever['n']} of the {fever['claims_dev']} SUPPORTS/REFUTES claims at development positions "
             "(i % 5 != 4). Evidence recall@k: a sentence annotated SUPPORTS or REFUTES for the claim is among "
             "the top k (claims with such a sentence). Accuracy: the default generator, **zero-shot and "
             "untrained**, scoring the one-token labels true/false under RAG (k = 5; `rag eval`'s "
             "classification); trained fact verification is issue 15's. Majority class: "
             f"{_pct(fever['majority'])}%.", "",
             "| retriever | evidence R@1 | R@5 | R@20 | label accuracy (2-way, zero-shot) | predicted SUPPORTS | "
             "AUC of p(SUPPORTS) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, r in fever["retrievers"].items():
        e = r["evidence_recall"]
        auc = f"{r['auc']:.3f}" if r.get("auc") is not None else "-"
        lines.append(f"| {LABELS[label]} | {_pct(e['1'])} | {_pct(e['5'])} | {_pct(e['20'])} | "
                     f"{_pct(r['accuracy'])} | {_pct(r['predicted_supports'])} | {auc} |")  # fmt: skip
    lines += ["", "AUC (threshold-free, 0.5 = chance): how well the untrained generator's p(SUPPORTS) separates "
              "the two labels with each retriever's evidence, whatever its bias towards one label."]
    return lines + [""]


def _speed_section(speed: dict[str, Any], builds: dict[str, Any]) -> list[str]:
    qps = speed["questions_per_s"]
    lines = ["## Speed on the default knowledge base", "",
             f"{speed['passages']:,} passages; {speed['questions']} Red-Trivia questions in batches of {speed['batch']}, "
             "k = 5, best of the repeats with the retrievers alternating (one run, side by side). Dense = "
             "encoding the questions with q(x) + exact inner-product search; hybrid = both + fusion over 100 "
             "candidates each.", "",
             "| retriever | questions/s | index build | index bytes |", "|---|---|---|---|",
             f"| dense (exact) | {qps['dense']:.0f} | ~{speed['dense_build_estimate_s']:.0f} s (d(z) encoding at "
             f"{speed['dense_encode_rate']:.0f} passages/s, timed on {speed['dense_encode_sample']:,}) | {speed['dense_bytes']:,} |",
             f"| BM25 | {qps['bm25']:.0f} | {speed['bm25_build_s']:.1f} s | {speed['bm25_bytes']:,} |",
             f"| hybrid ({_fusion(speed['fusion'])}) | {qps['hybrid']:.0f} | both | both |", ""]  # fmt: skip
    built = ", ".join(f"{NAMES[k].split(' (')[0]} {v:.1f} s" for k, v in builds.items() if v is not None)
    return lines + [f"BM25 build times recorded in the knowledge bases (bm25/bm25.json): {built}.", ""]


def markdown(report: dict[str, Any]) -> str:
    runs = report.get("runs", [])
    lines = ["# Retrievers: dense, BM25 and hybrid (the paper's Table 6 ablation)", "",
             "Reproduce with `python bench/run_retrievers.py` (stages recall, speed, fever, em, in that order, each "
             "saved as it finishes; `--only STAGES` reruns some, results accumulate in "
             "bench/out/retrievers/run_retrievers.json; a new default generator gets new exact-match folders). Question sets: those of results/evaluation.md, "
             "development four fifths (positions i % 5 != 4) of each; the reserved fifth is not used.", ""]  # fmt: skip
    for run in runs[-4:]:
        lines.append(f"- `{run['command']}` ({', '.join(run['stages'])}): {run['minutes']} min; {run['machine']}")
    if not runs:  # the stages were saved by a run still going (each stage is saved as it finishes)
        lines.append(f"- {report.get('machine_note', 'machine: see the run log')}")
    lines.append("")
    lines += _targets(report)
    if "recall" in report:
        lines += _recall_section(report["recall"])
    if "em" in report:
        lines += _em_section(report["em"])
    if "fever" in report:
        lines += _fever_section(report["fever"])
    if "speed" in report:
        lines += _speed_section(report["speed"], report.get("bm25_builds", {}))
    return "\n".join(lines).rstrip() + "\n"
