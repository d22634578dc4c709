"""Knowledge-base build speed: d(z) encoding alternatives and the default build, before and after.

    python bench/bench_build.py               # alternatives on a sample, then both full default builds
    python bench/bench_build.py --no-full     # the sample only (a minute or two)
    python bench/bench_build.py --extra-path DIR   # where onnxruntime/onnx are installed (appended to sys.path)

(1) Encoding alternatives, on a sample of the default corpus, timed in alternating rounds (best of each):
torch float32 (the old default), torch bfloat16 (the new default where native), torch int8 dynamic
quantisation of the linear layers, and, where onnxruntime is importable, ONNX Runtime float32 and int8
dynamic quantisation. Each is checked by the quality guard of tests/test_encoding_precision.py: top-10
overlap and top-1 agreement with float32's rankings for real questions (Red-Trivia, development part).
(2) The full default build (encode + index) with float32 and with the new default, one after the other,
and the guard over the whole corpus. Prints a table, writes bench/out/bench_build.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.config import CorpusConfig, EncoderConfig, IndexConfig  # noqa: E402
from rag.corpus import iter_passages, passage_text  # noqa: E402
from rag.encoders import Encoder, batches_by_length, load_encoder, pad_batch, passage_dtype  # noqa: E402
from rag.io import atomic_write_text  # noqa: E402
from rag.knowledge import build_knowledge_base, open_knowledge_base  # noqa: E402
from rag.metrics import ranking_agreement  # noqa: E402
from rag.mips import exact_search  # noqa: E402
from rag.resources import cache_dir, red_trivia_dir  # noqa: E402
from rag.tasks import RED_TRIVIA_GENERAL_LISTS, read_task, split_reserved  # noqa: E402

K = 10
OUT = ROOT / "bench" / "out" / "bench_build.json"


def questions(n: int) -> list[str]:
    examples = split_reserved(read_task("red-trivia", red_trivia_dir(), subsets=list(RED_TRIVIA_GENERAL_LISTS)), "dev")
    return [e.input for e in examples[:: max(1, len(examples) // n)][:n]]


def int8_dynamic(encoder: Encoder) -> Encoder:
    """The linear layers quantised to int8 with dynamic activation scales (torch.ao)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder.model = torch.ao.quantization.quantize_dynamic(encoder.model, {torch.nn.Linear}, dtype=torch.qint8)
    return encoder


