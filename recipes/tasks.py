"""results/tasks.md: the paper's task families beyond open-domain QA on real data, trained and measured.

    python recipes/tasks.py all             # every stage below in order (resumable: re-run after an interruption)
    python recipes/tasks.py data            # knowledge bases (SciFact abstracts, Climate-FEVER articles; BM25 too)
    python recipes/tasks.py train --run scifact-rag     # one training run (RUNS), resumable
    python recipes/tasks.py eval --run scifact-rag      # its test-split evaluation (rag.evaluation)
    python recipes/tasks.py report          # results/tasks.md and the Figure-2 heatmap it quotes

- Jeopardy question generation (sec 3.3): input the answer entity, output the clue, over the packaged
  Wikipedia summaries; RAG-Token, RAG-Sequence and the generator alone (the paper's BART row), trained
  on the development four fifths (i % 5 != 4); Q-BLEU-1, BLEU-1 and the grounded share of generated
  content words on the reserved fifth (i % 5 == 4), reported once.
- Fact verification as one-token classification (sec 3.4): SciFact claims over its abstracts (100-word
  passages), Climate-FEVER claims over its evidence sentences grouped by article. RAG (q(x) and the
  generator, d(z) frozen), the generator alone, and RAG with BM25 (only the generator learns); the class
  is a one-token target scored without an end token, so RAG-Sequence and RAG-Token train identically
  and one trained model is scored both ways. SciFact's validation claims (reserved) and Climate-FEVER's
  reserved fifth are reported once.

Every run follows recipes/reader.py's CPU recipe: LoRA deltas (rag.lora) on SmolLM2-135M-Instruct and
all-MiniLM-L6-v2's q(x), the "plain" prompt, bfloat16 weights and autocast, eager attention, micro-batch
2 x 4 accumulated, one thread. Jeopardy starts from the shipped reader (rag/weights/reader) when it is
there: a chain of deltas, the reader's merged at load, a new one trained on top.
Data come from ../shared/data and are never copied into the repository; outputs go to bench/out/tasks.
"""

from __future__ import annotations

import argparse
import ast
import csv
import dataclasses
import io
import json
import math
import random
import re
import sys
import time
import tokenize
import zipfile
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT)]

OUT = ROOT / "bench" / "out" / "tasks"
RESULTS = ROOT / "results" / "tasks.md"
FIGURE = ROOT / "results" / "figures" / "tasks-jeopardy-heatmap.png"  # the one figure results/tasks.md quotes
CLASSIFICATION = ("scifact", "climate-fever")
JEOPARDY_TEST = 300  # reserved-fifth clues scored (a seeded sample: decoding 40 tokens costs CPU)
JEOPARDY_MAX_NEW_TOKENS = 40


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclasses.dataclass(frozen=True)
class Run:
    task: str  # jeopardy | scifact | climate-fever
    mode: str = "rag"  # rag | closed-book
    kind: str = "token"  # the training loss (one-token labels: both kinds are the same loss)
    retriever: str = "dense"  # dense (q(x) learns) | bm25 (frozen prior: only the generator learns)
    k: int = 3
    steps: int = 100
    start: str = "base"  # base | reader (the shipped reader's deltas merged first, when it is there)
    lr: float = 3e-4  # LoRA pairs start at B = 0 (recipes/reader.py)
    warmup: int = 10
    generator_rank: int = 16
    query_rank: int = 8
    batch_size: int = 2  # micro-batch 2: about 5 GB on this machine (recipes/reader.py)
    grad_accum: int = 4  # 8 examples per optimiser step
    seed: int = 0


# In the order `all` runs them (train, then evaluate, run by run): the CPU is shared, so what matters most
# comes first. Sizes were set from recipes/reader.py's about 18 s per step of 8 examples at k = 3 on an
# idle core. On a core shared with two reader trainings of higher priority the first scifact-rag steps took
# 230-630 s of wall time each (the process got a small share of the core): run this when the core is free.
RUNS: dict[str, Run] = {
    # 40 steps x 8 = 320 of SciFact's 809 training claims, 320 of Climate-FEVER's 1,101 development claims
    "scifact-rag": Run("scifact", steps=40, warmup=4),
    "scifact-closed-book": Run("scifact", mode="closed-book", steps=40, warmup=4),
    "climate-fever-rag": Run("climate-fever", steps=40, warmup=4),
    "climate-fever-closed-book": Run("climate-fever", mode="closed-book", steps=40, warmup=4),
    # 60 steps x 8 = 480 clues, each once
    "jeopardy-token": Run("jeopardy", steps=60, warmup=6, start="reader"),
    "jeopardy-closed-book": Run("jeopardy", mode="closed-book", steps=60, warmup=6, start="reader"),
    "jeopardy-sequence": Run("jeopardy", kind="sequence", steps=60, warmup=6, start="reader"),
    "scifact-bm25": Run("scifact", retriever="bm25", steps=40, warmup=4),
    "climate-fever-bm25": Run("climate-fever", retriever="bm25", steps=40, warmup=4),
}


# ------------------------------------------------------------------------------------------ data


def data_dir() -> Path:
    from rag.resources import shared_data_dir

    data = shared_data_dir()
    if data is None:
        raise SystemExit("recipes/tasks.py needs ../shared/data (Jeopardy, SciFact, Climate-FEVER)")
    return data


