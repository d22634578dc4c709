"""results/reader.md: the trained reader measured, by one command (`python recipes/reader_eval.py`).

Every cell is resumable (rag.evaluation run folders under bench/out/reader/eval); re-running continues.
Development cells: 250 questions per knowledge base, drawn from the questions results/evaluation.md
already reports (its 100 exact-match questions, then its recall sample), which reader_data.py keeps out
of training. The reserved fifths (NQ-gold, SQuAD) are evaluated once, with the shipped reader, as the
final figures (`--final`).

Models: "untrained" (SmolLM2 + MiniLM as shipped by their packages, the short-answer prompt: what
`--reader none` gives), "reader" (rag/weights/reader, the default), and the recipe's runs at step 100
("main@100" and the three ablations of recipes/reader.py RUNS), exported from their checkpoints.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "recipes")]

from run_results import KB_ROOT, nq_kb, question_sets, sample, squad_kb  # noqa: E402

from rag.config import DecodingConfig, EvalConfig  # noqa: E402
from rag.io import atomic_write_text  # noqa: E402
from rag.knowledge import default_knowledge_base  # noqa: E402
from rag.resources import shared_data_dir  # noqa: E402
from rag.tasks import Example, read_task, split_reserved  # noqa: E402

OUT = ROOT / "bench" / "out" / "reader"
EVAL = OUT / "eval"
CELL = 250
GREEDY = DecodingConfig(num_beams=1, max_new_tokens=16)
ABLATIONS = ("main", "no-counterfactual", "frozen-q", "sequence")
NAMES = {"nq": "NQ gold passages + distractors (dev)", "squad": "SQuAD-open (dev)",
         "wiki": "Wikipedia summaries + Red-Trivia (answerable)"}  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------ questions and models


def dev_cells(data: Path) -> dict[str, list[Example]]:
    """250 questions per set: results/evaluation.md's 100 exact-match questions, then its recall sample."""
    sets = question_sets(data, default_knowledge_base())
    cells = {}
    for name, examples in sets.items():
        first = sample(examples, 100)
        seen = {e.id for e in first}
        more = [e for e in sample(examples, 1000) if e.id not in seen]
        cells[name] = (first + more)[:CELL]
    return cells


def reserved_cells(data: Path) -> dict[str, list[Example]]:
    nq = split_reserved(read_task("nq-gold", data / "nq_open_gold_passages" / "nq-open-oracle.jsonl.gz"), "reserved")
    squad = split_reserved(read_task("squad-open", data / "squad_v1.1_dev"), "reserved")
    return {"nq": sample(nq, CELL), "squad": sample(squad, CELL)}


def knowledge_bases(data: Path) -> dict[str, Path]:
    wiki = default_knowledge_base()
    squad = squad_kb(data, KB_ROOT)
    return {"wiki": wiki, "squad": squad, "nq": nq_kb(data, KB_ROOT, wiki, squad)}


def reader_folder(model: str) -> str:
    """--reader value of a model name: none, the shipped folder, or an exported run at step 100."""
    from rag.reader import READER_DIR

    if model == "untrained":
        return "none"
    if model == "reader":
        return str(READER_DIR)
    run = model.removesuffix("@100")
    folder = OUT / "exports" / f"{run}-step-100"
    if not (folder / "reader.json").is_file():
        from reader import export

        source = OUT / "runs" / run / ("snapshots/step-100" if run == "main" else "checkpoint")
        export(source, folder, dtype="float32")
    return str(folder)


def load(model: str, kind: str = "token") -> Any:
    from rag.answering import rag_model_config
    from rag.model import RagModel

    return RagModel.from_config(rag_model_config(kind=kind, k=5, reader=reader_folder(model)))


def retriever_for(model: Any, kb: Path) -> Any:
    from rag.retriever import Retriever

    return Retriever.open(kb, query_encoder=model.query_encoder)


# ------------------------------------------------------------------------------ measurements


