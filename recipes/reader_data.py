"""The trained reader's data: development questions only, each with the passages it will be trained on.

Sources (../shared/data and the packaged Red-Trivia lists), all development material:
- nq-gold: NQ-open questions with gold passages, development four fifths (i % 5 != 4);
- squad: SQuAD-open questions, development four fifths;
- nq-dev: DPR's NQ *dev* questions (topics.dpr.nq.dev: not the NQ test set);
- trivia-dev: DPR's TriviaQA *dev* questions;
- wq-train: WebQuestions train (trainmodel.json);
- red-trivia: the Red-Trivia general-knowledge lists.
Left out: every question that results/ reports (evaluation.md's recall, exact-match, throughput and
hot-swap samples; training.md's train/test split), every question whose text is that of a reserved
fifth or a test set (forbidden_questions), and every capital-city question (the hot-swap experiment
asks those; the reader must not memorise them).

Each question is retrieved (the default q(x), top k) from the training knowledge base: the NQ-gold
base of results/evaluation.md (gold passages + Wikipedia summaries + SQuAD paragraphs, 18,587
passages), which holds every source's evidence. A question is kept when an answer alias occurs in one
of its top-k passages (DPR's has_answer); its target is that alias as the passage writes it, so the
reader is taught to copy a span it can see.
"""

from __future__ import annotations

import json
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from run_results import KB_ROOT, nq_kb, question_sets, sample, squad_kb  # noqa: E402

from rag import metrics as MT  # noqa: E402
from rag.hotswap import CAPITAL_QUESTION, capital_facts  # noqa: E402
from rag.knowledge import default_knowledge_base  # noqa: E402
from rag.resources import red_trivia_dir, shared_data_dir, wiki_summaries_path  # noqa: E402
from rag.tasks import RED_TRIVIA_GENERAL_LISTS, Example, read_task, split_reserved  # noqa: E402

CAPITAL_WORDS = re.compile(r"\bcapital\b", re.IGNORECASE)


def norm(question: str) -> str:
    return " ".join(question.lower().split())


def reported_questions(sets: dict[str, list[Example]]) -> set[str]:
    """Every question results/evaluation.md and results/training.md report (their exact samples)."""
    out: set[str] = set()
    for examples in sets.values():
        out |= {norm(e.input) for e in sample(examples, 1000)}  # recall@k
        out |= {norm(e.input) for e in sample(examples, 100)}  # exact-match cells
    out |= {norm(e.input) for e in sample(sets["wiki"], 1000, seed=1)}  # throughput
    summaries = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    capitals = read_task("red-trivia", red_trivia_dir(), subsets=["worldcapitals"])
    out |= {norm(f.question) for f in capital_facts(summaries, capitals, limit=40)}  # hot-swap
    general = read_task("red-trivia", red_trivia_dir(), subsets=list(RED_TRIVIA_GENERAL_LISTS))
    from run_results import answers_in_kb

    pool = answers_in_kb(list(general), default_knowledge_base(), one_per_question=True)
    random.Random(0).shuffle(pool)
    out |= {norm(e.input) for e in pool[:280]}  # training.md: 160 train + 120 test
    return out


def forbidden_questions(data: Path) -> set[str]:
    """Question texts no training example may have, whatever its own source: the reserved fifths (NQ-gold,
    SQuAD) and the test sets (TriviaQA, WebQuestions, CuratedTREC test; NQ test outside NQ-gold's
    development four fifths, which the issue allows). Data sets repeat questions across entries: two
    SQuAD development questions have the very text of reserved ones."""
    dpr = data / "dpr_test_sets"
    nq_gold = read_task("nq-gold", data / "nq_open_gold_passages" / "nq-open-oracle.jsonl.gz")
    squad = read_task("squad-open", data / "squad_v1.1_dev")
    out = {norm(e.input) for e in split_reserved(nq_gold, "reserved") + split_reserved(squad, "reserved")}
    for name in ("topics.dpr.trivia.test.txt", "topics.dpr.wq.test.txt", "topics.dpr.curated.test.txt"):
        out |= {norm(e.input) for e in read_task("open-qa", dpr / name)}  # JSON Lines or TSV, by its first byte
    allowed = {norm(e.input) for e in split_reserved(nq_gold, "dev")}
    out |= {norm(e.input) for e in read_task("open-qa", dpr / "topics.dpr.nq.test.txt")} - allowed
    return out


