"""Training checkpoints: one folder, written atomically, that loads into RagModel with one argument.

    checkpoint/
      config.json        {"format", "step", "rag": RagConfig (model paths relative to this folder),
                          "train": TrainConfig}
      query_encoder/     q(x): transformers folder (model.safetensors, config.json, tokenizer)
      generator/         the generator: transformers folder (model.safetensors, config.json, tokenizer)
      trainer_state.safetensors + trainer_state.json   optimiser and schedule state, torch RNG state,
                         step (rag.tensor_state: data only, nothing in a checkpoint can run code)
      passage_encoder/   only when d(z) is trained (rag.passage_training): the trained d(z)
      knowledge_base/    ... and the knowledge base as it was at this step (its index's stored d(z))

Otherwise the passage encoder and the index are not copied: they never change during training, and
the config names the knowledge base folder (`rag.index_dir`) they live in.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from rag.config import (
    CHECKPOINT_CONFIG_FILE,
    CHECKPOINT_FORMAT,
    CHECKPOINT_GENERATOR_DELTA_DIR,
    CHECKPOINT_KNOWLEDGE_DIR,
    CHECKPOINT_QUERY_DELTA_DIR,
    EncoderConfig,
    RagConfig,
    TrainConfig,
    checkpoint_rag_config,
    is_training_checkpoint,
    read_checkpoint_config,
    to_dict,
)
from rag.encoders import saved_encoder_config
from rag.io import atomic_dir, atomic_write_text, check_output_dir, output_lock, remove_stale_temps
from rag.knowledge import (
    default_knowledge_base,
    open_knowledge_base,
    query_encoder_config,
    save_knowledge_base,
)
from rag.lora import adapted_modules, base_fingerprint, delta_tensors, load_delta_into, read_delta, save_delta
from rag.model import RagModel
from rag.retriever import Retriever
from rag.tensor_state import load_state, save_state, state_files

__all__ = ["checkpoint_rag_config", "is_training_checkpoint", "load_rag_model", "load_trainer_state",
           "read_checkpoint_config", "save_checkpoint"]  # fmt: skip

FORMAT = CHECKPOINT_FORMAT
CONFIG_FILE = CHECKPOINT_CONFIG_FILE
STATE_NAME = "trainer_state"  # trainer_state.safetensors + trainer_state.json
PICKLED_STATE_FILE = "trainer_state.pt"  # what versions before the safe format wrote; never unpickled
PASSAGE_ENCODER_DIR = "passage_encoder"
KNOWLEDGE_DIR = CHECKPOINT_KNOWLEDGE_DIR
QUERY_DELTA_DIR = CHECKPOINT_QUERY_DELTA_DIR
GENERATOR_DELTA_DIR = CHECKPOINT_GENERATOR_DELTA_DIR


def resolve_base(spec: str) -> str:
    """A base model path as a checkpoint records it: `package:` specs stay portable, others absolute."""
    return spec if spec.startswith("package:") else str(Path(spec).expanduser().resolve())


def _query_base(config: TrainConfig) -> EncoderConfig:
    """The q(x) a run started from: its config's, else the one its knowledge base records."""
    return config.rag.query_encoder or query_encoder_config(config.rag.index_dir or default_knowledge_base())


def _saved_rag_config(model: RagModel, config: TrainConfig) -> RagConfig:
    """The run's RagConfig, pointing q(x), the generator (and a trained knowledge base) at this folder.
    A LoRA-trained part keeps its base path and gains this folder's delta (relative: resolved on load)."""
    if adapted_modules(model.query_encoder.model):
        query = _query_base(config)
        query_encoder = dataclasses.replace(query, path=resolve_base(query.path), deltas=(*query.deltas, QUERY_DELTA_DIR))
    else:
        query_encoder = saved_encoder_config(model.query_encoder, config.rag.query_encoder or EncoderConfig(),
                                             "query_encoder")  # fmt: skip
    gen = config.rag.generator
    if adapted_modules(model.generator.model):
        generator = dataclasses.replace(gen, path=resolve_base(gen.path), family=model.generator.family,
                                        deltas=(*gen.deltas, GENERATOR_DELTA_DIR))  # fmt: skip
    else:
        generator = dataclasses.replace(gen, path="generator", family=model.generator.family)
    index_dir = str(Path(config.rag.index_dir).resolve()) if config.rag.index_dir else ""
    if model.passage_encoder is not None:
        index_dir = KNOWLEDGE_DIR  # relative: checkpoint_rag_config resolves it
    return dataclasses.replace(
        config.rag, kind=model.kind, k=model.k, query_encoder=query_encoder, generator=generator,
        index_dir=index_dir,
    )  # fmt: skip