def scifact_sentences(printed: str) -> list[str]:
    """The export's abstract column is a numpy-printed list of strings (`['a.'\\n 'b.']`, no commas):
    read each string literal on its own (Python's tokenizer; literal_eval of one STRING token)."""
    tokens = tokenize.generate_tokens(io.StringIO(printed).readline)
    return [ast.literal_eval(t.string) for t in tokens if t.type == tokenize.STRING]


def scifact_documents(data: Path) -> list[dict[str, str]]:
    csv.field_size_limit(sys.maxsize)
    with zipfile.ZipFile(data / "scifact" / "scifact_hf_csv.zip") as archive:
        text = archive.read("corpus_train.csv").decode("utf-8")
    docs = []
    for row in csv.DictReader(io.StringIO(text)):
        sentences = scifact_sentences(row["abstract"])
        docs.append({"id": row["doc_id"].strip(), "title": row["title"].strip(), "text": " ".join(s.strip() for s in sentences)})
    return docs


def climate_fever_documents(data: Path) -> list[dict[str, str]]:
    """Each article's evidence sentences, in their order in the article (the number after ':' in the id)."""
    sentences: dict[str, dict[int, str]] = defaultdict(dict)
    with open(data / "climate_fever" / "climate-fever.jsonl", encoding="utf-8") as handle:
        for line in handle:
            for ev in json.loads(line)["evidences"]:
                number = int(ev["evidence_id"].rsplit(":", 1)[1])
                sentences[ev["article"]][number] = ev["evidence"].strip()
    return [{"id": article, "title": article, "text": " ".join(s for _, s in sorted(parts.items()))}
            for article, parts in sorted(sentences.items())]  # fmt: skip


def build_kb(name: str, docs: list[dict[str, str]]) -> Path:
    """A dense knowledge base (the default encoder, d(z) in bfloat16 where native) and its BM25 index."""
    from rag.bm25 import build_bm25_index, has_bm25_index
    from rag.config import CorpusConfig, EncoderConfig, IndexConfig
    from rag.encoder_layout import passage_dtype
    from rag.knowledge import build_knowledge_base, is_knowledge_base

    kb = OUT / f"kb-{name}"
    if not is_knowledge_base(kb):
        corpus = OUT / f"corpus-{name}.jsonl"
        corpus.parent.mkdir(parents=True, exist_ok=True)
        corpus.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
        log(f"building knowledge base {name} ({len(docs)} documents)")
        with Clock(f"kb-{name}"):
            build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"),
                                 EncoderConfig(dtype=passage_dtype("auto")), IndexConfig(), kb, progress=False)  # fmt: skip
    if not has_bm25_index(kb):
        with Clock(f"bm25-{name}"):
            build_bm25_index(kb, progress=False)
    return kb


def knowledge_base(task: str) -> Path:
    if task == "jeopardy":
        from rag.knowledge import default_knowledge_base

        return default_knowledge_base(progress=False)
    data = data_dir()
    if task == "scifact":
        return build_kb("scifact", scifact_documents(data))
    return build_kb("climate-fever", climate_fever_documents(data))


def timing(name: str, seconds: float, cpu: float | None = None) -> None:
    """Wall and CPU seconds of each stage (summed over resumed calls), for the CPU-hours table; the
    machine is shared, so the CPU time of the process is the cost and wall time only what it took."""
    path = OUT / "timing.json"
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    entry = known.get(name, {}) if isinstance(known.get(name), dict) else {"wall": known.get(name, 0.0)}
    entry["wall"] = entry.get("wall", 0.0) + seconds
    if cpu is not None:
        entry["cpu"] = entry.get("cpu", 0.0) + cpu
    known[name] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(known, indent=2), encoding="utf-8")


