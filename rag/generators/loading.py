"""load_generator: a transformers folder (family from config.json) or a GGUF file converted once."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Literal

import torch

from rag.config import GeneratorConfig
from rag.encoders import native_bfloat16
from rag.generators.base import Generator
from rag.generators.causal import CausalGenerator
from rag.generators.seq2seq import Seq2SeqGenerator
from rag.io import atomic_dir, output_lock, remove_stale_temps
from rag.lora import apply_deltas
from rag.resources import cache_dir, resolve_path


def converted_gguf_dir(gguf: Path, config: GeneratorConfig) -> Path:
    root = Path(config.cache_dir).expanduser() if config.cache_dir else cache_dir()
    return root / "generators" / gguf.stem


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file through transformers once; save safetensors + tokenizer under `out`."""
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: GGUF file does not exist")
    with output_lock(out, what="converted generator"):  # two first runs at once: one converts
        if not ((out / "config.json").is_file() and (out / "model.safetensors").is_file()):
            remove_stale_temps(out)  # a killed conversion's full-size temporary copy
            _convert(gguf, out)
    return out


def _convert(gguf: Path, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    print(f"converting {gguf.name} to safetensors (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild it without the quantisation marker.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    # the folder is the cache's own (rag.resources.cache_dir): an unfinished one may be replaced
    with atomic_dir(out, replaces=lambda path: True) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"converted in {time.perf_counter() - started:.0f} s -> {out}", flush=True)


def _family(path: Path, config: GeneratorConfig) -> Literal["seq2seq", "causal"]:
    if config.family != "auto":
        return config.family
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file}: no config.json; a generator is a transformers folder or a .gguf"
        )
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: line {err.lineno}: not valid JSON ({err.msg})") from err
    return "seq2seq" if settings.get("is_encoder_decoder", False) else "causal"


def load_generator(config: GeneratorConfig, device: str | torch.device = "cpu") -> Generator:
    """The generator `config.path` names: a transformers folder (family from config.json) or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_path(config.path)
    if path.suffix == ".gguf":
        path = convert_gguf(path, converted_gguf_dir(path, config))
        family: Literal["seq2seq", "causal"] = "causal"
    elif not path.exists():
        raise FileNotFoundError(
            f"{path}: generator path does not exist (GeneratorConfig.path={config.path!r})"
        )
    else:
        family = _family(path, config)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    auto = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    # deltas are merged in float32, then the model takes its dtype: a small update added to bfloat16
    # weights would mostly round away
    attention = {} if config.attention == "auto" else {"attn_implementation": config.attention}
    model = auto.from_pretrained(path, dtype=torch.float32 if config.deltas else dtype, **attention)
    apply_deltas(model, config.deltas)
    model = model.to(device=device, dtype=dtype).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = Seq2SeqGenerator if family == "seq2seq" else CausalGenerator
    return cls(model, tokenizer, config)


def generator_dtype(dtype: str, device: str) -> str:
    """ "auto" -> bfloat16 where it runs natively (about 2x faster on CPUs with AMX), else float32."""
    if dtype == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return dtype