def save_checkpoint(path: Path | str, model: RagModel, config: TrainConfig, optimizer: torch.optim.Optimizer,
                    scheduler: Any, step: int) -> Path:  # fmt: skip
    """Write the checkpoint folder; it replaces `path` in one rename, only once complete."""
    path = Path(path)
    with atomic_dir(path, replaces=is_training_checkpoint) as tmp:
        parts = ((model.query_encoder, config.query_lora, QUERY_DELTA_DIR, "query_encoder", _query_base(config).path),
                 (model.generator, config.generator_lora, GENERATOR_DELTA_DIR, "generator", config.rag.generator.path))
        for part, spec, delta_dir, full_dir, base in parts:
            if adapted_modules(part.model):  # LoRA: only the trained pairs, and which base they apply to
                assert spec is not None
                save_delta(tmp / delta_dir, delta_tensors(part.model), spec,
                           {"path": str(base), "fingerprint": base_fingerprint(part.model)})  # fmt: skip
            else:
                part.model.save_pretrained(tmp / full_dir)
                part.tokenizer.save_pretrained(tmp / full_dir)
        if model.passage_encoder is not None:
            model.passage_encoder.model.save_pretrained(tmp / PASSAGE_ENCODER_DIR)
            model.passage_encoder.tokenizer.save_pretrained(tmp / PASSAGE_ENCODER_DIR)
            encoder_path = path.resolve() / PASSAGE_ENCODER_DIR  # where d(z) is once the folder is in place
            encoder = saved_encoder_config(model.passage_encoder, EncoderConfig(), str(encoder_path))
            save_knowledge_base(model.retriever.index, model.retriever.passages, encoder, tmp / KNOWLEDGE_DIR,
                                fingerprint=f"trained-d(z)-{encoder_path}")  # fmt: skip
        state = {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            **_cuda_rng_state(),
        }
        save_state(state, tmp / STATE_NAME)
        rag = _saved_rag_config(model, config)
        train = dataclasses.replace(config, rag=rag)
        meta = {"format": FORMAT, "step": step, "rag": to_dict(rag), "train": to_dict(train)}
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
    return path


def load_rag_model(path: Path | str, device: str | torch.device = "cpu") -> RagModel:
    """A trained RagModel from its checkpoint folder: q(x), generator, knowledge base, kind and k."""
    return RagModel.from_checkpoint(path, device)


def _load_weights(module: nn.Module, file: Path) -> None:
    """Load a transformers model.safetensors into `module`; only tied copies may be absent from it."""
    state = load_file(str(file))
    missing, unexpected = module.load_state_dict(state, strict=False)
    params = dict(module.state_dict(keep_vars=True))
    loaded = {params[name].data_ptr() for name in state if name in params}
    untied = [name for name in missing if params[name].data_ptr() not in loaded]
    if unexpected or untied:
        raise ValueError(f"{file}: weights do not match the model (missing {untied}, unexpected {unexpected})")


def load_trainer_state(path: Path | str, model: RagModel, optimizer: torch.optim.Optimizer,
                       scheduler: Any) -> int:  # fmt: skip
    """Restore weights, optimiser, schedule and RNG from a checkpoint; returns the step it holds."""
    path = Path(path)
    read_checkpoint_config(path)
    for module, delta_dir, full_dir in ((model.query_encoder.model, QUERY_DELTA_DIR, "query_encoder"),
                                        (model.generator.model, GENERATOR_DELTA_DIR, "generator")):  # fmt: skip
        if adapted_modules(module):
            load_delta_into(module, read_delta(path / delta_dir).tensors)
        else:
            _load_weights(module, path / full_dir / "model.safetensors")
    if model.passage_encoder is not None:
        _load_weights(model.passage_encoder.model, path / PASSAGE_ENCODER_DIR / "model.safetensors")
        kb = open_knowledge_base(path / KNOWLEDGE_DIR)  # the index as it was at this step
        model.retriever = Retriever(kb.index, kb.passages, model.query_encoder)
    state = _read_trainer_state(path)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():  # a CPU resume of a GPU run cannot restore it
        torch.cuda.set_rng_state_all(state["cuda_rng"][: torch.cuda.device_count()])
    return int(state["step"])