def cells(model_name: str, model: Any, kbs: dict[str, Path], questions: dict[str, list[Example]],
          configs: dict[str, EvalConfig], root: Path) -> dict[str, dict[str, Any]]:  # fmt: skip
    from rag.evaluation import evaluate_many

    out: dict[str, dict[str, Any]] = {}
    for name, examples in questions.items():
        runs = [(config, root / model_name / name / run) for run, config in configs.items()]
        log(f"{model_name}: {name}, {len(runs)} runs on {len(examples)} questions")
        retriever = retriever_for(model, kbs[name])
        results = evaluate_many(examples, runs, retriever=retriever, generator=model.generator,
                                task={"set": name, "n": len(examples)})  # fmt: skip
        out[name] = {run: {"exact_match": r.metrics["exact_match"], "f1": r.metrics["f1"], "n": r.n,
                           "recall": r.recall, "questions_per_s": r.timing.questions_per_s}
                     for run, r in zip(configs, results, strict=True)}  # fmt: skip
    return out


def counterfactual_following(model: Any, kb: Path, examples: list[Example], k: int = 5, seed: int = 0) -> dict[str, Any]:
    """Knowledge conflicts on development questions (Longpre et al. 2021): where a top-k passage names
    the answer, every alias is replaced by a same-type answer of another question; the share of answers
    that state the substitute (follows the passages) and that state the original (memory)."""
    import torch

    from rag import decoding
    from rag.counterfactual import SubstitutePool, substitute_passages
    from rag.metrics import exact_match

    pool = SubstitutePool((e.input, e.answers[0]) for e in examples)
    retriever = retriever_for(model, kb)
    rng = random.Random(seed)
    follows = memory = total = 0
    with torch.inference_mode():
        for start in range(0, len(examples), 8):
            batch = examples[start : start + 8]
            got = retriever.retrieve([e.input for e in batch], k)
            questions, passages, scores, subs, answers = [], [], [], [], []
            for j, e in enumerate(batch):
                sub = pool.draw(e.input, e.answers, rng)
                if sub is None:
                    continue
                rewritten, changed = substitute_passages(list(zip(got.titles[j], got.texts[j], strict=True)), sub)
                if changed:
                    questions.append(e.input)
                    passages.append(rewritten)
                    scores.append(got.scores[j])
                    subs.append(sub.replacement)
                    answers.append(e.answers)
            if not questions:
                continue
            out = decoding.answer(model.generator, questions, passages, torch.stack(scores), model.kind, GREEDY)
            for j, hyps in enumerate(out.sequences):
                text = model.generator.decode(hyps[0]) if hyps else ""
                follows += exact_match(text, [subs[j]])
                memory += exact_match(text, answers[j])
                total += 1
    return {"n": total, "follows": follows / max(total, 1), "memory": memory / max(total, 1)}


def hotswap(model: Any, relation: str, n: int = 40) -> dict[str, Any]:
    from rag.hotswap import hotswap_experiment

    result = hotswap_experiment(model, default_knowledge_base(), KB_ROOT / "hotswap", n_questions=n,
                                decoding=DecodingConfig(num_beams=1, max_new_tokens=12), relation=relation)  # fmt: skip
    return {"n": len(result.facts), "table": result.table, "top_passage": result.top_passage,
            "examples": [{"question": f.question, "fact_a": f.fact_a, "fact_b": f.fact_b,
                          **{f"answer_{name}": result.answers[name][i] for name in ("A", "B", "none")}}
                         for i, f in enumerate(result.facts[:6])]}  # fmt: skip


LATENCY_QUESTIONS = ("What is the capital of Angola?", "Who wrote the tragedy Hamlet?",
                     "What is the highest mountain on Earth?", "Who painted the Mona Lisa?",
                     "What is the largest ocean on Earth?", "In which country is the city of Timbuktu?",
                     "Who developed the theory of general relativity?", "What is the chemical symbol for gold?",
                     "Which planet is known as the Red Planet?", "Who was the first person to walk on the Moon?")  # fmt: skip


