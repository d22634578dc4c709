"""End-to-end RAG fine-tuning (the paper, sec 2.4): train q(x) and the generator from (x, y) pairs alone.

The passage encoder d(z) and the index stay fixed (unless TrainConfig.train_passage_encoder, the
optional extension in rag.passage_training); RagModel.forward recomputes the k retrieved
scores q(x).d(z) in the graph, so the marginal likelihood's gradient reaches q(x) through p(z|x).
One loop, top to bottom: data order from the seed, AdamW, warm-up then linear or cosine decay,
gradient accumulation and clipping, optional bfloat16 autocast, a JSON Lines log, dev evaluation
and atomic checkpoints (rag.checkpointing) from which `resume` continues exactly.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from rag.config import DecodingConfig, RagConfig
from rag.io import atomic_path
from rag.metrics import exact_match, has_answer
from rag.model import RagModel


@dataclass(frozen=True)
class TrainConfig:
    rag: RagConfig = field(default_factory=RagConfig)  # what to load (RagModel.from_config) and kind, k
    steps: int = 1000  # optimiser steps
    batch_size: int = 8  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimiser step
    lr: float = 3e-5  # the query encoder's (and, unless generator_lr is set, the generator's)
    generator_lr: float | None = None
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # decay to 0 after warm-up
    max_grad_norm: float = 1.0  # 0: no clipping
    label_smoothing: float = 0.0
    bf16: bool = False  # bfloat16 autocast of the forward pass
    seed: int = 0
    freeze_query_encoder: bool = False  # the paper's frozen-retriever ablation
    freeze_generator: bool = False
    # Optional, off by default (rag.passage_training): train d(z) as well, re-indexing every N steps
    # (0: only at the end, so that the saved index always matches the saved d(z)).
    train_passage_encoder: bool = False
    passage_lr: float | None = None  # default: lr
    reindex_every: int = 0
    eval_every: int = 0  # steps between dev evaluations; 0: only at the end
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    eval_max_new_tokens: int = 16
    eval_batch_size: int = 16


@dataclass(frozen=True)
class Example:
    input: str
    target: str
    answers: tuple[str, ...] = ()  # QA: every accepted answer (the target is one of them); () = (target,)

    def __post_init__(self) -> None:
        if not self.answers:
            object.__setattr__(self, "answers", (self.target,))


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


def read_examples(path: Path | str) -> list[Example]:
    """JSON Lines with `input` and `target`, or `question` and `answers` (target = the first answer)."""
    path = Path(path)
    out: list[Example] = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}: line {line_no}: not valid JSON ({error.msg})") from None
            out.append(_example(record, path, line_no))
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


def _example(record: Any, path: Path, line_no: int) -> Example:
    if not isinstance(record, dict):
        raise ValueError(f"{path}: line {line_no}: expected a JSON object")
    answers = record.get("answers", [])
    if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
        raise ValueError(f"{path}: line {line_no}: field 'answers': expected a list of strings")
    source = record.get("input", record.get("question"))
    target = record.get("target", answers[0] if answers else None)
    for name, value in (("input", source), ("target", target)):
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{path}: line {line_no}: field {name!r}: missing or not a non-empty string")
    return Example(source, target, tuple(answers) or (target,))


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
    parts = [
        (model.query_encoder, config.freeze_query_encoder, config.lr),
        (model.generator, config.freeze_generator, config.lr if config.generator_lr is None else config.generator_lr),
    ]
    if model.passage_encoder is not None:
        frozen = not config.train_passage_encoder
        parts.append((model.passage_encoder, frozen, config.lr if config.passage_lr is None else config.passage_lr))
    for module, frozen, lr in parts:
        module.requires_grad_(not frozen)
        if not frozen:
            groups.append({"params": [p for p in module.parameters() if p.requires_grad], "lr": lr})
    if not groups:
        raise ValueError("TrainConfig: both the query encoder and the generator are frozen; nothing to train")
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


def train_step(model: RagModel, batches: Sequence[Sequence[Example]], config: TrainConfig,
               optimizer: torch.optim.Optimizer, scheduler: Any) -> dict[str, float]:  # fmt: skip
    """One optimiser step over `grad_accum` micro-batches; returns the step's log record."""
    start = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss_sum, entropy, tokens, rows = 0.0, 0.0, 0, set()
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16):
            out = model([e.input for e in batch], [e.target for e in batch], config.label_smoothing)
        (out.loss / len(batches)).backward()
        loss_sum += out.loss.item() / len(batches)
        entropy += doc_entropy(out.doc_logprior.float().detach()) / len(batches)
        tokens += int(model.generator.encode_targets([e.target for e in batch]).mask.sum()) * model.k
        rows.update(out.retrieved.rows.reshape(-1).tolist())
    params = [p for g in optimizer.param_groups for p in g["params"]]
    clip = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
    lr = optimizer.param_groups[0]["lr"]
    optimizer.step()
    scheduler.step()
    seconds = time.perf_counter() - start
    return {"loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens / seconds,
            "doc_entropy": entropy, "distinct_passages": len(rows), "seconds": seconds}  # fmt: skip


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
            em += exact_match(answer.answers[j], example.answers)
            hits = [has_answer(example.answers, text) for text in answer.retrieved.texts[j]]
            r1 += hits[0]
            rk += any(hits)
    n = len(examples)
    return DevScores(em / n, rk / n, r1 / n, n)


