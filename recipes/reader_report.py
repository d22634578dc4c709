"""results/reader.md from bench/out/reader/eval/results.json (recipes/reader_eval.py writes both)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SETS = ("nq", "squad", "wiki")
NAMES = {"nq": "NQ gold + distractors", "squad": "SQuAD-open", "wiki": "Wiki + Red-Trivia"}
# results/evaluation.md (issue 9's "now" column): the untrained models, short-answer prompt, 100 questions
BEFORE = {"nq": 0.18, "squad": 0.09, "wiki": 0.30}
TARGETS = {"nq": 0.55, "squad": 0.40, "wiki": 0.55}


def _at(recall: dict[Any, float], k: int) -> float | None:
    """recall@k from a dict keyed by k (int in memory, str once read back from JSON)."""
    return recall.get(k, recall.get(str(k)))


def pct(x: float | None, n: int | None = None) -> str:
    if x is None:
        return "–"
    if n:
        return f"{100 * x:.1f} ± {100 * math.sqrt(max(x * (1 - x), 1e-12) / n):.1f}"
    return f"{100 * x:.1f}"


def em(report: dict[str, Any], model: str, name: str, run: str) -> tuple[float | None, int | None]:
    cell = report.get(model, {}).get(name, {}).get(run)
    return (cell["exact_match"], cell["n"]) if cell else (None, None)


def ablation_cell(report: dict[str, Any], run: str, name: str) -> dict[str, Any] | None:
    """An ablation's one evaluation (RAG-Token or RAG-Sequence, k = 5) on a set, if it has run."""
    return next(iter(report.get("ablations", {}).get(run, {}).get(name, {}).values()), None)


def write(report: dict[str, Any], path: Path) -> None:
    lines = [
        "# The trained reader (issue 9)",
        "",
        "The default model now reads what it retrieves: SmolLM2-135M-Instruct and all-MiniLM-L6-v2's q(x),",
        "fine-tuned end to end with the RAG-Token loss as LoRA deltas (rag/weights/reader, loaded by default;",
        "`--reader none` gives the untrained models). Made by `make reader` (recipes/reader.py: data, train,",
        "export) and `python recipes/reader_eval.py` (this file). Figures are exact match in % ± one standard",
        "error, greedy decoding, on 2-core CPUs (the training job and other work ran on the same machine).",
        "",
    ]
    lines += _training(report)
    lines += _base_choice()
    lines += _targets(report)
    lines += _cells(report)
    lines += _ablations(report)
    lines += _ordering(report)
    lines += _conflicts(report)
    lines += _hotswap(report)
    lines += _latency(report)
    lines += _final(report)
    lines += _reading(report)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _training(report: dict[str, Any]) -> list[str]:
    manifest = ROOT / "rag" / "weights" / "reader" / "reader.json"
    summary_file = ROOT / "bench" / "out" / "reader" / "data" / "summary.json"
    out = ["## Training", ""]
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
        out += ["Development questions only (recipes/reader_data.py): each retrieved from the training knowledge",
                f"base ({summary['kb'].rsplit('/', 1)[-1]}: NQ gold passages + Wikipedia summaries + SQuAD paragraphs),",
                "kept when an answer alias occurs in its top-3 passages, the target being that alias as the passage",
                "writes it. Left out: every question results/ reports, every reserved fifth, every test set, every",
                "capital-city question.", "",
                "| source | read | reported (left out) | answer not in top 3 | kept |", "|---|---:|---:|---:|---:|"]  # fmt: skip
        for name, s in summary["sources"].items():
            out.append(f"| {name} | {s.get('read', 0)} | {s.get('reported', 0)} | {s.get('answer not in top k', 0)} | {s.get('kept', 0)} |")
        out.append("")
    if manifest.is_file():
        meta = json.loads(manifest.read_text())
        settings = meta.get("settings", {})
        out += [f"Shipped run: `{meta.get('run')}`, {meta.get('steps')} steps of 8 questions ({meta.get('examples_seen')} "
                f"examples), {meta.get('train_cpu_hours')} hours of one CPU core (training steps alone).",
                f"Settings: {json.dumps(settings)}.", "",
                "Config: results/reader-train-config.json; log: results/reader-train-log.jsonl (one record per step,",
                "dev exact match on 100 NQ questions at k = 3 every 100 steps); curves: results/reader-curves.png",
                "(`rag train plot`). One torch thread, beside the ablations, evaluations and other work on the",
                "same 2 cores (load average 6-9): the seconds per step (15-24) are wall time under that load.", ""]  # fmt: skip
    return out