def onnx_encoders(encoder: Encoder, tmp: Path) -> dict[str, Callable[[list[str]], np.ndarray]]:
    """ONNX Runtime float32 and int8 (dynamic) sessions of the same model, with our pooling."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    class Body(torch.nn.Module):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=ids, attention_mask=mask).last_hidden_state

    ids, mask = pad_batch(encoder.token_ids(["a passage", "another passage"]), 0)
    axes = {name: {0: "batch", 1: "tokens"} for name in ("ids", "mask", "hidden")}
    torch.onnx.export(Body(encoder.model).eval(), (ids, mask), str(tmp / "fp32.onnx"), input_names=["ids", "mask"],
                      output_names=["hidden"], dynamic_axes=axes, dynamo=False, opset_version=17)  # fmt: skip
    quantize_dynamic(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), weight_type=QuantType.QInt8)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()

    def runner(path: Path) -> Callable[[list[str]], np.ndarray]:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def encode(texts: list[str]) -> np.ndarray:
            tokens = encoder.token_ids(texts)
            out = np.zeros((len(texts), encoder.dim), np.float32)
            for rows in batches_by_length([len(t) for t in tokens], 64):
                i, m = pad_batch([tokens[r] for r in rows], encoder.tokenizer.pad_token_id or 0)
                hidden = session.run(None, {"ids": i.numpy(), "mask": m.numpy()})[0]
                w = m.numpy()[..., None].astype(np.float32)
                pooled = (hidden * w).sum(1) / w.sum(1)
                out[rows] = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
            return out

        return encode

    return {"onnxruntime float32": runner(tmp / "fp32.onnx"), "onnxruntime int8 dynamic": runner(tmp / "int8.onnx")}


def sample_section(every: int, rounds: int, n_questions: int, tmp: Path) -> dict[str, Any]:
    texts = [passage_text(p.title, p.text) for i, p in enumerate(iter_passages(CorpusConfig())) if i % every == 0]
    float32 = load_encoder(EncoderConfig())
    query = float32.encode(questions(n_questions))
    candidates: dict[str, Callable[[list[str]], np.ndarray]] = {
        "torch float32 (old default)": float32.encode,
        "torch bfloat16": load_encoder(EncoderConfig(dtype="bfloat16")).encode,
        "torch int8 dynamic": int8_dynamic(load_encoder(EncoderConfig())).encode,
    }
    notes = {}
    try:
        candidates.update(onnx_encoders(load_encoder(EncoderConfig()), tmp))
    except ImportError as error:
        notes["onnxruntime"] = f"not measured: {error} (pip install onnxruntime onnx; --extra-path)"
    best: dict[str, float] = {}
    vectors: dict[str, np.ndarray] = {}
    for _ in range(rounds):  # alternating rounds: load drift falls on every candidate alike
        for name, encode in candidates.items():
            start = time.perf_counter()
            vectors[name] = encode(texts)
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    reference = vectors["torch float32 (old default)"]
    ref_rows = exact_search(reference, query, K).rows.tolist()
    out: dict[str, Any] = {"passages": len(texts), "questions": len(query), "notes": notes, "candidates": {}}
    for name, seconds in best.items():
        v = vectors[name]
        cosine = (v * reference).sum(1) / np.linalg.norm(v, axis=1) / np.linalg.norm(reference, axis=1)
        overlap, top1 = ranking_agreement(ref_rows, exact_search(v, query, K).rows.tolist())
        out["candidates"][name] = {"seconds": seconds, "passages_per_s": len(texts) / seconds,
                                   "min_cosine": float(cosine.min()), "overlap_at_10": overlap, "top1_agreement": top1,
                                   "passes_guard": overlap >= 0.99 and top1 >= 0.98}  # fmt: skip
    return out


def full_section(tmp: Path, n_questions: int, cached: bool) -> dict[str, Any]:
    """The old default build (float32) and the new one, each timed end to end, and their rankings.
    cached: the two default knowledge bases already in the cache (kb/default, kb/default-bfloat16) with
    the build times their meta.json recorded (not side by side: the load of their own runs)."""
    runs: dict[str, Any] = {}
    folders = {}
    for name, dtype in (("float32 (old default)", "float32"), ("new default", passage_dtype("auto"))):
        folders[name] = cache_dir() / "kb" / ("default" if dtype == "float32" else f"default-{dtype}") if cached else tmp / dtype
        if cached:
            meta = open_knowledge_base(folders[name]).meta
            runs[name] = {"dtype": meta["encoder"]["dtype"], "seconds": meta["build_seconds"], "passages": meta["passages"],
                          "recorded_by_the_build": True}  # fmt: skip
            continue
        start = time.perf_counter()
        info = build_knowledge_base(CorpusConfig(), EncoderConfig(dtype=dtype), IndexConfig(), folders[name],  # type: ignore[arg-type]
                                    progress=False)  # fmt: skip
        runs[name] = {"dtype": dtype, "seconds": time.perf_counter() - start, "passages": info.passages}
    query = load_encoder(EncoderConfig()).encode(questions(n_questions))
    rows = {}
    for name in runs:
        kb = open_knowledge_base(folders[name])
        rows[name] = exact_search(kb.index.embeddings(np.arange(len(kb.index))), query, K).rows.tolist()
    overlap, top1 = ranking_agreement(rows["float32 (old default)"], rows["new default"])
    return {"runs": runs, "questions": len(query), "overlap_at_10": overlap, "top1_agreement": top1}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=8, help="sample: every Nth passage of the default corpus")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--questions", type=int, default=1000)
    parser.add_argument("--no-full", action="store_true", help="skip the two full default builds")
    parser.add_argument("--cached", action="store_true",
                        help="(2) from the cached default knowledge bases (their recorded build times) instead of building")
    parser.add_argument("--extra-path", action="append", default=[], help="appended to sys.path (onnxruntime)")
    args = parser.parse_args(argv)
    sys.path.extend(args.extra_path)
    load_before = os.getloadavg()
    res: dict[str, Any] = {"threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                           "native_bfloat16_dtype": passage_dtype("auto")}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_build.") as tmp:
        res["sample"] = sample_section(args.every, args.rounds, args.questions, Path(tmp))
        if not args.no_full:
            res["full"] = full_section(Path(tmp), args.questions, args.cached)
    res["loadavg_before"], res["loadavg_after"] = [round(v, 1) for v in load_before], [round(v, 1) for v in os.getloadavg()]
    s = res["sample"]
    print(f"\n| d(z) encoding, {s['passages']} passages, {res['threads']} torch threads | passages/s | min cosine "
          f"| top-10 overlap | top-1 agreement ({s['questions']} questions) | guard |")  # fmt: skip
    print("|---|---:|---:|---:|---:|---|")
    for name, c in s["candidates"].items():
        print(f"| {name} | {c['passages_per_s']:.0f} | {c['min_cosine']:.4f} | {c['overlap_at_10']:.4f} "
              f"| {c['top1_agreement']:.3f} | {'passes' if c['passes_guard'] else 'fails'} |")  # fmt: skip
    for key, note in s["notes"].items():
        print(f"{key}: {note}")
    if "full" in res:
        f = res["full"]
        print("\n| full default build (encode + index) | dtype | seconds | passages/s |")
        print("|---|---|---:|---:|")
        for name, run in f["runs"].items():
            print(f"| {name} | {run['dtype']} | {run['seconds']:.1f} | {run['passages'] / run['seconds']:.0f} |")
        print(f"whole corpus, {f['questions']} questions: top-10 overlap {f['overlap_at_10']:.4f}, "
              f"top-1 agreement {f['top1_agreement']:.3f}")
    print(f"load average before/after: {res['loadavg_before']} / {res['loadavg_after']} on {res['cpus']} CPUs")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(OUT, json.dumps(res, indent=2))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
