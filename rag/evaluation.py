"""evaluate(): run a model over a task's examples, write predictions, metrics and timings.

One function serves RAG and both baselines of the paper (sec 4):
- "rag": retrieve the top passages, decode with RAG-Token or RAG-Sequence over the top k;
- "closed-book": the generator alone, no passage (the paper's BART baseline);
- "retrieval-only": the top passage is the answer (is an answer in it? DPR's has_answer).

Output folder (resumable: a re-run skips the examples already written):
    run.json            what was run (a re-run with different settings into the same folder is refused)
    predictions.jsonl   one JSON object per example, appended and flushed batch by batch: the answer,
                        the retrieved passage ids, p(z|x) and the posteriors p(z|x,y)
    metrics.json        written atomically at the end, over every line of predictions.jsonl
The folder's files are read and checked by rag.eval_store; the Markdown report with plots across
several runs is `rag.eval_report.write_report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch
from tqdm import tqdm

from rag import decoding
from rag import metrics as MT
from rag.config import EvalConfig, MetricKind
from rag.eval_store import check_run, drop_torn_line, is_eval_run, read_predictions, run_identity
from rag.io import atomic_write_text, check_output_dir, output_lock, remove_stale_temps_in
from rag.tasks import CLASSIFICATION_LABELS, Example


@dataclass(frozen=True)
class Timing:
    questions: int  # examples processed by this call (a resumed run counts only the new ones)
    retrieval_s: float  # query encoding + index search
    generation_s: float  # generator input building, decoding, scoring
    total_s: float

    @property
    def questions_per_s(self) -> float:
        return self.questions / self.total_s if self.total_s > 0 else 0.0


@dataclass(frozen=True)
class EvalResult:
    config: EvalConfig
    n: int  # examples in the predictions file
    metrics: dict[str, float | None]  # the task metric(s) of the predictions
    recall: dict[int, float]  # k -> recall@k (empty for closed-book)
    timing: Timing
    out_dir: Path


def metric_for_task(fmt: str) -> MetricKind:
    """The paper's metric for a rag.tasks reader name."""
    if fmt in CLASSIFICATION_LABELS:
        return "classification"
    return {"msmarco": "generation", "jeopardy": "question-generation"}.get(fmt, "qa")


# ---------------------------------------------------------------------------------------- records


def _retrieval_record(ids: list[str], titles: list[str], scores: list[float], k: int) -> dict[str, Any]:
    prior = torch.log_softmax(torch.tensor(scores[:k]), dim=0).exp().tolist() if k else []
    return {
        "retrieved": [
            {"id": i, "title": t, "score": round(s, 6)} for i, t, s in zip(ids, titles, scores, strict=True)
        ],
        "doc_prior": [round(p, 6) for p in prior],  # p(z|x) over the top k
    }


def _hits(example: Example, texts: list[str]) -> list[bool]:
    """Answer in each passage's text (DPR's top-k accuracy: the title does not count)."""
    return MT.passage_hits(example.answers, texts, regex_answers=example.answer_is_regex)


def _scores(example: Example, prediction: str, metric: MetricKind) -> dict[str, float | None]:
    if metric == "classification":
        return {"accuracy": float(prediction == example.label)}
    if metric != "qa":
        return {}  # BLEU/ROUGE are corpus- or sentence-level: computed at the end
    if example.answer_is_regex:
        return {"exact_match": MT.regex_match(prediction, example.answers)}
    return {
        "exact_match": MT.exact_match(prediction, example.answers),
        "f1": MT.token_f1(prediction, example.answers),
        # an answer inside a longer reply (DPR's has_answer on the prediction): chat models answer in sentences
        "contains_answer": float(MT.has_answer(example.answers, prediction)),
    }


def _base_record(example: Example, config: EvalConfig) -> dict[str, Any]:
    return {
        "id": example.id,
        "position": example.position,
        "input": example.input,
        "answers": list(example.answers),
        "label": example.label,
        "mode": config.mode,
        "kind": config.kind if config.mode == "rag" else None,
        "k": config.k if config.mode == "rag" else 0,
    }


# ------------------------------------------------------------------------------------- generation


def _first_logprobs(gen: Any, prefix: Any) -> torch.Tensor:
    """log p(y_1 | x, z) for every prefix row (R, V), through the generator's decoding interface."""
    rows = torch.arange(len(prefix), device=gen.device)
    logprobs, _ = gen.step(gen.start(prefix, rows), None)
    return logprobs  # (R, V)


