"""End-to-end RAG fine-tuning (the paper, sec 2.4): train q(x) and the generator from (x, y) pairs alone.

The passage encoder d(z) and the index stay fixed (unless TrainConfig.train_passage_encoder, the
optional extension in rag.passage_training); RagModel.forward recomputes the k retrieved
scores q(x).d(z) in the graph, so the marginal likelihood's gradient reaches q(x) through p(z|x).
One loop, top to bottom: data order from the seed, AdamW, warm-up then linear or cosine decay,
gradient accumulation and clipping, optional bfloat16 autocast, a JSON Lines log, dev evaluation
and atomic checkpoints (rag.train_checkpoint) from which `resume` continues exactly.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rag.config import DecodingConfig, TrainConfig
from rag.counterfactual import SubstitutePool, Substitution
from rag.io import atomic_path
from rag.lora import adapted_modules, attach
from rag.metrics import exact_match, has_answer, regex_match
from rag.model import RagModel
from rag.passage_training import attach_passage_encoder, reindex
from rag.tasks import Example, read_task
from rag.train_checkpoint import load_trainer_state, run_folder, save_checkpoint

__all__ = ["DevScores", "Example", "TrainConfig", "TrainResult", "batch_order", "check_labels", "check_trainable", "doc_entropy",
           "draw_substitutions", "evaluate_dev", "lr_factor", "make_optimizer", "read_examples", "train", "train_step"]  # fmt: skip


@dataclass(frozen=True)
class DevScores:
    exact_match: float
    recall_at_k: float  # an answer string in one of the top k passages (DPR's has_answer)
    recall_at_1: float
    questions: int


@dataclass(frozen=True)
class TrainResult:
    steps: int
    losses: list[float]  # the mean loss of each optimiser step run by this call
    dev: DevScores | None
    checkpoint: Path | None


def read_examples(path: Path | str, fmt: str = "open-qa", **options: Any) -> list[Example]:
    """The examples of a task file that training can learn from: any format `rag eval` reads
    (rag.tasks.read_task; "open-qa" takes JSON Lines `{input, target}` or `{question, answer(s)}`, or a
    DPR `question<TAB>answers` file). Every example needs a target string."""
    examples = read_task(fmt, path, **options)
    if not examples:
        raise ValueError(f"{path}: no examples")
    check_trainable(examples, str(path))
    return examples


def check_labels(examples: Sequence[Example], config: TrainConfig, generator: Any) -> None:
    """Classification training (config.labels): every target is a label's string and one token long under
    `generator` (a clear error before any work), and the settings that have no meaning there are off."""
    labels = config.labels
    if labels is None:
        return
    if config.counterfactual_rate > 0:
        raise ValueError("TrainConfig: counterfactual passages rewrite answers, not class labels; "
                         "set counterfactual_rate = 0 with labels")  # fmt: skip
    for target in labels.targets:
        ids = generator.target_ids(target)
        if len(ids) != 1:
            raise ValueError(f"TrainConfig.labels: target {target!r} is {len(ids)} tokens under the generator "
                             f"({ids}); classification needs one-token labels")  # fmt: skip
    for example in examples:
        if example.target not in labels.targets:
            raise ValueError(f"example {example.id!r} (record {example.position + 1}): field 'target': "
                             f"{example.target!r} is not one of the label targets {list(labels.targets)}")  # fmt: skip


def check_trainable(examples: Sequence[Example], source: str = "training data") -> None:
    """A clear error, before any work, for an example without a target string (regex answers)."""
    for example in examples:
        if not example.targets or not all(isinstance(t, str) and t.strip() for t in example.targets):
            raise ValueError(f"{source}: example {example.id!r} (record {example.position + 1}): field 'target': "
                             "no target string to train on (regex answers cannot be generated)")  # fmt: skip


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of the base learning rate at optimiser step `step` (0-based)."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.schedule == "constant":
        return 1.0
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    if config.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return max(0.0, 1.0 - progress)


def make_optimizer(model: RagModel, config: TrainConfig) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trained parts only (frozen ones get requires_grad False), and its schedule."""
    groups = []
    # With BM25 alone p(z|x) does not depend on q(x) (the paper's BM25 ablation): only the generator learns;
    # closed book, nothing is retrieved.
    query_frozen = config.freeze_query_encoder or model.retriever.query_weight == 0 or config.closed_book
    parts = [
        (model.query_encoder, query_frozen, config.lr),
        (model.generator, config.freeze_generator, config.lr if config.generator_lr is None else config.generator_lr),
    ]
    if model.passage_encoder is not None:
        frozen = not config.train_passage_encoder
        parts.append((model.passage_encoder, frozen, config.lr if config.passage_lr is None else config.passage_lr))
    for module, frozen, lr in parts:
        if frozen:
            module.requires_grad_(False)
        elif not adapted_modules(module):  # a LoRA-adapted module keeps its base weights frozen
            module.requires_grad_(True)
        if not frozen:
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": lr})
    if not groups:
        raise ValueError("TrainConfig: both the query encoder and the generator are frozen (q(x) is with the "
                         "BM25 retriever); nothing to train")
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
    return optimizer, scheduler


