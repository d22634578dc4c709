"""Parameter-efficient deltas (LoRA, Hu et al. 2021) for the generator and q(x), trained through peft.

A delta is one low-rank pair per adapted linear layer: W' = W + (alpha / r) * B @ A, with A (r, in)
and B (out, r). Training injects peft's LoRA layers into the model in place (`attach`): the module
keeps its class and its forward, so the generator and encoder code run unchanged, and only A and B
receive gradients (the frozen base weights may stay in bfloat16: they need no master copy).
`delta_tensors` reads the trained pairs under plain names; `save_delta` / `read_delta` store them as
safetensors + JSON (no pickle); `merge_delta` folds a stored delta into a plain model's weights for
inference, so the trained model costs nothing extra per token and peft is not needed to run it.

Shapes: r rank, I in_features, O out_features.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag.config import LoraSpec

if TYPE_CHECKING:  # torch is imported where tensors are handled: reading a delta's files needs none
    import torch
    from torch import Tensor, nn

DELTA_FORMAT = "rag-lora-delta"
WEIGHTS_FILE = "delta.safetensors"
META_FILE = "delta.json"


def attach(model: nn.Module, spec: LoraSpec) -> list[str]:
    """Inject trainable LoRA layers into `model` in place (B starts at zero, so the output is unchanged);
    freeze everything else. Returns the adapted module names, sorted."""
    from peft import LoraConfig, inject_adapter_in_model

    targets: str | list[str] = "all-linear" if spec.targets == ("all-linear",) else list(spec.targets)
    config = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=targets,
                        bias="none")  # fmt: skip
    model.requires_grad_(False)
    inject_adapter_in_model(config, model)
    names = adapted_modules(model)
    if not names:
        raise ValueError(f"LoRA targets {spec.targets} match no linear layer of {type(model).__name__}")
    for name in names:
        layer = model.get_submodule(name)
        for pair in (layer.lora_A["default"], layer.lora_B["default"]):
            pair.float()  # trained in float32 even over a bfloat16 base
            pair.requires_grad_(True)
    return names


def adapted_modules(model: nn.Module) -> list[str]:
    return sorted(name for name, module in model.named_modules() if hasattr(module, "lora_A")
                  and "default" in getattr(module, "lora_A", {}))  # fmt: skip


def delta_tensors(model: nn.Module) -> dict[str, Tensor]:
    """The trained pairs of an attached model: {"NAME.lora_A": (r, I), "NAME.lora_B": (O, r)}, float32."""

    out: dict[str, Tensor] = {}
    for name in adapted_modules(model):
        layer = model.get_submodule(name)
        out[f"{name}.lora_A"] = layer.lora_A["default"].weight.detach().float().contiguous()  # (r, I)
        out[f"{name}.lora_B"] = layer.lora_B["default"].weight.detach().float().contiguous()  # (O, r)
    return out


def load_delta_into(model: nn.Module, tensors: Mapping[str, Tensor]) -> None:
    """Copy stored pairs into an attached model's LoRA layers (exact resume of training)."""
    import torch

    names = adapted_modules(model)
    expected = {f"{n}.lora_{s}" for n in names for s in ("A", "B")}
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors))[:3], sorted(set(tensors) - expected)[:3]
        raise ValueError(f"LoRA delta does not match the model's adapted layers (missing {missing}, unexpected {extra})")
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B["default"].weight.copy_(tensors[f"{name}.lora_B"])