def _classify(gen: Any, questions: list[str], passages: list[list[tuple[str, str]]] | None,
              doc_scores: torch.Tensor, config: EvalConfig) -> list[dict[str, Any]]:
    """The paper's FEVER setting: each label is a one-token target; RAG-Sequence and RAG-Token agree.
    passages=None (closed book): one row per claim, doc_scores (B, 1) zeros."""
    from rag.marginalize import class_logprobs

    # the label's token as training teaches it (gen.target_ids: " true" after a causal "Answer:")
    ids = config.labels.token_ids(gen.target_ids)
    label_ids = torch.tensor([ids[t] for t in config.labels.targets], device=gen.device)
    prefix = gen.encode_prefix(gen.format_inputs(questions, passages))
    first = _first_logprobs(gen, prefix).view(len(questions), doc_scores.shape[1], -1)  # (B, K, V)
    prior = torch.log_softmax(doc_scores.float(), dim=1)  # (B, K)
    logprobs = class_logprobs(first, prior, label_ids, config.kind)  # (B, C)
    out = []
    for row in logprobs.tolist():
        best = max(range(len(row)), key=row.__getitem__)
        # log-probabilities too: the RAG-Sequence = RAG-Token check compares them beyond 6 decimals
        out.append({"prediction": config.labels.labels[best], "class_probs": [round(math.exp(p), 6) for p in row],
                    "class_logprobs": row})  # fmt: skip
    return out


def _select_prefix(prefix: Any, batch: int, kmax: int, k: int) -> Any:
    """The rows of the top k passages of each question from a prefix built for the top kmax (row
    b*kmax + j -> b*k + j): one prefill serves every k, kind and decoding (the passages are the same)."""
    if k == kmax:
        return prefix
    rows = (torch.arange(batch)[:, None] * kmax + torch.arange(k)[None, :]).reshape(-1)  # (B*k,)
    return prefix.select(rows.to(prefix.attention_mask.device))


def _generate(gen: Any, prefix: Any, doc_scores: torch.Tensor, config: EvalConfig,
              with_passages: bool) -> list[dict[str, Any]]:
    """Decode one batch from its prefix (B*K rows); per question the best answer, log p(y|x) and
    p(z|x,y) over the K passages."""
    kind = config.kind if with_passages else "token"  # K = 1, no passage: both kinds are the generator
    prior = torch.log_softmax(doc_scores.float(), dim=1)  # (B, K)
    out = decoding.generate(gen, prefix, prior, kind, config.decoding)
    records = []
    for b in range(doc_scores.shape[0]):
        record: dict[str, Any] = {
            "prediction": gen.decode(out.sequences[b][0]),
            "logprob": round(float(out.scores[b, 0]), 5),
        }
        if with_passages:
            record["posterior"] = [round(p, 6) for p in out.doc_logposterior[b, 0].exp().tolist()]
        if with_passages and out.token_doc_logposterior is not None:  # RAG-Token: p(z|x,y_<=i), Figure 2
            steps = len(out.sequences[b][0])
            per_token = out.token_doc_logposterior[b, 0, :steps].exp().tolist()  # (T, K)
            record["token_posterior"] = [[round(p, 4) for p in row] for row in per_token]
        records.append(record)
    return records


# ------------------------------------------------------------------------------------ the loop


@dataclass
class _Run:
    """One configuration being evaluated into its own folder (mutable: its clock and done set grow)."""

    config: EvalConfig
    out_dir: Path
    done: set[str]
    sink: IO[str]
    clock: dict[str, float] = field(default_factory=lambda: {"retrieval": 0.0, "generation": 0.0, "n": 0})


def _batches(examples: Sequence[Example], size: int) -> Iterator[list[Example]]:
    for start in range(0, len(examples), size):
        yield list(examples[start : start + size])


def _passages(got: Any, k: int) -> list[list[tuple[str, str]]]:
    return [list(zip(t[:k], x[:k], strict=True)) for t, x in zip(got.titles, got.texts, strict=True)]