class Clock:
    """Wall and process CPU time of a block, added to timing.json under `name`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        timing(self.name, time.perf_counter() - self.wall, time.process_time() - self.cpu)


_MEDIA = re.compile(r"\b(seen|shown|heard) here\b", re.IGNORECASE)


def _entity(name: str) -> str:
    name = re.sub(r"[\"'()]", "", name.lower()).strip()
    return re.sub(r"^(the|a|an) ", "", name)


def jeopardy_examples(data: Path) -> tuple[list[Any], set[int]]:
    """The clues that are text alone (no media link, no "seen here"), and the positions of those whose
    answer entity has an article in the knowledge base (the paper's Wikipedia covers SearchQA's)."""
    from rag.resources import wiki_summaries_path
    from rag.tasks import read_task

    examples = [e for e in read_task("jeopardy", data / "jeopardy" / "jeopardy.csv")
                if "<" not in e.target and not _MEDIA.search(e.target)]  # fmt: skip
    titles = {_entity(t) for t in json.loads(wiki_summaries_path().read_text(encoding="utf-8"))}
    return examples, {e.position for e in examples if _entity(e.input) in titles}


def task_split(task: str, part: str) -> list[Any]:
    """train: what a run learns from; test: the reserved split, scored once."""
    from rag.tasks import read_task, split_reserved

    data = data_dir()
    if task == "jeopardy":
        examples, covered = jeopardy_examples(data)
        pool = [e for e in split_reserved(examples, "dev" if part == "train" else "reserved") if e.position in covered]
        n = max(r.steps * r.batch_size * r.grad_accum for r in RUNS.values() if r.task == "jeopardy") if part == "train" else JEOPARDY_TEST
        random.Random(f"jeopardy-{part}").shuffle(pool)  # a seeded order: a larger n extends a smaller one's sample
        return pool[:n]
    if task == "scifact":
        return read_task("scifact", data / "scifact" / "scifact_hf_csv.zip", split="train" if part == "train" else "validation")
    examples = read_task("climate-fever", data / "climate_fever" / "climate-fever.jsonl")
    return split_reserved(examples, "dev" if part == "train" else "reserved")


def labels(task: str) -> Any:
    from rag.tasks import CLASSIFICATION_LABELS

    return CLASSIFICATION_LABELS.get(task)


# -------------------------------------------------------------------------------------- training


def reader_or_none(run: Run) -> Any:
    if run.start != "reader":
        return None
    from rag.reader import READER_DIR, read_reader

    return read_reader(READER_DIR) if (READER_DIR / "reader.json").is_file() else None


def rag_config(run: Run, kb: Path, reader: Any) -> Any:
    from rag.config import GeneratorConfig, RagConfig, RetrieverConfig
    from rag.knowledge import query_encoder_config

    generator = GeneratorConfig(prompt="plain", dtype="bfloat16", attention="eager", max_target_tokens=48,
                                deltas=(str(reader.generator_delta),) if reader else ())  # fmt: skip
    query = query_encoder_config(kb)
    if reader is not None and reader.query_delta is not None and query.path == reader.query_base:
        query = dataclasses.replace(query, deltas=(str(reader.query_delta),))
    return RagConfig(kind=run.kind, k=run.k, query_encoder=query, generator=generator, index_dir=str(kb),
                     retriever=RetrieverConfig(kind=run.retriever))  # fmt: skip


def train_config(run: Run, rag: Any) -> Any:
    from rag.config import LoraSpec
    from rag.training import TrainConfig

    trains_query = run.mode == "rag" and run.retriever == "dense"
    return TrainConfig(
        rag=rag, steps=run.steps, batch_size=run.batch_size, grad_accum=run.grad_accum, lr=run.lr,
        warmup_steps=run.warmup, schedule="linear", bf16=True, seed=run.seed, labels=labels(run.task),
        closed_book=run.mode == "closed-book",
        generator_lora=LoraSpec(rank=run.generator_rank, alpha=2.0 * run.generator_rank),
        query_lora=LoraSpec(rank=run.query_rank, alpha=2.0 * run.query_rank) if trains_query else None,
        save_every=10,
    )  # fmt: skip


def start_config(name: str, run: Run) -> Any:
    """The RagConfig a run starts from, fixed at its first start (starts/NAME.json), so that a resumed run keeps
    the base it began with even if the reader lands meanwhile."""
    from rag.config import RagConfig, from_dict, to_dict

    path = OUT / "starts" / f"{name}.json"
    if path.is_file():
        return from_dict(RagConfig, json.loads(path.read_text(encoding="utf-8")))
    reader = reader_or_none(run)
    config = rag_config(run, knowledge_base(run.task), reader)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_dict(config), indent=2), encoding="utf-8")
    return config


def train(name: str, stop_after: int | None = None) -> None:
    import torch

    from rag.model import RagModel
    from rag.train_checkpoint import is_training_checkpoint
    from rag.training import train as run_training

    torch.set_num_threads(1)
    run = RUNS[name]
    out = OUT / "runs" / name
    # a run killed before its first checkpoint left only its log: it starts over (only the run's own files go)
    resume = is_training_checkpoint(out / "checkpoint")
    config = train_config(run, start_config(name, run))
    if resume and json.loads((out / "checkpoint" / "config.json").read_text(encoding="utf-8")).get("step", 0) >= run.steps:
        log(f"{name}: already trained ({run.steps} steps)")
        return
    model = RagModel.from_config(config.rag)
    examples = task_split(run.task, "train")
    log(f"{name}: training on {len(examples)} examples ({run.steps} steps of {run.batch_size * run.grad_accum})")
    started = time.perf_counter()
    with Clock(f"train:{name}"):
        result = run_training(model, examples, config, (), out, resume=resume, overwrite=not resume, progress=False,
                              stop_after=stop_after,
                              on_step=lambda step, r: print(json.dumps({"run": name, "step": step, **r}), flush=True))  # fmt: skip
    log(f"{name}: {result.steps} steps, {time.perf_counter() - started:.0f} s this call")


# ------------------------------------------------------------------------------------ evaluation


def eval_configs(run: Run) -> dict[str, Any]:
    """What each trained run is scored as: name -> EvalConfig."""
    from rag.config import DecodingConfig, EvalConfig

    if run.task == "jeopardy":
        decoding = DecodingConfig(num_beams=1, max_new_tokens=JEOPARDY_MAX_NEW_TOKENS, decoding="thorough")
        common = {"decoding": decoding, "metric": "question-generation", "recall_ks": (run.k,), "batch_size": 8,
                  "progress": False}  # fmt: skip
        if run.mode == "closed-book":
            return {"closed-book": EvalConfig(mode="closed-book", **common)}
        return {f"rag-{run.kind}": EvalConfig(kind=run.kind, k=run.k, **common)}
    common = {"metric": "classification", "labels": labels(run.task), "recall_ks": (1, 3, 5, 10), "batch_size": 8,
              "progress": False}  # fmt: skip
    if run.mode == "closed-book":
        return {"closed-book": EvalConfig(mode="closed-book", **common)}
    # one-token labels: the trained model is scored as RAG-Token and as RAG-Sequence (eq. 1 and 2 agree)
    return {f"rag-{kind}": EvalConfig(kind=kind, k=run.k, **common) for kind in ("token", "sequence")}


def evaluate_run(name: str) -> None:
    import torch

    from rag.evaluation import evaluate_many
    from rag.model import RagModel

    torch.set_num_threads(1)
    run = RUNS[name]
    checkpoint = OUT / "runs" / name / "checkpoint"
    if not checkpoint.is_dir():
        raise SystemExit(f"{name}: no checkpoint yet (python recipes/tasks.py train --run {name})")
    model = RagModel.from_checkpoint(checkpoint)
    model.eval()
    examples = task_split(run.task, "test")
    runs = [(config, OUT / "eval" / name / label) for label, config in eval_configs(run).items()]
    log(f"{name}: evaluating {len(runs)} configuration(s) on {len(examples)} test examples")
    with Clock(f"eval:{name}"):
        results = evaluate_many(examples, runs, retriever=model.retriever, generator=model.generator,
                                task={"task": run.task, "part": "test"})  # fmt: skip
    for result in results:
        log(f"{name}/{result.out_dir.name}: {result.metrics} ({result.timing.total_s:.0f} s)")


def untrained_retrieval(task: str) -> dict[str, Any]:
    """Gold-evidence recall of the untrained retrievers (default q(x), BM25) on the test claims."""
    from rag.config import RetrieverConfig
    from rag.retriever import open_retriever

    path = OUT / "eval" / f"retrieval-{task}.json"
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    kb, examples = knowledge_base(task), task_split(task, "test")
    out: dict[str, Any] = {}
    for kind in ("dense", "bm25"):
        retriever = open_retriever(kb, RetrieverConfig(kind=kind))
        ranked = []
        for start in range(0, len(examples), 32):
            batch = examples[start : start + 32]
            got = retriever.retrieve([e.input for e in batch], 10)
            ranked += [{"ids": ids, "titles": titles} for ids, titles in zip(got.ids, got.titles, strict=True)]
        out[kind] = evidence_scores(task, examples, ranked)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2), encoding="utf-8")
    return out


# ------------------------------------------------------------------------------------ statistics


def mean_se(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var / n)


def bootstrap_se(statistic: Any, n: int, rounds: int = 200, seed: int = 0) -> float:
    rng = random.Random(seed)
    draws = [statistic([rng.randrange(n) for _ in range(n)]) for _ in range(rounds)]
    return mean_se(draws)[1] * math.sqrt(rounds)  # the bootstrap distribution's standard deviation


def document_of(task: str, passage_id: str, title: str) -> str:
    """The gold-evidence unit a retrieved passage belongs to: SciFact's abstract id, Climate-FEVER's article."""
    return passage_id.rsplit("-", 1)[0] if task == "scifact" else title


def evidence_scores(task: str, examples: list[Any], ranked: list[dict[str, Any]]) -> dict[str, Any]:
    """recall@k of a gold abstract/article among the top k passages, and KILT R-precision, over the claims
    that have gold evidence (SUPPORT / CONTRADICT)."""
    from rag import metrics as MT

    hits, rprec = [], []
    for example, got in zip(examples, ranked, strict=True):
        if not example.provenance:
            continue
        gold = {p.passage_id if task == "scifact" else p.title for group in example.provenance for p in group}
        docs = [document_of(task, i, t) for i, t in zip(got["ids"], got["titles"], strict=True)]
        hits.append([d in gold for d in docs])
        rprec.append(MT.r_precision([{d} for d in gold] if task == "scifact" else [gold], docs))
    recall = {str(k): sum(any(h[:k]) for h in hits) / len(hits) for k in (1, 3, 5, 10) if all(len(h) >= k for h in hits)}
    return {"n": len(hits), "recall": recall, "r_precision": sum(rprec) / len(rprec)}


def read_records(name: str, label: str) -> list[dict[str, Any]]:
    from rag.eval_store import read_predictions

    return read_predictions(OUT / "eval" / name / label / "predictions.jsonl")


def classification_cells(task: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """3-way accuracy, and 2-way: the claims labelled with the first two classes, the prediction the
    better of those two classes' scores (the 3-way model restricted, not a second model)."""
    label_set = labels(task)
    three = [float(r["prediction"] == r["label"]) for r in records]
    two_labels = label_set.labels[:2]
    two = [float(two_labels[int(r["class_probs"][1] > r["class_probs"][0])] == r["label"])
           for r in records if r["label"] in two_labels]  # fmt: skip
    predicted = {lab: sum(r["prediction"] == lab for r in records) / len(records) for lab in label_set.labels}
    return {"three": mean_se(three), "two": mean_se(two), "n3": len(three), "n2": len(two), "predicted": predicted}