def base_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the base weights a delta was trained on: the sha256 of the input embedding
    matrix rounded to bfloat16 (equal for the same weights in float32 or bfloat16, different otherwise)."""
    import torch

    embedding = model.get_input_embeddings().weight.detach()
    data = embedding.to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def save_delta(folder: Path, tensors: Mapping[str, Tensor], spec: LoraSpec, base: Mapping[str, Any],
               dtype: torch.dtype | None = None) -> Path:  # fmt: skip
    """Write WEIGHTS_FILE (+ META_FILE naming the spec, the base it applies to and the file's sha256)
    into `folder` (which the caller writes atomically)."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    dtype = dtype or torch.float32
    save_file({k: v.to(dtype).contiguous() for k, v in tensors.items()}, str(folder / WEIGHTS_FILE))
    meta = {"format": DELTA_FORMAT, "spec": asdict(spec), "base": dict(base),
            "sha256": sha256_file(folder / WEIGHTS_FILE)}  # fmt: skip
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


@dataclass(frozen=True)
class Delta:
    spec: LoraSpec
    base: dict[str, Any]
    tensors: dict[str, Tensor]
    folder: Path


class DeltaError(ValueError):
    pass


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_delta_meta(folder: Path | str) -> dict[str, Any]:
    """A delta folder's META_FILE, checked, with the weights file's sha256 verified against it."""
    folder = Path(folder)
    meta_path, weights = folder / META_FILE, folder / WEIGHTS_FILE
    if not meta_path.is_file() or not weights.is_file():
        raise DeltaError(f"{folder}: not a LoRA delta folder (needs {META_FILE} and {WEIGHTS_FILE})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DeltaError(f"{meta_path}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != DELTA_FORMAT:
        raise DeltaError(f"{meta_path}: field 'format': expected {DELTA_FORMAT!r}")
    for key in ("spec", "base", "sha256"):
        if key not in meta:
            raise DeltaError(f"{meta_path}: field {key!r} is missing")
    actual = sha256_file(weights)
    if actual != meta["sha256"]:
        raise DeltaError(f"{weights}: sha256 {actual} does not match {meta['sha256']} recorded in {meta_path}: "
                         "the file is corrupted or was replaced")  # fmt: skip
    return meta


def read_delta(folder: Path | str) -> Delta:
    """A stored delta, its sha256 verified before the tensors are read (safetensors: no code runs)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_delta_meta(folder)
    weights = folder / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights))
    except Exception as err:  # safetensors raises its own error types for malformed headers
        raise DeltaError(f"{weights}: not a readable safetensors file ({err})") from None
    try:
        spec = LoraSpec(**meta["spec"])
    except (TypeError, ValueError) as err:
        raise DeltaError(f"{folder / META_FILE}: field 'spec': {err}") from None
    return Delta(spec, dict(meta["base"]), {k: v.float() for k, v in tensors.items()}, folder)


def merge_delta(model: nn.Module, delta: Delta) -> int:
    """W += (alpha / r) * B @ A for every pair, in float32, stored back in W's dtype. Checks that the
    delta was trained on these base weights. Returns the number of merged layers."""
    import torch

    fingerprint = delta.base.get("fingerprint")
    if fingerprint and fingerprint != base_fingerprint(model):
        raise DeltaError(f"{delta.folder}: this delta was trained on other base weights "
                         f"({delta.base.get('path', '?')}); it cannot be applied to this model")  # fmt: skip
    names = sorted({key.rsplit(".", 1)[0] for key in delta.tensors})
    with torch.no_grad():
        for name in names:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                raise DeltaError(f"{delta.folder}: the model has no layer {name!r}") from None
            a, b = delta.tensors.get(f"{name}.lora_A"), delta.tensors.get(f"{name}.lora_B")
            if a is None or b is None or not isinstance(layer, torch.nn.Linear):
                raise DeltaError(f"{delta.folder}: layer {name!r}: expected an A/B pair on a linear layer")
            if (b.shape[0], a.shape[1]) != tuple(layer.weight.shape) or a.shape[0] != b.shape[1]:
                raise DeltaError(f"{delta.folder}: layer {name!r}: pair shapes {tuple(a.shape)}, {tuple(b.shape)} "
                                 f"do not fit weight {tuple(layer.weight.shape)}")  # fmt: skip
            update = delta.spec.scaling * (b @ a)  # (O, r) @ (r, I) -> (O, I)
            layer.weight.copy_((layer.weight.float() + update).to(layer.weight.dtype))
    return len(names)


def apply_deltas(model: nn.Module, deltas: tuple[str, ...] | list[str]) -> None:
    """Merge each LoRA delta folder (`package:` paths allowed) into `model`, in order."""
    from rag.resources import resolve_path

    for spec in deltas:
        merge_delta(model, read_delta(resolve_path(spec)))