def batch_order(n: int, batch_size: int, seed: int, start: int, count: int) -> list[list[int]]:
    """Micro-batches number start .. start+count-1 of an endless stream of seeded epoch permutations.

    A function of (seed, position) alone, so a resumed run draws exactly the batches it would have."""
    per_epoch = max(1, n // batch_size)  # incomplete last batches are dropped
    out = []
    for index in range(start, start + count):
        epoch, slot = divmod(index, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(perm[slot * batch_size : (slot + 1) * batch_size].tolist())
    return out


def doc_entropy(doc_logprior: torch.Tensor) -> float:
    """Mean entropy (nats) of p(z|x) over the batch: (B, K) log-probabilities -> scalar."""
    return float(-(doc_logprior.exp() * doc_logprior).sum(-1).mean())


def draw_substitutions(batch: Sequence[Example], pool: SubstitutePool | None, rate: float, seed: int, step: int,
                       micro: int) -> list[Substitution | None] | None:  # fmt: skip
    """Which examples of micro-batch `micro` of optimiser step `step` get counterfactual passages, and
    their substitutes: a function of (seed, step, the example's position in the step) alone, so a resumed
    run draws the same, however the step is split into micro-batches."""
    if pool is None or rate <= 0:
        return None
    out: list[Substitution | None] = []
    for j, example in enumerate(batch):
        rng = random.Random(f"counterfactual-{seed}-{step}-{micro * len(batch) + j}")
        out.append(pool.draw(example.input, example.answers, rng) if rng.random() < rate else None)
    return out


@dataclass(frozen=True)
class DataParallel:
    """This process's share of data-parallel training (rag.train_distributed): worker `rank` of
    `world` takes examples [rank*B, (rank+1)*B) of each global batch of world*B examples, and runs the
    forward through `module` (a DistributedDataParallel wrapper of the model), whose backward averages
    the gradients over the workers. Only worker 0 writes the run folder."""

    rank: int
    world: int
    module: torch.nn.Module


def train_step(model: RagModel, batches: Sequence[Sequence[Example]], config: TrainConfig,
               optimizer: torch.optim.Optimizer, scheduler: Any, step: int = 0,
               pool: SubstitutePool | None = None, replica: DataParallel | None = None) -> dict[str, float]:  # fmt: skip
    """One optimiser step over `grad_accum` micro-batches; returns the step's log record. `pool`: the
    substitutes of counterfactual passages (config.counterfactual_rate), drawn by draw_substitutions.
    replica: `batches` are this worker's share; the logged loss and entropy are the workers' mean."""
    start = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    forward = model if replica is None else replica.module
    loss_sum, entropy, tokens, rows, rewritten = 0.0, 0.0, 0, set(), 0
    for micro, batch in enumerate(batches):
        substitutions = draw_substitutions(batch, pool, config.counterfactual_rate, config.seed, step, micro)
        rewritten += sum(s is not None for s in substitutions or [])
        inputs, targets = [e.input for e in batch], [e.target for e in batch]
        end = config.labels is None  # one-token class labels are scored without the end token
        with torch.autocast(model.generator.device.type, dtype=torch.bfloat16, enabled=config.bf16):
            if config.closed_book:
                out = model.score_passages(inputs, targets, None, None, config.label_smoothing, end)
            else:
                out = forward(inputs, targets, config.label_smoothing, substitutions, end)
        (out.loss / len(batches)).backward()
        loss_sum += out.loss.item() / len(batches)
        entropy += doc_entropy(out.doc_logprior.float().detach()) / len(batches)
        tokens += int(out.target_mask.sum()) * out.doc_logprior.shape[1]  # the targets as the forward tokenised them
        if out.retrieved is not None:
            rows.update(out.retrieved.rows.reshape(-1).tolist())
    if replica is not None and replica.world > 1:  # the whole batch's figures, as one process logs them
        summed = torch.tensor([loss_sum, entropy, float(tokens)], dtype=torch.float64)
        torch.distributed.all_reduce(summed)
        loss_sum, entropy, tokens = float(summed[0]) / replica.world, float(summed[1]) / replica.world, int(summed[2])
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    seconds = time.perf_counter() - start
    record = {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
              "doc_entropy": entropy, "distinct_passages": len(rows), "seconds": seconds}  # fmt: skip
    if pool is not None:
        record["counterfactual_drawn"] = rewritten
    return record


@torch.no_grad()
def evaluate_dev(model: RagModel, examples: Sequence[Example], config: TrainConfig) -> DevScores:
    """Exact match of greedy decoding, and answer recall@1 / @k of the retrieved passages."""
    model.eval()
    decoding = DecodingConfig(num_beams=1, max_new_tokens=config.eval_max_new_tokens, decoding="fast")
    em, r1, rk = 0.0, 0, 0
    for i in range(0, len(examples), config.eval_batch_size):
        batch = examples[i : i + config.eval_batch_size]
        answer = model.generate([e.input for e in batch], decoding)
        for j, example in enumerate(batch):
            regex = example.answer_is_regex
            em += regex_match(answer.answers[j], example.answers) if regex else exact_match(answer.answers[j], example.answers)
            hits = [has_answer(example.answers, text, regex_answers=regex) for text in answer.retrieved.texts[j]]
            r1 += hits[0]
            rk += any(hits)
    n = len(examples)
    return DevScores(em / n, rk / n, r1 / n, n)


def train(model: RagModel, train_data: Sequence[Example], config: TrainConfig,
          dev_data: Sequence[Example] = (), out_dir: Path | str | None = None, resume: bool = False,
          progress: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None, overwrite: bool = False,
          inputs: Sequence[Path | str] = (), replica: DataParallel | None = None) -> TrainResult:  # fmt: skip
    """Fine-tune `model` on `train_data`; logs to out_dir/log.jsonl, checkpoints to out_dir/checkpoint.

    resume: continue from out_dir/checkpoint (weights, optimiser, schedule, RNG, data position).
    overwrite: start over in a folder that holds a run (only the run's own files are deleted).
    inputs: paths the run reads (data, knowledge base) that out_dir must never replace or be inside.
    stop_after: stop after this many steps of *this call* (what an interruption does; for tests).
    replica: one worker of data-parallel training (DataParallel); workers other than 0 read out_dir's
    checkpoint to resume but write nothing.
    """
    check_trainable(train_data)
    world = 1 if replica is None else replica.world
    if len(train_data) < config.batch_size * world:
        raise ValueError(f"{len(train_data)} training examples < batch_size {config.batch_size} x {world} workers")
    if replica is not None and (config.train_passage_encoder or config.generator_lora or config.query_lora
                                or config.counterfactual_rate or config.closed_book):  # fmt: skip
        raise ValueError("data-parallel training covers q(x) and the generator in full with retrieval; not d(z), "
                         "LoRA, counterfactual passages or closed-book")  # fmt: skip
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after must be >= 1, got {stop_after}")
    if out_dir is None:
        if resume:
            raise ValueError("resume needs out_dir (the run folder holding checkpoint/)")
        return _train(model, train_data, config, dev_data, None, False, progress, stop_after, on_step, replica)
    if replica is not None and replica.rank > 0:  # reads the checkpoint worker 0 wrote; writes nothing
        resume_from = Path(out_dir) / "checkpoint" if resume else None
        return _train(model, train_data, config, dev_data, None, False, False, stop_after, None, replica, resume_from)
    kb = [config.rag.index_dir] if config.rag.index_dir else []
    with run_folder(out_dir, resume, overwrite, [*inputs, *kb]) as out:
        return _train(model, train_data, config, dev_data, out, resume, progress, stop_after, on_step, replica)


def _train(model: RagModel, train_data: Sequence[Example], config: TrainConfig, dev_data: Sequence[Example],
           out: Path | None, resume: bool, progress: bool, stop_after: int | None,
           on_step: Callable[[int, dict[str, float]], None] | None, replica: DataParallel | None = None,
           resume_from: Path | None = None) -> TrainResult:  # fmt: skip
    torch.manual_seed(config.seed)
    if config.train_passage_encoder and model.retriever.kind != "dense":
        raise ValueError(f"training d(z) needs the dense retriever, not {model.retriever.kind!r}")
    if config.train_passage_encoder and model.passage_encoder is None:
        attach_passage_encoder(model, config.rag.index_dir, model.generator.device)
    check_labels(train_data, config, model.generator)
    if dev_data and (config.labels is not None or config.closed_book):
        raise ValueError("dev evaluation during training is RAG decoding's exact match; for classification or "
                         "closed-book training pass no dev data and score the checkpoint with rag eval")  # fmt: skip
    if config.closed_book and (config.counterfactual_rate > 0 or config.train_passage_encoder):
        raise ValueError("TrainConfig.closed_book: nothing is retrieved, so no counterfactual passages and no d(z)")
    attach_lora(model, config)
    optimizer, scheduler = make_optimizer(model, config)
    pool = None
    if config.counterfactual_rate > 0:
        pool = SubstitutePool((e.input, e.target) for e in train_data)
    step = 0
    if resume and out is not None:
        resume_from = out / "checkpoint"
    if resume_from is not None:
        step = load_trainer_state(resume_from, model, optimizer, scheduler)
    log = _open_log(out, step) if out is not None else None
    last = config.steps if stop_after is None else min(config.steps, step + stop_after)
    bar = _bar(progress, config.steps, step)
    losses: list[float] = []
    dev: DevScores | None = None
    try:
        while step < last:
            world, rank = (1, 0) if replica is None else (replica.world, replica.rank)
            ids = batch_order(len(train_data), config.batch_size * world, config.seed, step * config.grad_accum,
                              config.grad_accum)  # fmt: skip
            mine = [b[rank * config.batch_size : (rank + 1) * config.batch_size] for b in ids]  # this worker's share
            record = train_step(model, [[train_data[i] for i in b] for b in mine], config, optimizer, scheduler,
                                step, pool, replica)  # fmt: skip
            step += 1
            losses.append(record["loss"])
            if config.train_passage_encoder and (step == config.steps or
                                                 (config.reindex_every and step % config.reindex_every == 0)):
                _reindex(model, record)
            evaluates = replica is None or replica.rank == 0
            if evaluates and dev_data and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                dev = evaluate_dev(model, dev_data, config)
                record.update({f"dev_{k}": v for k, v in dev.__dict__.items()})
            _emit(log, bar, step, record, on_step)
            snapshot = bool(config.snapshot_every) and step % config.snapshot_every == 0
            if out is not None and (step == last or snapshot or (config.save_every and step % config.save_every == 0)):
                save_checkpoint(out / "checkpoint", model, config, optimizer, scheduler, step)
                if snapshot:  # what an ablation compares with at equal steps
                    save_checkpoint(out / "snapshots" / f"step-{step}", model, config, optimizer, scheduler, step)
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    return TrainResult(step, losses, dev, out / "checkpoint" if out is not None else None)


def attach_lora(model: RagModel, config: TrainConfig) -> None:
    """Inject the configured LoRA layers (once: a model that already has them keeps them)."""
    for module, spec in ((model.generator.model, config.generator_lora), (model.query_encoder.model, config.query_lora)):
        if spec is not None and not adapted_modules(module):
            attach(module, spec)


def _reindex(model: RagModel, record: dict[str, float]) -> None:
    start = time.perf_counter()
    reindex(model)
    record["reindex_s"] = time.perf_counter() - start


def _open_log(out: Path, step: int) -> Any:
    """The run's log.jsonl, keeping only records up to `step` (those after the checkpoint are redone)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "log.jsonl"
    kept = []
    if step > 0 and path.exists():
        kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= step]  # fmt: skip
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    return path.open("a", encoding="utf-8")


def _bar(progress: bool, total: int, initial: int) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step")


def _emit(log: Any, bar: Any, step: int, record: dict[str, float],
          on_step: Callable[[int, dict[str, float]], None] | None) -> None:  # fmt: skip
    if log is not None:
        log.write(json.dumps({"step": step, **record}) + "\n")
        log.flush()
    if bar is not None:
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", H=f"{record['doc_entropy']:.2f}")
    if on_step is not None:
        on_step(step, record)