def majority_cells(task: str, examples: list[Any], train: list[Any]) -> dict[str, Any]:
    """The majority class of the training claims, predicted for every test claim."""
    label_set = labels(task)
    majority = max(label_set.labels, key=lambda lab: sum(e.label == lab for e in train))
    two_labels = label_set.labels[:2]
    two_majority = max(two_labels, key=lambda lab: sum(e.label == lab for e in train))
    three = [float(e.label == majority) for e in examples]
    two = [float(e.label == two_majority) for e in examples if e.label in two_labels]
    return {"three": mean_se(three), "two": mean_se(two), "n3": len(three), "n2": len(two), "class": majority}


def passage_texts(task: str, records: list[dict[str, Any]], k: int) -> list[list[str]]:
    """Title and text of each record's top k retrieved passages (from the knowledge base's store)."""
    from rag.knowledge import open_knowledge_base

    store = open_knowledge_base(knowledge_base(task)).passages
    out = []
    for record in records:
        rows = [store.row_of(p["id"]) for p in record["retrieved"][:k]]
        out.append([f"{p.title}. {p.text}" for p in store.get(rows)])
    return out


def jeopardy_cells(records: list[dict[str, Any]], passages: list[list[str]]) -> dict[str, Any]:
    from rag import metrics as MT

    predictions = [r["prediction"] for r in records]
    references = [r["answers"] for r in records]
    q = [MT.qbleu1(p, refs[0]) for p, refs in zip(predictions, references, strict=True)]
    bleu = MT.corpus_bleu1(predictions, references)
    se = bootstrap_se(lambda idx: MT.corpus_bleu1([predictions[i] for i in idx], [references[i] for i in idx]), len(records))
    shares = [MT.grounded_share(p, ps) for p, ps in zip(predictions, passages, strict=True)]
    grounded = [s for s in shares if s is not None]
    return {"qbleu1": mean_se(q), "bleu1": (bleu, se), "grounded": mean_se(grounded), "n": len(records),
            "grounded_n": len(grounded), "words": mean_se([len(p.split()) for p in predictions])}  # fmt: skip