def sources(data: Path) -> dict[str, list[Example]]:
    dpr = data / "dpr_test_sets"
    return {
        "nq-gold": split_reserved(read_task("nq-gold", data / "nq_open_gold_passages" / "nq-open-oracle.jsonl.gz"), "dev"),
        "squad": split_reserved(read_task("squad-open", data / "squad_v1.1_dev"), "dev"),
        "nq-dev": list(read_task("dpr-qa", dpr / "topics.dpr.nq.dev.txt")),
        "trivia-dev": list(read_task("dpr-qa", dpr / "topics.dpr.trivia.dev.txt")),
        "wq-train": [Example(f"wq-{i}", r["qText"], tuple(r["answers"]), tuple(r["answers"]), i)
                     for i, r in enumerate(json.loads((data / "webquestions" / "trainmodel.json").read_text()))],
        "red-trivia": list(read_task("red-trivia", red_trivia_dir(), subsets=list(RED_TRIVIA_GENERAL_LISTS))),
    }  # fmt: skip


def surface_form(answer: str, text: str) -> str | None:
    """The answer as `text` writes it (case and all), or None if it does not occur as whole words."""
    match = re.search(r"(?<!\w)" + re.escape(answer.strip()) + r"(?!\w)", text, re.IGNORECASE)
    return match.group(0) if match else None


def grounded_target(example: Example, passages: list[tuple[str, str]]) -> tuple[str, int] | None:
    """(target, rank of the first passage holding it) for the first alias found in rank order."""
    for rank, (_, text) in enumerate(passages):
        for answer in example.answers:
            if answer.strip() and MT.has_answer([answer], text):
                return surface_form(answer, text) or answer.strip(), rank
    return None


def build(out: Path, k: int, seed: int = 0) -> dict[str, Any]:
    from rag.retriever import Retriever

    data = shared_data_dir()
    if data is None:
        raise SystemExit("the reader recipe needs ../shared/data (the development question sets)")
    wiki = default_knowledge_base()
    kb = nq_kb(data, KB_ROOT, wiki, squad_kb(data, KB_ROOT))
    excluded = reported_questions(question_sets(data, wiki))
    forbidden = forbidden_questions(data)
    retriever = Retriever.open(kb)
    kept: dict[str, list[dict[str, Any]]] = {}
    stats: dict[str, Any] = {}
    seen: set[str] = set()
    for name, examples in sources(data).items():
        counts: Counter[str] = Counter(read=len(examples))
        todo = []
        for e in examples:
            key = norm(e.input)
            if key in excluded:
                counts["reported"] += 1
            elif key in forbidden:
                counts["reserved or test text"] += 1
            elif CAPITAL_QUESTION.fullmatch(e.input) or CAPITAL_WORDS.search(e.input):
                counts["capital"] += 1
            elif key in seen or not e.answers or e.answer_is_regex:
                counts["duplicate or no answer"] += 1
            else:
                seen.add(key)
                todo.append(e)
        rows = []
        for start in range(0, len(todo), 256):
            batch = todo[start : start + 256]
            got = retriever.retrieve([e.input for e in batch], k)
            for j, e in enumerate(batch):
                passages = list(zip(got.titles[j], got.texts[j], strict=True))
                found = grounded_target(e, passages)
                if found is None:
                    counts["answer not in top k"] += 1
                    continue
                rows.append({"source": name, "id": e.id, "input": e.input, "target": found[0],
                             "answers": list(e.answers), "answer_rank": found[1]})  # fmt: skip
        counts["kept"] = len(rows)
        kept[name] = rows
        stats[name] = dict(counts)
        print(name, dict(counts), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in kept.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    summary = {"k": k, "kb": str(Path(kb).resolve()), "excluded_reported": len(excluded), "sources": stats}
    (out / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


if __name__ == "__main__":
    print(json.dumps(build(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "bench/out/reader/data", k=3), indent=2))