def ask_latency(reader: str) -> dict[str, Any]:
    """`rag ask` with every default (greedy RAG-Token, k = 5, bf16 where native): s/question, warm."""
    from rag.answering import Asker, rag_model_config
    from rag.config import DecodingConfig as D

    asker = Asker.load(rag_model_config(reader=reader), D())
    asker.ask(LATENCY_QUESTIONS[0])  # warm-up: first-call allocations
    times, answers = [], {}
    for question in LATENCY_QUESTIONS:
        start = time.perf_counter()
        answers[question] = asker.ask(question).answer
        times.append(time.perf_counter() - start)
    return {"mean_s": sum(times) / len(times), "answers": answers, "load": os.getloadavg()[0]}


# ------------------------------------------------------------------------------ the stages


def token_configs(ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, EvalConfig]:
    return {f"rag-token-k{k}": EvalConfig(kind="token", k=k, decoding=GREEDY, recall_ks=(1, 5, 10), progress=False)
            for k in ks}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="untrained,reader,ablations,conflicts,hotswap,latency",
                        help="comma-separated: untrained, reader, ablations, conflicts, hotswap, latency, final")
    parser.add_argument("--final", action="store_true", help="also the reserved fifths (final figures, once)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--models", default=None,
                        help="comma-separated: only these models in the stages that compare several (e.g. main@100)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    data = shared_data_dir()
    if data is None:
        raise SystemExit("results/reader.md needs ../shared/data")
    stages = set(args.stages.split(",")) | ({"final"} if args.final else set())
    path = EVAL / "results.json"
    kbs, dev = knowledge_bases(data), dev_cells(data)

    def save(stage: str, entries: dict[str, Any]) -> None:
        """Merge a stage's entries (by model or by set) into results.json as it is on disk now: stages may
        run as separate processes (one per free core), each writing only what it measured."""
        report = json.loads(path.read_text()) if path.is_file() else {}
        report[stage] = {**report.get(stage, {}), **entries}
        atomic_write_text(path, json.dumps(report, indent=2, default=str))

    def chosen(names: tuple[str, ...]) -> tuple[str, ...]:
        return names if args.models is None else tuple(n for n in names if n in args.models.split(","))

    if "untrained" in stages:
        model = load("untrained")
        save("untrained", cells("untrained", model, kbs, dev, {"rag-token-k5": token_configs((5,))["rag-token-k5"]}, EVAL))
    if "reader" in stages:
        model = load("reader")
        configs = {**token_configs(), "closed-book": EvalConfig(mode="closed-book", decoding=GREEDY, progress=False),
                   "rag-sequence-thorough-k5": EvalConfig(kind="sequence", k=5, decoding=GREEDY, progress=False)}  # fmt: skip
        save("reader", cells("reader", model, kbs, dev, configs, EVAL))
    if "ablations" in stages:
        for run in (name.removesuffix("@100") for name in chosen(tuple(f"{r}@100" for r in ABLATIONS))):
            kind = "sequence" if run == "sequence" else "token"
            model = load(f"{run}@100", kind)
            config = EvalConfig(kind=kind, k=5, decoding=GREEDY, recall_ks=(1, 5), progress=False)
            save("ablations", {run: cells(f"{run}@100", model, kbs, dev, {f"rag-{kind}-k5": config}, EVAL)})
    if "conflicts" in stages:
        for name in chosen(("untrained", "main@100", "no-counterfactual@100", "reader")):
            log(f"counterfactual passages: {name}")
            save("conflicts", {name: counterfactual_following(load(name), kbs["nq"], dev["nq"])})
    if "hotswap" in stages:
        for name in chosen(("reader", "main@100", "no-counterfactual@100")):
            model = load(name)
            relations: dict[str, Any] = {}
            for relation in ("capitals", "city-country"):
                log(f"hot-swap {relation}: {name}")
                relations[relation] = hotswap(model, relation)
                save("hotswap", {name: relations})
    if "latency" in stages:
        for name in chosen(("untrained", "reader")):
            log(f"rag ask latency: {name}")
            save("latency", {name: ask_latency(reader_folder(name))})
    if "final" in stages:
        model = load("reader")
        save("final", cells("reader-final", model, kbs, reserved_cells(data), token_configs((5,)), EVAL))
    from reader_report import write

    write(json.loads(path.read_text()) if path.is_file() else {}, ROOT / "results" / "reader.md")
    log("wrote results/reader.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