# ---------------------------------------------------------------------------------------- figure


def heatmap(examples: list[Any], n: int = 3) -> list[dict[str, Any]]:
    """The trained RAG-Token Jeopardy model on a few test inputs, drawn by rag.heatmap (rag ask --plot's
    drawing); the first figure is the one results/tasks.md quotes (committed), the others stay in bench/out."""
    import torch

    from rag.answering import Asker
    from rag.config import DecodingConfig
    from rag.heatmap import plot_token_posteriors
    from rag.model import RagModel

    torch.set_num_threads(1)
    model = RagModel.from_checkpoint(OUT / "runs" / "jeopardy-token" / "checkpoint")
    model.eval()
    asker = Asker(model, DecodingConfig(num_beams=1, max_new_tokens=JEOPARDY_MAX_NEW_TOKENS))
    shown = []
    for i, example in enumerate(examples[:n]):
        answer = asker.ask(example.input)
        path = FIGURE if i == 0 else OUT / "figures" / f"jeopardy-heatmap-{i + 1}.png"
        plot_token_posteriors(answer, path)
        shown.append({"input": example.input, "clue": example.target, "generated": answer.answer, "png": str(path),
                      "passages": [p.title for p in answer.passages], "prior": [p.prior for p in answer.passages],
                      "tokens": [{"token": t.token, "posterior": t.posterior} for t in answer.tokens]})  # fmt: skip
    return shown


# ---------------------------------------------------------------------------------------- report


def pct(cell: tuple[float, float]) -> str:
    return f"{100 * cell[0]:.1f} ± {100 * cell[1]:.1f}"


def report() -> str:
    from rag.tasks import CLASSIFICATION_LABELS

    lines = [
        "# The paper's other task families: Jeopardy question generation and fact verification",
        "",
        "Made by `python recipes/tasks.py all` (each stage resumable; `report` alone rewrites this file from the",
        "runs in bench/out/tasks). Figures are percentages ± one standard error over the test examples",
        "(accuracy, Q-BLEU-1, grounded share: of the mean; corpus BLEU-1: 200 bootstrap resamples). Test",
        "splits are reserved: SciFact's validation claims, Climate-FEVER's and Jeopardy's i % 5 == 4; nothing",
        "was tuned on them (every setting is recipes/reader.py's, fixed before any test figure was seen), and",
        "each is reported here once.",
        "",
    ]
    lines += setup_section()
    lines += jeopardy_section()
    for task in CLASSIFICATION:
        lines += classification_section(task, CLASSIFICATION_LABELS[task])
    lines += msmarco_section()
    lines += hours_section()
    return "\n".join(lines) + "\n"