def train(model: RagModel, train_data: Sequence[Example], config: TrainConfig,
          dev_data: Sequence[Example] = (), out_dir: Path | str | None = None, resume: bool = False,
          progress: bool = False, stop_after: int | None = None,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:  # fmt: skip
    """Fine-tune `model` on `train_data`; logs to out_dir/log.jsonl, checkpoints to out_dir/checkpoint.

    resume: continue from out_dir/checkpoint (weights, optimiser, schedule, RNG, data position).
    stop_after: stop after this many steps of *this call* (what an interruption does; for tests).
    """
    from rag.train_checkpoint import load_trainer_state, save_checkpoint

    if len(train_data) < config.batch_size:
        raise ValueError(f"{len(train_data)} training examples < batch_size {config.batch_size}")
    out = Path(out_dir) if out_dir is not None else None
    torch.manual_seed(config.seed)
    if config.train_passage_encoder and model.passage_encoder is None:
        from rag.passage_training import attach_passage_encoder

        attach_passage_encoder(model, config.rag.index_dir, model.generator.device)
    optimizer, scheduler = make_optimizer(model, config)
    step = 0
    if resume:
        if out is None:
            raise ValueError("resume needs out_dir (the run folder holding checkpoint/)")
        step = load_trainer_state(out / "checkpoint", model, optimizer, scheduler)
    elif out is not None and (out / "checkpoint").exists():
        raise ValueError(f"{out}: already holds a checkpoint; resume it or choose a new folder")
    log = _open_log(out, step) if out is not None else None
    last = config.steps if stop_after is None else min(config.steps, step + stop_after)
    bar = _bar(progress, config.steps, step)
    losses: list[float] = []
    dev: DevScores | None = None
    try:
        while step < last:
            ids = batch_order(len(train_data), config.batch_size, config.seed, step * config.grad_accum,
                              config.grad_accum)  # fmt: skip
            record = train_step(model, [[train_data[i] for i in b] for b in ids], config, optimizer, scheduler)
            step += 1
            losses.append(record["loss"])
            if config.train_passage_encoder and (step == config.steps or
                                                 (config.reindex_every and step % config.reindex_every == 0)):
                _reindex(model, record)
            if dev_data and (step == config.steps or (config.eval_every and step % config.eval_every == 0)):
                dev = evaluate_dev(model, dev_data, config)
                record.update({f"dev_{k}": v for k, v in dev.__dict__.items()})
            _emit(log, bar, step, record, on_step)
            if out is not None and (step == last or (config.save_every and step % config.save_every == 0)):
                save_checkpoint(out / "checkpoint", model, config, optimizer, scheduler, step)
    finally:
        if log is not None:
            log.close()
        if bar is not None:
            bar.close()
    return TrainResult(step, losses, dev, out / "checkpoint" if out is not None else None)


def _reindex(model: RagModel, record: dict[str, float]) -> None:
    from rag.passage_training import reindex

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


def trainable_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
