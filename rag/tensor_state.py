"""Nested training state (optimiser, schedule, RNG) as safetensors + JSON, read back exactly.

torch.save / torch.load pickle: a pickled file can run any code when it is loaded, and `weights_only`
refuses the very objects an optimiser's state holds. Here a state is split in two files that can only
ever be data: `NAME.safetensors` holds every tensor (bit for bit, dtype and shape kept) and `NAME.json`
the structure around them. JSON floats round-trip exactly (repr), so a resumed run continues with
exactly the numbers it stopped with.

Values: None, bool, int, float, str, torch.Tensor, and lists, tuples and dicts of them (dict keys may
be str, int, float, bool or None: an optimiser's state is keyed by parameter number). JSON keeps
objects and arrays as they are; what JSON cannot say is written as a one-key object:
    {"__tensor__": "3"}          the safetensors entry "3"
    {"__tuple__": [...]}         a tuple (AdamW's betas)
    {"__dict__": [[k, v], ...]}  a dict whose keys are not all strings, or that has a "__..." key
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

TENSOR, TUPLE, DICT = "__tensor__", "__tuple__", "__dict__"
_KEY_TYPES = (str, int, float, bool, type(None))


class StateFileError(ValueError):
    """A state file that is missing, unreadable or not what `save_state` writes; names the file."""


def state_files(base: Path | str) -> tuple[Path, Path]:
    """(NAME.safetensors, NAME.json) for the base path NAME."""
    base = Path(base)
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def save_state(state: Any, base: Path | str) -> None:
    """Write `state` to NAME.safetensors and NAME.json (not atomically: write inside an atomic folder)."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(state, tensors, "state")
    tensor_file, json_file = state_files(base)
    save_file(tensors, str(tensor_file))
    json_file.write_text(json.dumps({"format": "rag-tensor-state-1", "state": structure}), encoding="utf-8")


def load_state(base: Path | str) -> Any:
    """The state `save_state` wrote under NAME; a StateFileError naming the file for anything else."""
    tensor_file, json_file = state_files(base)
    for file in (tensor_file, json_file):
        if not file.is_file():
            raise StateFileError(f"{file}: missing")
    try:
        tensors = load_file(str(tensor_file))
    except (SafetensorError, OSError, ValueError) as error:
        raise StateFileError(f"{tensor_file}: not a safetensors file ({error})") from None
    try:
        data = json.loads(json_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise StateFileError(f"{json_file}: not valid JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != "rag-tensor-state-1" or "state" not in data:
        raise StateFileError(f"{json_file}: field 'format': not a rag tensor state file")
    used: set[str] = set()
    try:
        state = _decode(data["state"], tensors, used)
    except RecursionError:
        raise StateFileError(f"{json_file}: field 'state': nested too deeply") from None
    except (KeyError, TypeError, ValueError) as error:
        raise StateFileError(f"{json_file}: field 'state': {error}") from None
    if used != set(tensors):
        raise StateFileError(f"{tensor_file}: tensors {sorted(set(tensors) - used)[:5]} are not in {json_file.name}")
    return state


def _encode(value: Any, tensors: dict[str, torch.Tensor], where: str) -> Any:
    if isinstance(value, torch.Tensor):
        key = str(len(tensors))
        # a copy of its own: safetensors refuses tensors that share memory (views, tied weights)
        tensors[key] = value.detach().cpu().clone().contiguous()
        return {TENSOR: key}
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"__float__": repr(value)}
    if isinstance(value, tuple):
        return {TUPLE: [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        if plain:
            return {k: _encode(v, tensors, f"{where}.{k}") for k, v in value.items()}
        bad = [k for k in value if not isinstance(k, _KEY_TYPES)]
        if bad:
            raise TypeError(f"save_state: {where}: dict key {bad[0]!r} of type {type(bad[0]).__name__}")
        return {DICT: [[_encode(k, tensors, where), _encode(v, tensors, f"{where}[{k!r}]")] for k, v in value.items()]}
    raise TypeError(f"save_state: {where}: cannot store a {type(value).__name__} (tensors, numbers, strings, "
                    "lists, tuples and dicts only)")  # fmt: skip


def _decode(value: Any, tensors: dict[str, torch.Tensor], used: set[str]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors, used) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (marker, inner), = value.items()
        if marker == TENSOR:
            if inner not in tensors:
                raise KeyError(f"tensor {inner!r} is not in the safetensors file")
            used.add(inner)
            return tensors[inner]
        if marker == TUPLE:
            return tuple(_decode(v, tensors, used) for v in _list(inner, marker))
        if marker == DICT:
            pairs = _list(inner, marker)
            if not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise ValueError(f"{DICT}: expected [key, value] pairs")
            out = {}
            for key, item in pairs:
                key = _decode(key, tensors, used)
                if not isinstance(key, _KEY_TYPES):
                    raise ValueError(f"{DICT}: key of type {type(key).__name__}")
                out[key] = _decode(item, tensors, used)
            return out
        if marker == "__float__":
            if inner not in ("inf", "-inf", "nan"):
                raise ValueError(f"__float__: {inner!r} is not inf, -inf or nan")
            return float(inner)
    if any(k.startswith("__") for k in value):
        raise ValueError(f"unknown marker in {sorted(value)[:3]}")
    return {k: _decode(v, tensors, used) for k, v in value.items()}


def _list(value: Any, marker: str) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(f"{marker}: expected a list, got {type(value).__name__}")
    return value