def setup_section() -> list[str]:
    starts = {}
    for name in RUNS:
        path = OUT / "starts" / f"{name}.json"
        if path.is_file():
            deltas = json.loads(path.read_text(encoding="utf-8"))["generator"]["deltas"]
            starts[name] = "the shipped reader (rag/weights/reader)" if deltas else "SmolLM2-135M-Instruct"
    rows = ["| run | task | trained | retriever | k | steps x examples | starts from |", "|---|---|---|---|---|---|---|"]
    for name, run in RUNS.items():
        trained = ("generator" if run.mode == "closed-book" or run.retriever == "bm25" else "q(x) + generator")
        retriever = "none (closed book)" if run.mode == "closed-book" else ("BM25" if run.retriever == "bm25" else "dense, q(x) trained")
        loss = f"RAG-{run.kind.capitalize()}" if run.task == "jeopardy" and run.mode == "rag" else ("one-token label" if run.task != "jeopardy" else "generator NLL")
        rows.append(f"| {name} | {run.task} ({loss}) | {trained} | {retriever} | {run.k if run.mode == 'rag' else '-'} | "
                    f"{run.steps} x {run.batch_size * run.grad_accum} | {starts.get(name, 'not run')} |")  # fmt: skip
    return [
        "## Setups",
        "",
        "Every run: LoRA deltas (rag.lora: generator rank 16, q(x) rank 8 where q(x) learns), AdamW at 3e-4 with",
        "warm-up over the first tenth of the steps and linear decay, bfloat16 weights and autocast, eager",
        "attention, micro-batch 2 x 4 accumulated, one thread; d(z) and the index frozen; the \"plain\" prompt",
        "(passage, then `Question: <input>` / `Answer:`). Evaluation: greedy decoding (RAG-Sequence: thorough),",
        "k = 3. The step counts are what one CPU core could afford in a 3-hour session (about 18 s per RAG step",
        "of 8 examples): they were set before any run was evaluated and are not tuned.",
        "",
        *rows,
        "",
        "- **Jeopardy** (`../shared/data/jeopardy`, 19,999 clues): input the answer entity, target the clue.",
        "  Clues that need a picture or sound (a media link, \"seen here\") are left out. The knowledge base is",
        "  the packaged Wikipedia summaries (12,324 passages); like the paper's Wikipedia for SearchQA it should",
        "  hold the answer entity, so train and test clues are those whose answer has an article there",
        "  (a quarter of the clues). Training: a seeded sample of the development four fifths; test: a seeded",
        f"  sample of {JEOPARDY_TEST} clues of the reserved fifth.",
        "- **SciFact** (`../shared/data/scifact`): 5,183 abstracts split into 100-word passages; training on the",
        "  809 training claims; test: the 300 validation claims (the test claims are unlabelled). Labels",
        "  SUPPORT / CONTRADICT / NOT ENOUGH INFO -> the one-token targets ` true` / ` false` / ` unknown`.",
        "- **Climate-FEVER** (`../shared/data/climate_fever`): each article's evidence sentences, in article",
        "  order, form one document (1,344 articles, 100-word passages); claims SUPPORTS / REFUTES /",
        "  NOT_ENOUGH_INFO (DISPUTED claims are left out: no 3-way label); train on the development four fifths,",
        "  test on the reserved fifth.",
        "- 2-way accuracy: the claims labelled support / refute, predicted as the better of those two classes'",
        "  scores of the same 3-way model (not a separately trained 2-way model).",
        "",
    ]


def jeopardy_section() -> list[str]:
    names = {"jeopardy-token": ("RAG-Token", "rag-token"), "jeopardy-sequence": ("RAG-Sequence", "rag-sequence"),
             "jeopardy-closed-book": ("closed book (the generator alone, fine-tuned: the paper's BART row)", "closed-book")}  # fmt: skip
    done = {n: v for n, v in names.items() if (OUT / "eval" / n / v[1] / "metrics.json").is_file()}
    out = ["## Jeopardy question generation (reserved fifth)", ""]
    if "jeopardy-token" not in done:
        return [*out, "Not run yet.", ""]
    token_records = read_records("jeopardy-token", "rag-token")
    evidence = passage_texts("jeopardy", token_records, RUNS["jeopardy-token"].k)
    by_id = {r["id"]: ev for r, ev in zip(token_records, evidence, strict=True)}
    cells = {}
    for name, (_, label) in done.items():
        records = read_records(name, label)
        own = passage_texts("jeopardy", records, RUNS[name].k) if RUNS[name].mode == "rag" else [by_id[r["id"]] for r in records]
        cells[name] = jeopardy_cells(records, own)
    out += ["| model | Q-BLEU-1 | BLEU-1 | grounded share | words | n |", "|---|---|---|---|---|---|"]
    for name, cell in cells.items():
        out.append(f"| {names[name][0]} | {pct(cell['qbleu1'])} | {pct(cell['bleu1'])} | {pct(cell['grounded'])} | "
                   f"{cell['words'][0]:.1f} | {cell['n']} |")  # fmt: skip
    out.append("")
    out += [
        "Grounded share (rag.metrics.grounded_share): the share of a generated clue's distinct content words",
        "(no function words) that occur in the k = 3 passages retrieved for its input; the closed-book clues",
        "are checked against the passages RAG-Token retrieved for the same input. The paper judges factuality",
        "by hand; this is a proxy for it.",
        "",
    ]
    closed = cells.get("jeopardy-closed-book")
    if closed:
        out.append("| target | measured | met |")
        out.append("|---|---|---|")
        for name in ("jeopardy-token", "jeopardy-sequence"):
            if name in cells:
                gain = 100 * (cells[name]["qbleu1"][0] - closed["qbleu1"][0])
                ratio = cells[name]["grounded"][0] / closed["grounded"][0] if closed["grounded"][0] else float("inf")
                out.append(f"| {names[name][0]} Q-BLEU-1 >= closed book + 2 | {gain:+.1f} points | {'yes' if gain >= 2 else 'no'} |")
                out.append(f"| {names[name][0]} grounded share >= 1.5 x closed book | {ratio:.2f} x | {'yes' if ratio >= 1.5 else 'no'} |")
        out.append("")
    out += examples_section(done)
    out += figure_section()
    return out


def examples_section(done: dict[str, Any]) -> list[str]:
    if len(done) < 3:
        return []
    by_run = {name: {r["id"]: r for r in read_records(name, label)} for name, (_, label) in done.items()}
    ids = list(by_run["jeopardy-token"])[:4]
    out = ["Generated clues for the first four test inputs (the clue data has no stated licence: only these few",
           "are quoted):", "", "| answer entity | reference clue | RAG-Token | RAG-Sequence | closed book |", "|---|---|---|---|---|"]  # fmt: skip
    for i in ids:
        row = [by_run[n][i]["prediction"].replace("|", "/") for n in ("jeopardy-token", "jeopardy-sequence", "jeopardy-closed-book")]
        ref = by_run["jeopardy-token"][i]["answers"][0].replace("|", "/")
        out.append(f"| {by_run['jeopardy-token'][i]['input']} | {ref} | {' | '.join(row)} |")
    return [*out, ""]