@torch.no_grad()  # evaluation never needs a graph; the prefix cache would keep one alive (GBs)
def _run_batch(batch: list[Example], runs: list[_Run], retriever: Any, generator: Any, depth: int) -> None:
    """Retrieve once, prefill once (top kmax passages), then decode each run's configuration."""
    questions = [ex.input for ex in batch]
    got, prefix, kmax = None, None, 0
    if any(r.config.mode != "closed-book" for r in runs):
        started = time.perf_counter()
        got = retriever.retrieve(questions, depth)
        spent = time.perf_counter() - started
        for run in runs:
            run.clock["retrieval"] += spent if run.config.mode != "closed-book" else 0.0
    shared = [r for r in runs if r.config.mode == "rag" and r.config.metric != "classification"]
    if shared:
        kmax = max(r.config.k for r in shared)
        started = time.perf_counter()
        prefix = generator.encode_prefix(generator.format_inputs(questions, _passages(got, kmax)))
        spent = time.perf_counter() - started
        for run in shared:
            run.clock["generation"] += spent
    for run in runs:
        started = time.perf_counter()
        records = _records(batch, run.config, got, generator, prefix, kmax)
        run.clock["generation"] += time.perf_counter() - started
        for record in records:
            if record["id"] not in run.done:
                run.sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                run.done.add(record["id"])
                run.clock["n"] += 1
        run.sink.flush()


def _records(batch: list[Example], config: EvalConfig, got: Any, gen: Any, prefix: Any,
             kmax: int) -> list[dict[str, Any]]:
    records = [_base_record(ex, config) for ex in batch]
    if config.mode == "closed-book" and config.metric == "classification":  # the label tokens' scores alone
        generated = _classify(gen, [ex.input for ex in batch], None, torch.zeros(len(batch), 1), config)
    elif config.mode == "closed-book":
        cb_prefix = gen.encode_prefix(gen.format_inputs([ex.input for ex in batch], None))
        generated = _generate(gen, cb_prefix, torch.zeros(len(batch), 1), config, with_passages=False)
    else:
        scores = got.scores.float()
        for b, (ex, rec) in enumerate(zip(batch, records, strict=True)):
            rec.update(_retrieval_record(got.ids[b], got.titles[b], scores[b].tolist(), config.k))
            rec["hits"] = _hits(ex, got.texts[b])
        if config.mode == "retrieval-only":
            for rec, shown in zip(records, _passages(got, 1), strict=True):
                rec["prediction"] = f"{shown[0][0]}. {shown[0][1]}"  # the top passage is the answer
                rec["correct"] = float(rec["hits"][0])
            return records
        doc_scores = scores[:, : config.k]
        if config.metric == "classification":
            generated = _classify(gen, [ex.input for ex in batch], _passages(got, config.k), doc_scores, config)
        else:
            sub = _select_prefix(prefix, len(batch), kmax, config.k)
            generated = _generate(gen, sub, doc_scores, config, with_passages=True)
    for ex, rec, gen_rec in zip(batch, records, generated, strict=True):
        rec.update(gen_rec)
        rec.update(_scores(ex, rec["prediction"], config.metric))
    return records