def _cuda_rng_state() -> dict[str, list[torch.Tensor]]:
    """Each GPU's generator state (dropout masks on CUDA draw from these, not from the CPU generator), so a
    resumed GPU run continues exactly; nothing when CUDA was never used."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return {"cuda_rng": list(torch.cuda.get_rng_state_all())}
    return {}


def _read_trainer_state(path: Path) -> dict[str, Any]:
    tensor_file, json_file = state_files(path / STATE_NAME)
    if not tensor_file.exists() and (path / PICKLED_STATE_FILE).exists():
        raise ValueError(
            f"{path / PICKLED_STATE_FILE}: a trainer state written by an older version as a pickle, which is "
            "never loaded (unpickling can run code); its weights still load (rag ask --checkpoint), but "
            "--resume needs a checkpoint written by this version"
        )
    state = load_state(path / STATE_NAME)
    expected = {"step": int, "optimizer": dict, "scheduler": dict, "torch_rng": torch.Tensor}
    for key, kind in expected.items():
        if not isinstance(state, dict) or not isinstance(state.get(key), kind):
            raise ValueError(f"{json_file}: field {key!r}: missing or not a {kind.__name__}")
    cuda = state.get("cuda_rng", [])
    if not isinstance(cuda, list) or not all(isinstance(t, torch.Tensor) for t in cuda):
        raise ValueError(f"{json_file}: field 'cuda_rng': not a list of tensors")
    return state


# ------------------------------------------------------------------------------------ the run folder

RUN_FILE = "train_run.json"  # marks a folder as a `rag train` run folder from its first moment
_RUN_FORMAT = "rag-train-run"
LOG_FILE = "log.jsonl"


def is_training_run(path: Path | str) -> bool:
    """Whether `path` is a `rag train` run folder: its marker, or (runs from before the marker) a
    training checkpoint in it, or nothing but a log.jsonl."""
    path = Path(path)
    if (path / RUN_FILE).is_file():
        try:
            return json.loads((path / RUN_FILE).read_text(encoding="utf-8")).get("format") == _RUN_FORMAT
        except (OSError, ValueError, AttributeError):
            return False
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    return is_training_checkpoint(path / "checkpoint") or names == {LOG_FILE}


def check_run_folder(out: Path | str, resume: bool, overwrite: bool = False, inputs: Sequence[Path | str] = ()) -> bool:
    """run_folder's checks, without taking the folder (a command runs them before loading anything);
    True if the folder holds a run."""
    out = Path(out)
    if resume and overwrite:
        raise ValueError("--resume continues the run in the folder, --overwrite starts it over: not both")
    existing = check_output_dir(out, what="training run (--resume continues it)", is_own=is_training_run,
                                overwrite=overwrite, inputs=inputs, reuse_own=resume)  # fmt: skip
    if resume and not is_training_checkpoint(out / "checkpoint"):
        raise FileNotFoundError(f"{out}: no checkpoint to resume (rag train wrote none there yet)")
    return existing


@contextlib.contextmanager
def run_folder(out: Path | str, resume: bool, overwrite: bool = False,
               inputs: Sequence[Path | str] = ()) -> Iterator[Path]:  # fmt: skip
    """Hold a run folder for one training call: one writer at a time (a second fails at once), never a
    folder that is not a run's, the current directory or an input; `resume` continues the run there,
    `overwrite` starts it over (deleting only the run's own files), otherwise it must be new or empty.
    Stale temporaries of a killed run's checkpoint are removed."""
    out = Path(out)
    check_run_folder(out, resume, overwrite, inputs)
    out.mkdir(parents=True, exist_ok=True)
    with output_lock(out / "checkpoint", wait=False, what="training run"):
        existing = check_run_folder(out, resume, overwrite, inputs)  # again, now that we hold it
        remove_stale_temps(out / "checkpoint")
        if existing and overwrite:
            for name in (LOG_FILE, RUN_FILE):
                (out / name).unlink(missing_ok=True)
            if is_training_checkpoint(out / "checkpoint"):
                shutil.rmtree(out / "checkpoint")
        if not (out / RUN_FILE).is_file():
            atomic_write_text(out / RUN_FILE, json.dumps({"format": _RUN_FORMAT}))
        yield out