def figure_section() -> list[str]:
    path = OUT / "figures" / "heatmap.json"
    if not path.is_file():
        return []
    first = json.loads(path.read_text(encoding="utf-8"))[0]
    rel = FIGURE.relative_to(RESULTS.parent)
    rows = ["| token | " + " | ".join(f"{j + 1}. {t}" for j, t in enumerate(first["passages"])) + " |",
            "|---|" + "---|" * len(first["passages"])]  # fmt: skip
    for token in first["tokens"]:
        shown = token["token"].replace("\n", "\\n").replace("|", "/")
        rows.append(f"| `{shown}` | " + " | ".join(f"{p:.2f}" for p in token["posterior"]) + " |")
    return [
        "### The paper's Figure 2 on this model",
        "",
        "RAG-Token's document posterior p(z_i | x, y_<=i) for each generated token of one test input (x =",
        f"\"{first['input']}\"), drawn by `rag.heatmap` (what `rag ask --plot` draws) from the trained Jeopardy",
        f"RAG-Token model; generated: \"{first['generated']}\". Priors p(z|x): "
        + ", ".join(f"{p:.2f}" for p in first["prior"]) + ".",
        "",
        f"![p(z_i|x,y_<=i) heatmap]({rel})",
        "",
        *rows,
        "",
        "Reproduce with the trained checkpoint: `rag ask --checkpoint bench/out/tasks/runs/jeopardy-token/checkpoint "
        f"--max-new-tokens {JEOPARDY_MAX_NEW_TOKENS} --plot fig2.png \"{first['input']}\"`.",
        "",
    ]