def _base_choice() -> list[str]:
    path = ROOT / "bench" / "out" / "reader" / "base_choice.json"
    if not path.is_file():
        return []
    choice = json.loads(path.read_text())
    out = ["## The base model", "",
           "`python recipes/reader_base.py`: the recipe's training micro-batch (2 questions, k = 3, LoRA, bf16",
           "autocast) and one greedy answer (k = 5), alternating between the models on one thread. Untrained",
           "exact match: issue 9's measurement (100 NQ-gold development questions over their gold passages).", "",
           "| model | parameters (M) | s per training micro-batch | s per answer | untrained EM |",
           "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in choice.items():
        out.append(f"| {name} | {r['parameters_M']} | {r['train_s_per_microbatch_of_2']} | {r['answer_s']} | "
                   f"{pct(r['untrained_em_issue'])} |")  # fmt: skip
    small, large = choice.get("SmolLM2-135M-Instruct"), choice.get("Gemma-3-270M")
    if small and large:
        step = large["train_s_per_microbatch_of_2"] / small["train_s_per_microbatch_of_2"]
        answer = large["answer_s"] / small["answer_s"]
        out += ["", f"Chosen: SmolLM2-135M-Instruct. Gemma-3-270M costs {step:.1f}x per training step and {answer:.1f}x per",
                "answer for 4 points of untrained exact match: in the same CPU hours it would see a third of the",
                "examples, and `rag ask` would miss its latency target by that factor."]  # fmt: skip
    return out + [""]


def _ordering(report: dict[str, Any]) -> list[str]:
    """The paper's ordering: fine-tuned RAG > frozen-retriever RAG > closed book, with margins, at equal steps
    (the ablations at step 100) and for the shipped reader against its own generator without passages."""
    out = []
    for name in SETS:
        main, frozen = ablation_cell(report, "main", name), ablation_cell(report, "frozen-q", name)
        closed, _ = em(report, "reader", name, "closed-book")
        reader, _ = em(report, "reader", name, "rag-token-k5")
        if main is None or frozen is None or closed is None or reader is None:
            continue
        a, b = main["exact_match"], frozen["exact_match"]
        se = math.sqrt(a * (1 - a) / main["n"] + b * (1 - b) / frozen["n"])  # of the difference
        if not (a > b and b > closed and reader > closed):
            verdict = "not shown"
        else:
            verdict = "shown" if a - b > 2 * se else f"in order, but {100 * (a - b):.1f} < 2 SE ({200 * se:.1f})"
        out.append(f"| {NAMES[name]} | {pct(a)} | {pct(b)} | {100 * (a - b):+.1f} | {pct(reader)} | {pct(closed)} | "
                   f"{100 * (reader - closed):+.1f} | {verdict} |")  # fmt: skip
    if not out:
        return []
    return ["## The paper's ordering: fine-tuned RAG > frozen-retriever RAG > closed book", "",
            "Fine-tuned and frozen q(x) at equal steps (100); the shipped reader against the same generator",
            "without passages. A margin within two standard errors of the difference (about 8 points at 250",
            "questions) is not a difference.", "",
            "| set | q(x) trained @100 | q(x) frozen @100 | margin | reader | closed book | margin | ordering |",
            "|---|---:|---:|---:|---:|---:|---:|---|", *out, ""]  # fmt: skip


def _targets(report: dict[str, Any]) -> list[str]:
    out = ["## Targets (development questions, 250 per set)", "",
           "| measure | before (results/evaluation.md) | untrained, same questions | reader | target |",
           "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name in SETS:
        u, nu = em(report, "untrained", name, "rag-token-k5")
        r, nr = em(report, "reader", name, "rag-token-k5")
        out.append(f"| {NAMES[name]}, EM | {pct(BEFORE[name])} | {pct(u, nu)} | {pct(r, nr)} | ≥ {pct(TARGETS[name])} |")
    swap = report.get("hotswap", {}).get("reader", {}).get("capitals")
    if swap:
        out.append(f"| hot-swap (capitals, {swap['n']}): answers follow B under B | 5.0 | – | {pct(swap['table']['B']['B'])} | ≥ 80 |")
        out.append(f"| hot-swap (capitals): answers state A under A | 65.0 | – | {pct(swap['table']['A']['A'])} | ≥ 85 |")
    lat = report.get("latency", {})
    if lat:
        angola = lat.get("reader", {}).get("answers", {}).get("What is the capital of Angola?", "–")
        before = lat.get("untrained", {}).get("answers", {}).get("What is the capital of Angola?", "–")
        out.append(f"| `rag ask` defaults (greedy), Angola | Cabinda | {before} | {angola} | Luanda |")
        out.append(f"| `rag ask` mean s/question (defaults) | 1.56 | {lat.get('untrained', {}).get('mean_s', 0):.2f} | "
                   f"{lat.get('reader', {}).get('mean_s', 0):.2f} | ≤ 0.6 |")  # fmt: skip
    return out + [""]


def _cells(report: dict[str, Any]) -> list[str]:
    out = ["## The reader per knowledge base", "",
           "| set | untrained RAG-Token k=5 | closed book (reader's generator) | RAG-Token k=1 | k=5 | k=10 | "
           "RAG-Sequence thorough k=5 | recall@1 / @5 |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name in SETS:
        cell = report.get("reader", {}).get(name, {})
        if not cell:
            continue
        row = [pct(*em(report, "untrained", name, "rag-token-k5")), pct(*em(report, "reader", name, "closed-book"))]
        row += [pct(*em(report, "reader", name, f"rag-token-k{k}")) for k in (1, 5, 10)]
        row.append(pct(*em(report, "reader", name, "rag-sequence-thorough-k5")))
        recall = cell.get("rag-token-k5", {}).get("recall", {})
        row.append(f"{pct(_at(recall, 1))} / {pct(_at(recall, 5))}")
        out.append(f"| {NAMES[name]} | " + " | ".join(row) + " |")
    return out + [""]


def _ablations(report: dict[str, Any]) -> list[str]:
    abl = report.get("ablations")
    if not abl:
        return []
    names = {"main": "reader recipe (RAG-Token, q(x) trained, 30% counterfactual)",
             "no-counterfactual": "no counterfactual passages", "frozen-q": "q(x) frozen (the paper's frozen retriever)",
             "sequence": "RAG-Sequence loss and decoding"}  # fmt: skip
    out = ["## Ablations at equal steps (100 steps, 800 examples, same data order)", "",
           "| run | " + " | ".join(NAMES[s] for s in SETS) + " |", "|---|" + "---:|" * len(SETS)]
    for run in abl:
        values = []
        for name in SETS:
            cell = ablation_cell(report, run, name)
            values.append(pct(cell["exact_match"], cell["n"]) if cell else "–")
        out.append(f"| {names.get(run, run)} | " + " | ".join(values) + " |")
    closed = [em(report, "reader", s, "closed-book") for s in SETS]
    out.append("| closed book (the shipped reader's generator, no passages) | " + " | ".join(pct(*c) for c in closed) + " |")
    return out + [""]


def _conflicts(report: dict[str, Any]) -> list[str]:
    conf = report.get("conflicts")
    if not conf:
        return []
    out = ["## Knowledge conflicts on development questions", "",
           "NQ development questions whose top-5 passages name the answer; every alias is replaced by another",
           "question's answer of the same type (rag.counterfactual). The shipped mix (30% of training examples",
           "with counterfactual passages) against none, at equal steps, is the comparison that judges the mix.", "",
           "| model | n | answers state the substitute (follow the passages) | answers state the original (memory) |",
           "|---|---:|---:|---:|"]  # fmt: skip
    for name, c in conf.items():
        out.append(f"| {name} | {c['n']} | {pct(c['follows'], c['n'])} | {pct(c['memory'], c['n'])} |")
    return out + [""]


def _hotswap(report: dict[str, Any]) -> list[str]:
    swaps = report.get("hotswap")
    if not swaps:
        return []
    out = ["## Knowledge hot-swap", "",
           "Index A: the packaged summaries; index B: a copy where facts are changed (capitals permuted",
           "everywhere; cities moved to another country in their own article). Same model, no retraining.", "",
           "| model | relation | n | A under A | B under A | A under B | B under B | no index: A |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for model, relations in swaps.items():
        for relation, r in relations.items():
            t = r["table"]
            out.append(f"| {model} | {relation} | {r['n']} | {pct(t['A']['A'])} | {pct(t['A']['B'])} | "
                       f"{pct(t['B']['A'])} | {pct(t['B']['B'])} | {pct(t['none']['A'])} |")  # fmt: skip
    reader = swaps.get("reader", {})
    for relation, r in reader.items():
        out += ["", f"Examples ({relation}, the shipped reader):", "",
                "| question | A | B | answer under A | answer under B | no index |", "|---|---|---|---|---|---|"]
        out += [f"| {e['question']} | {e['fact_a']} | {e['fact_b']} | {e['answer_A']} | {e['answer_B']} | {e['answer_none']} |"
                for e in r.get("examples", [])]
    return out + [""]


def _latency(report: dict[str, Any]) -> list[str]:
    lat = report.get("latency")
    if not lat:
        return []
    out = ["## `rag ask` with every default", "",
           "Mean seconds per question over 10 questions after one warm-up (greedy RAG-Token, k = 5, bf16 on",
           "this AMX CPU, one torch thread), with the load average at the time (not a quiet machine: the",
           "RAG-Sequence ablation's evaluation ran beside it):", "",
           "| model | mean s/question | load | Angola |", "|---|---:|---:|---|"]  # fmt: skip
    for name, r in lat.items():
        out.append(f"| {name} | {r['mean_s']:.2f} | {r['load']:.1f} | {r['answers'].get('What is the capital of Angola?')} |")
    return out + [""]


def _final(report: dict[str, Any]) -> list[str]:
    final = report.get("final")
    if not final:
        return []
    out = ["## Final figures: the reserved fifths (reported once)", "",
           "| set | n | RAG-Token k=5 EM | recall@5 |", "|---|---:|---:|---:|"]
    for name, cells in final.items():
        c = cells["rag-token-k5"]
        out.append(f"| {NAMES[name]} (reserved fifth) | {c['n']} | {pct(c['exact_match'], c['n'])} | {pct(_at(c['recall'], 5))} |")
    return out + [""]


def _reading(report: dict[str, Any]) -> list[str]:
    """What the tables say about the choices and the limits, from their own numbers."""
    conf, swap = report.get("conflicts", {}), report.get("hotswap", {})
    out = ["## Reading the tables", ""]

    def k5(run: str, name: str) -> float | None:
        cell = ablation_cell(report, run, name)
        return cell["exact_match"] if cell else None

    costs = [(NAMES[n], k5("no-counterfactual", n), k5("main", n)) for n in SETS]
    if all(a is not None and b is not None for _, a, b in costs) and "main@100" in conf and "no-counterfactual@100" in conf:
        cost = ", ".join(f"{n} {100 * (a - b):+.1f}" for n, a, b in costs)  # type: ignore[operator]
        follow = (conf["main@100"]["follows"], conf["no-counterfactual@100"]["follows"])
        line = (f"- Counterfactual passages (30% of examples) cost exact match at 100 steps ({cost} points without"
                f" them) and buy following the passages: substitutes stated {pct(follow[0])}% against {pct(follow[1])}%")
        b_under_b = [swap.get(m, {}).get("capitals", {}).get("table", {}).get("B", {}).get("B") for m in ("main@100", "no-counterfactual@100")]
        if None not in b_under_b:
            line += f"; hot-swap capitals, answers following B {pct(b_under_b[0])}% against {pct(b_under_b[1])}%"
        out.append(line + ". Following the index is the reader's purpose here, so the mix stays.")
    log_path = ROOT / "results" / "reader-train-log.jsonl"
    if log_path.is_file():
        dev = [(r["step"], r["dev_exact_match"]) for r in map(json.loads, log_path.read_text().splitlines()) if "dev_exact_match" in r]
        if dev:
            curve = ", ".join(f"{pct(v)} at step {s}" for s, v in dev)
            out.append(f"- Development exact match during training (100 NQ questions, k = 3): {curve}. The reader learns the"
                       " answer format and to read within about 100 steps; later steps do not raise it beyond noise.")
    seq = [(NAMES[n], k5("sequence", n), k5("main", n)) for n in SETS]
    if all(a is not None and b is not None for _, a, b in seq):
        diff = ", ".join(f"{n} {100 * (a - b):+.1f}" for n, a, b in seq)  # type: ignore[operator]
        out.append(f"- RAG-Sequence against RAG-Token, trained each way for 100 steps: {diff} points for RAG-Sequence"
                   " (the paper, too, finds neither better everywhere); the shipped RAG-Token reader decoded as"
                   " RAG-Sequence (thorough) is in the table per knowledge base.")
    wiki = report.get("reader", {}).get("wiki", {}).get("rag-token-k5")
    if wiki:
        out.append(f"- Wiki + Red-Trivia: the answer is in the top 5 passages for {pct(_at(wiki['recall'], 5))}% of the questions and"
                   f" the reader answers {pct(wiki['exact_match'])}%: retrieval, not reading, bounds this set.")
    cap = swap.get("reader", {}).get("capitals")
    if cap and "top_passage" in cap:
        out.append(f"- Hot-swap: under index B, B's passage is on top for {pct(cap['top_passage']['B']['B'])}% of the questions;"
                   f" the reader states B for {pct(cap['table']['B']['B'])}%.")
    return out + [""] if len(out) > 2 else []