def evaluate(
    examples: Sequence[Example],
    out_dir: Path | str,
    *,
    retriever: Any = None,
    generator: Any = None,
    config: EvalConfig | None = None,
    task: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> EvalResult:
    """Predictions for `examples` (skipping those already in out_dir), then metrics over all of them.

    retriever: anything with retrieve(questions, k) -> rag.retriever.Retrieved (not for closed-book):
    dense, BM25 or hybrid (rag.retriever; their scores are the logits of p(z|x));
    generator: a rag.generators.Generator (not for retrieval-only). `task` (e.g. the reader and data
    file) is recorded in run.json so that a resumed run cannot mix two data sets.
    """
    return evaluate_many(examples, [(config or EvalConfig(), Path(out_dir))], retriever=retriever, generator=generator,
                         task=task, overwrite=overwrite)[0]


def evaluate_many(
    examples: Sequence[Example],
    runs: Sequence[tuple[EvalConfig, Path | str]],
    *,
    retriever: Any = None,
    generator: Any = None,
    task: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> list[EvalResult]:
    """Several configurations (each into its own folder) over the same examples, batch by batch:
    retrieval runs once at the deepest depth and the generator's prefix once for the largest k, which
    every RAG configuration (any k, kind, decoding) then decodes from. Each run's timing counts the
    shared retrieval and prefill as its own, i.e. what it would have cost alone.

    A run folder is new or empty, or holds this run (resumed), or (overwrite) another run that is
    started over; never anything else. A second evaluator of the same folder fails at once."""
    _check_components([c for c, _ in runs], retriever, generator)
    depth = max(max((*c.recall_ks, c.k)) for c, _ in runs)
    if retriever is not None:  # a small knowledge base: recall@k only for the k it can answer
        depth = min(depth, len(retriever.index))
    states: list[_Run] = []
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        for config, out_dir in runs:
            out_dir = Path(out_dir)
            check_output_dir(out_dir, what="evaluation run", is_own=is_eval_run, reuse_own=True)
            out_dir.mkdir(parents=True, exist_ok=True)
            # one evaluator per run folder: a second fails at once instead of interleaving lines
            stack.enter_context(output_lock(out_dir / "predictions.jsonl", wait=False, what="evaluation run"))
            remove_stale_temps_in(out_dir)  # what a killed run left (metrics.json, run.json temporaries)
            check_run(out_dir, run_identity(config, task or {}, generator, retriever), overwrite)
            drop_torn_line(out_dir / "predictions.jsonl")
            done = {r["id"] for r in read_predictions(out_dir / "predictions.jsonl")}
            sink = stack.enter_context(open(out_dir / "predictions.jsonl", "a", encoding="utf-8"))
            states.append(_Run(config, out_dir, done, sink))
        todo = [ex for ex in examples if any(ex.id not in s.done for s in states)]
        first = runs[0][0]
        bar = stack.enter_context(tqdm(total=len(examples), initial=len(examples) - len(todo), unit="q",
                                       disable=not first.progress, desc=f"eval ({len(runs)} run(s))"))
        for batch in _batches(todo, first.batch_size):
            _run_batch(batch, states, retriever, generator, depth)
            bar.update(len(batch))
    total = time.perf_counter() - started
    results = []
    for state in states:
        clock = state.clock
        own = clock["retrieval"] + clock["generation"]
        timing = Timing(int(clock["n"]), clock["retrieval"], clock["generation"], own if len(runs) > 1 else total)
        results.append(finish(state.out_dir, state.config, timing))
    return results


def _check_components(configs: Sequence[EvalConfig], retriever: Any, generator: Any) -> None:
    for config in configs:
        if config.mode != "closed-book" and retriever is None:
            raise ValueError(f"mode {config.mode!r} needs a retriever")
        if config.mode != "retrieval-only" and generator is None:
            raise ValueError(f"mode {config.mode!r} needs a generator")
        if config.k < 1:
            raise ValueError(f"k must be >= 1, got {config.k}")
        if retriever is not None and config.mode == "rag" and config.k > len(retriever.index):
            raise ValueError(f"k = {config.k} exceeds the {len(retriever.index)} passages of the knowledge base")


def finish(out_dir: Path, config: EvalConfig, timing: Timing) -> EvalResult:
    """Score the predictions file and write metrics.json atomically."""
    records = read_predictions(out_dir / "predictions.jsonl")
    if not records:
        raise ValueError(f"{out_dir}: no predictions to score")
    scores = score_records(records, config)
    recall: dict[int, float] = {}
    if config.mode != "closed-book":
        ks = [k for k in config.recall_ks if all(len(r["hits"]) >= k for r in records)]
        recall = MT.recall_at_k([r["hits"] for r in records], ks)
    result = EvalResult(config, len(records), scores, recall, timing, out_dir)
    payload = {
        "n": result.n,
        "metrics": scores,
        "recall_at_k": {str(k): v for k, v in recall.items()},
        "timing": {**dataclasses.asdict(timing), "questions_per_s": timing.questions_per_s},
        "config": run_identity(config, {})["config"],
    }
    atomic_write_text(out_dir / "metrics.json", json.dumps(payload, indent=2, sort_keys=True))
    return result


def score_records(records: list[dict[str, Any]], config: EvalConfig) -> dict[str, float | None]:
    """The task metric over prediction records (mean of per-example scores, or corpus-level)."""
    if config.mode == "retrieval-only":
        return {"answer_in_top_passage": _mean([r["correct"] for r in records])}
    if config.metric in ("qa", "classification"):
        names = ("accuracy",) if config.metric == "classification" else ("exact_match", "f1", "contains_answer")
        return {name: _mean([r.get(name) for r in records]) for name in names}
    scores = MT.score_generation(
        [r["prediction"] for r in records],
        [r["answers"] for r in records],
        question_generation=config.metric == "question-generation",
    )
    return {"bleu1": scores.bleu1, "rouge_l": scores.rouge_l, "qbleu1": scores.qbleu1}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return sum(present) / len(present) if present else None