def classification_section(task: str, label_set: Any) -> list[str]:
    title = {"scifact": "SciFact (validation claims, reserved)", "climate-fever": "Climate-FEVER (reserved fifth)"}[task]
    out = [f"## {title}", ""]
    rows = {f"{task}-rag": [("RAG-Token", "rag-token"), ("RAG-Sequence", "rag-sequence")],
            f"{task}-bm25": [("RAG-Token, BM25 retrieval", "rag-token"), ("RAG-Sequence, BM25 retrieval", "rag-sequence")],
            f"{task}-closed-book": [("closed book (the claim alone)", "closed-book")]}  # fmt: skip
    cells, evidence = {}, {}
    for name, shown in rows.items():
        for title_, label in shown:
            if (OUT / "eval" / name / label / "metrics.json").is_file():
                records = read_records(name, label)
                cells[title_] = classification_cells(task, records)
                if label == "rag-token":
                    ranked = [{"ids": [p["id"] for p in r["retrieved"]], "titles": [p["title"] for p in r["retrieved"]]} for r in records]
                    evidence[title_] = evidence_scores(task, task_split(task, "test"), ranked)
    if not cells:
        return [*out, "Not run yet.", ""]
    test, train = task_split(task, "test"), task_split(task, "train")
    majority = majority_cells(task, test, train)
    out += [f"| model | 3-way accuracy | 2-way accuracy | predicted {' / '.join(label_set.labels)} |", "|---|---|---|---|"]
    for name, cell in cells.items():
        shares = " / ".join(f"{100 * cell['predicted'][lab]:.0f}%" for lab in label_set.labels)
        out.append(f"| {name} | {pct(cell['three'])} | {pct(cell['two'])} | {shares} |")
    out.append(f"| majority class of the training claims ({majority['class']}) | {pct(majority['three'])} | "
               f"{pct(majority['two'])} | |")  # fmt: skip
    out += ["", f"n = {majority['n3']} claims (3-way), {majority['n2']} of them labelled {' / '.join(label_set.labels[:2])} (2-way).", ""]
    out += equality_lines(task)
    untrained = untrained_retrieval(task)
    unit = "abstract" if task == "scifact" else "article"
    out += [f"Retrieval of the gold evidence ({unit}s of the SUPPORT/REFUTE evidence; claims that have some):", "",
            "| retriever | recall@1 | recall@3 | recall@5 | recall@10 | R-precision | n |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    shown = {"dense, untrained q(x)": untrained["dense"], "BM25": untrained["bm25"]}
    shown.update({f"dense, q(x) trained ({n})": v for n, v in evidence.items() if "BM25" not in n})
    for name, scores in shown.items():
        recall = scores["recall"]
        out.append(f"| {name} | " + " | ".join(f"{100 * recall[str(k)]:.1f}" for k in (1, 3, 5, 10)) +
                   f" | {100 * scores['r_precision']:.1f} | {scores['n']} |")  # fmt: skip
    out.append("")
    out += classification_targets(task, cells, majority)
    return out


def equality_lines(task: str) -> list[str]:
    """The paper's sec 3.4 claim on the real model: RAG-Sequence and RAG-Token give the same class scores."""
    name = f"{task}-rag"
    if not all((OUT / "eval" / name / lab / "metrics.json").is_file() for lab in ("rag-token", "rag-sequence")):
        return []
    token = {r["id"]: r["class_logprobs"] for r in read_records(name, "rag-token")}
    seq = {r["id"]: r["class_logprobs"] for r in read_records(name, "rag-sequence")}
    diff = max(abs(a - b) for i in token for a, b in zip(token[i], seq[i], strict=True))
    same = sum(max(range(len(token[i])), key=token[i].__getitem__) == max(range(len(seq[i])), key=seq[i].__getitem__) for i in token)
    return [f"RAG-Sequence vs RAG-Token class scores on the real model: largest |difference| of log p(class | x) "
            f"over {len(token)} claims x 3 classes = {diff:.2e} (target: 1e-5; {'met' if diff <= 1e-5 else 'missed'}); "
            f"the same prediction for {same} of {len(token)}.", ""]  # fmt: skip


def classification_targets(task: str, cells: dict[str, Any], majority: dict[str, Any]) -> list[str]:
    rag, closed = cells.get("RAG-Token"), cells.get("closed book (the claim alone)")
    if rag is None:
        return []
    rows = ["| target | measured | met |", "|---|---|---|"]
    if task == "scifact":
        rows.append(f"| 2-way accuracy >= 75% | {pct(rag['two'])} | {'yes' if rag['two'][0] >= 0.75 else 'no'} |")
        rows.append(f"| 3-way accuracy >= 55% | {pct(rag['three'])} | {'yes' if rag['three'][0] >= 0.55 else 'no'} |")
    else:
        goal = majority["three"][0] + 0.10
        rows.append(f"| 3-way accuracy >= majority + 10 points ({100 * goal:.1f}) | {pct(rag['three'])} | "
                    f"{'yes' if rag['three'][0] >= goal else 'no'} |")  # fmt: skip
    if closed is not None:
        gap = 100 * (rag["three"][0] - closed["three"][0])
        rows.append(f"| RAG > closed book (3-way) | {gap:+.1f} points | {'yes' if gap > 0 else 'no'} |")
    return [*rows, ""]


def msmarco_section() -> list[str]:
    return [
        "## Abstractive QA (MS MARCO)",
        "",
        "MS MARCO is not available offline here, so it is not measured. Its reader (`rag.tasks.read_msmarco`:",
        "JSON Lines or the official column layout) and its metrics (BLEU-1, ROUGE-L) are tested on hand-made data",
        "(tests/test_tasks.py, tests/test_metrics.py). With the data (MS MARCO v2.1 `dev_v2.1.json`, and a",
        "knowledge base of its passages or of Wikipedia):",
        "",
        "```bash",
        "rag eval --task msmarco --data dev_v2.1.json --index KB --kind token sequence -k 5 --max-new-tokens 40 --out runs/msmarco",
        "rag eval --task msmarco --data dev_v2.1.json --mode closed-book --max-new-tokens 40 --out runs/msmarco",
        "rag train --task msmarco --train train_v2.1.json --index KB --kind token -k 5 --out runs/msmarco-train",
        "```",
        "",
        "`rag eval` reports BLEU-1 and ROUGE-L for the `msmarco` task (runs/msmarco/report.md).",
        "",
    ]


def hours_section() -> list[str]:
    path = OUT / "timing.json"
    known = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    rows = ["| stage | CPU (s) | wall (s) |", "|---|---|---|"]
    cpu_total, unmeasured = 0.0, []
    for name, entry in known.items():
        cpu = entry.get("cpu")
        rows.append(f"| {name} | {'n/a' if cpu is None else f'{cpu:.0f}'} | {entry['wall']:.0f} |")
        if cpu is None:
            unmeasured.append(name)
            cpu = entry["wall"]  # an upper bound: the wall time of a one-thread process
        cpu_total += cpu
    note = (f" ({', '.join(unmeasured)}: CPU time not recorded, counted at its wall time, an upper bound)"
            if unmeasured else "")  # fmt: skip
    return [
        "## CPU hours",
        "",
        "Every stage ran on one thread (torch.set_num_threads(1)) on a 2-core machine shared with other jobs",
        "(the knowledge-base builds with the reader's training; training and evaluation with index benchmarks",
        "and tests on the other core): CPU is the process's own CPU time (what the stage costs), wall what it",
        "took here under that contention. Training and evaluation sum over resumed calls.",
        "",
        *rows,
        "",
        f"Total: {cpu_total / 3600:.2f} CPU hours{note}.",
    ]


def write_report() -> None:
    from rag.io import atomic_write_text

    jeopardy_test = task_split("jeopardy", "test") if (OUT / "runs" / "jeopardy-token" / "checkpoint").is_dir() else []
    figures = OUT / "figures" / "heatmap.json"
    if jeopardy_test and not figures.is_file():
        shown = heatmap(jeopardy_test)
        figures.parent.mkdir(parents=True, exist_ok=True)
        figures.write_text(json.dumps(shown, indent=2, ensure_ascii=False), encoding="utf-8")
    atomic_write_text(RESULTS, report())
    log(f"wrote {RESULTS}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["all", "data", "train", "eval", "report"])
    parser.add_argument("--run", choices=sorted(RUNS), help="train / eval: one run (default: every run)")
    parser.add_argument("--stop-after", type=int, default=None, help="train: stop after N steps of this call")
    args = parser.parse_args(argv)
    names = [args.run] if args.run else list(RUNS)
    if args.stage in ("all", "data"):
        for task in ("jeopardy", *CLASSIFICATION):
            log(f"{task}: knowledge base {knowledge_base(task)}")
    for name in names if args.stage in ("all", "train", "eval") else ():
        if args.stage in ("all", "train"):
            train(name, args.stop_after)
        if args.stage == "eval" or (args.stage == "all" and args.stop_after is None):
            evaluate_run(name)
    if args.stage in ("all", "report"):
        write_report()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
