"""What an encoder directory holds, read without torch: backend, pooling, normalisation, length limit.

Backends (`EncoderConfig.kind`, "auto" detects from the directory):
- sentence-transformers: `modules.json` names a Transformer, a Pooling and optionally a Normalize module;
  we read their configs and load the underlying transformers model ourselves.
- transformers: any encoder directory (`config.json`), CLS or mean pooling, optional normalisation.
- dpr-question / dpr-context: `DPRQuestionEncoder` / `DPRContextEncoder` checkpoints (pooler output).

rag.encoders (the torch Encoder) and rag.numpy_encoder (the torch-free query path of `rag search`) both
read directories through `inspect_encoder_dir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rag.config import DEFAULT_QUERY_SCALE, EncoderConfig
from rag.resources import resolve_path

Pooling = Literal["cls", "mean", "pooler"]
_DPR_CLASSES = {"DPRQuestionEncoder": "dpr-question", "DPRContextEncoder": "dpr-context"}


@dataclass(frozen=True)
class EncoderLayout:
    """What a checkpoint directory holds, as far as encoding is concerned."""

    kind: Literal["sentence-transformers", "transformers", "dpr-question", "dpr-context"]
    model_dir: Path  # the transformers model (a sub-folder for some sentence-transformers dirs)
    pooling: Pooling
    normalize: bool
    max_length: int


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from error


def inspect_encoder_dir(config: EncoderConfig) -> EncoderLayout:
    """Work out the backend, pooling, normalisation and length limit of an encoder directory."""
    path = resolve_path(config.path)
    if not path.exists():
        raise FileNotFoundError(f"encoder {config.path} does not exist")
    if not path.is_dir():
        raise FileNotFoundError(f"encoder {config.path}: {path} is not a directory")
    kind = config.kind if config.kind != "auto" else _detect_kind(path)
    if kind == "sentence-transformers":
        layout = _sentence_transformers_layout(path)
    elif kind in ("dpr-question", "dpr-context"):
        layout = EncoderLayout(kind, path, "pooler", False, 512)
    else:
        _read_json(path / "config.json")  # fails clearly if it is not a transformers directory
        layout = EncoderLayout("transformers", path, "mean", False, 512)
    pooling = layout.pooling if config.pooling == "auto" else config.pooling
    if layout.kind.startswith("dpr") and pooling != "pooler":
        raise ValueError(f"encoder {config.path}: DPR checkpoints use their pooler output, not {pooling}")
    normalize = layout.normalize if config.normalize is None else config.normalize
    max_length = min(layout.max_length, config.max_length)
    return EncoderLayout(layout.kind, layout.model_dir, pooling, normalize, max_length)


def default_query_scale(config: EncoderConfig) -> float:
    """q(x)'s scale when none is given: DEFAULT_QUERY_SCALE (20) for an encoder whose output is
    normalised (its scores are cosines in [-1, 1], and p(z|x) over them would be nearly flat), 1 for an
    inner-product encoder such as DPR's (its scores already have the prior's scale)."""
    return DEFAULT_QUERY_SCALE if inspect_encoder_dir(config).normalize else 1.0


def _detect_kind(path: Path) -> str:
    if (path / "modules.json").exists():
        return "sentence-transformers"
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"encoder {path}: neither modules.json nor config.json found")
    architectures = _read_json(path / "config.json").get("architectures") or []
    for name in architectures:
        if name in _DPR_CLASSES:
            return _DPR_CLASSES[name]
    return "transformers"


def _sentence_transformers_layout(path: Path) -> EncoderLayout:
    modules = _read_json(path / "modules.json")
    model_dir, pooling, normalize = None, "cls", False
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        sub = path / module.get("path", "")
        if kind == "Transformer":
            model_dir = sub
        elif kind == "Pooling":
            pooling = _pooling_mode(_read_json(sub / "config.json"), sub)
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"{path / 'modules.json'}: module type {module.get('type')!r} is not supported")
    if model_dir is None:
        raise ValueError(f"{path / 'modules.json'}: no sentence_transformers.models.Transformer module")
    max_length = 512
    st_config = model_dir / "sentence_bert_config.json"
    if st_config.exists():
        max_length = int(_read_json(st_config).get("max_seq_length") or max_length)
    return EncoderLayout("sentence-transformers", model_dir, pooling, normalize, max_length)


def _pooling_mode(config: dict[str, Any], where: Path) -> Pooling:
    if config.get("pooling_mode_mean_tokens"):
        return "mean"
    if config.get("pooling_mode_cls_token"):
        return "cls"
    raise ValueError(f"{where / 'config.json'}: only CLS or mean pooling is supported, got {config}")


def native_bfloat16(device: str = "cpu") -> bool:
    """Whether bfloat16 matrix products run natively here (CPU: AMX or AVX512-BF16; CUDA: compute
    capability 8+). On Linux a CPU's flags come from /proc/cpuinfo, so asking imports no torch (`rag
    search` over the default knowledge base stays torch-free); elsewhere torch is asked."""
    device = str(device)
    if device.startswith("cuda"):
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if not device.startswith("cpu"):
        return False
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        import torch

        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)
    flags = {flag for line in info.splitlines() if line.startswith("flags") for flag in line.split(":", 1)[-1].split()}
    return bool({"amx_bf16", "avx512_bf16"} & flags)


def passage_dtype(dtype: str, device: str = "cpu") -> str:
    """d(z)'s precision for a knowledge base build: "auto" is bfloat16 where it runs natively, else float32.

    On this project's CPUs (AMX) bfloat16 encodes about 3x faster than float32, and the rankings it gives
    stay those of float32 (tests/test_encoding_precision.py: top-10 overlap and top-1 agreement on real
    questions). int8 dynamic quantisation (torch, ONNX Runtime) and ONNX Runtime float32 were measured
    too (bench/bench_build.py): slower than bfloat16 here, and int8 far less faithful. q(x) stays float32
    (rag.knowledge.query_encoder_config).
    """
    if dtype == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"encoder dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return dtype
