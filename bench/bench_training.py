"""One RAG-Token training step (forward + backward) against transformers' RagTokenForGeneration.

Same weights on both sides (one random BART-base-sized module, shared), the same 4 questions with the
same k = 5 real passages (the packaged Wikipedia summaries, first 100 words) and the same document
scores, given as a leaf tensor that stands for q(x).d(z) (its gradient is what reaches q(x)). Checked
and printed: per-example losses equal (1e-5), and the gradients of the document scores and of the
shared token embeddings equal. Timed: best of N steps per side, the sides alternating (zero grads,
forward, backward). In the same rounds: the bound any implementation of the step pays at this precision
(the generator's own forward and backward on the same inputs, tokenised beforehand, with the cheapest
loss that needs its logits: the sum of the target logits), so the largest possible speed-up over
transformers at equal losses is reference / bound; and ours under bfloat16 autocast (where the CPU
computes it natively: not equal losses, its difference printed).

    python bench/bench_training.py            # the issue's setting: BART-base shape, k=5, batch 4
    python bench/bench_training.py --tiny     # a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]  # rag, the reference harness

from bench_generation import _model_config, _timed_rounds, _workload  # noqa: E402
from hf_reference import context_inputs, labels_from_targets, random_generator, reference_model  # noqa: E402
from hf_reference import word_tokenizer as reference_tokenizer  # noqa: E402
from transformers import BertConfig, BertModel  # noqa: E402

from rag.config import GeneratorConfig  # noqa: E402
from rag.encoders import Encoder  # noqa: E402
from rag.generators import Seq2SeqGenerator  # noqa: E402
from rag.io import atomic_write_text  # noqa: E402
from rag.model import RagModel, _repeat_targets  # noqa: E402


def _unused_query_encoder(tokenizer: Any) -> Encoder:
    """RagModel needs a q(x) module; scores are given here, so a minimal one that never runs."""
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=8, num_hidden_layers=1, num_attention_heads=1,
                        intermediate_size=8)  # fmt: skip
    return Encoder(BertModel(config), tokenizer)


def run(args: argparse.Namespace) -> dict[str, Any]:
    questions, passages, words = _workload(args.batch, args.k, args.vocab)
    targets = [row[0][0] for row in passages]  # the first passage's title: a short, real answer
    tokenizer = reference_tokenizer("bart", words)
    config = _model_config(len(tokenizer), args.tiny)
    config.dropout = config.attention_dropout = config.activation_dropout = 0.0  # same maths both sides
    model = random_generator(config, seed=0).train()
    generator = Seq2SeqGenerator(model, tokenizer, GeneratorConfig(path="bart-base-random", max_input_tokens=300))
    ours = RagModel(_unused_query_encoder(tokenizer), None, generator, "token", args.k)  # type: ignore[arg-type]
    reference = reference_model("token", model, args.k, max_combined_length=300).train()
    ref_ids, ref_mask = context_inputs(reference, tokenizer, questions, passages)
    width = int(ref_mask.sum(1).max())  # crop the reference's padding to 300: compare RAG, not padding
    ref_ids, ref_mask = ref_ids[:, :width], ref_mask[:, :width]
    labels = labels_from_targets(generator.encode_targets(targets).ids, int(config.decoder_start_token_id))
    base_scores = 2.0 * torch.randn(args.batch, args.k, generator=torch.Generator().manual_seed(1))

    def step_ours() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        scores = base_scores.clone().requires_grad_(True)
        nll = ours.score_passages(questions, targets, passages, scores).nll  # (B,)
        nll.sum().backward()
        return nll.detach(), scores.grad, model.get_input_embeddings().weight.grad.clone()

    def step_reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        scores = base_scores.clone().requires_grad_(True)
        out = reference(context_input_ids=ref_ids, context_attention_mask=ref_mask, doc_scores=scores,
                        labels=labels, n_docs=args.k)  # fmt: skip
        out.loss.sum().backward()  # reduce_loss is off: loss is per example (B,)
        return out.loss.detach(), scores.grad, model.get_input_embeddings().weight.grad.clone()

    inputs = generator.format_inputs(questions, passages)
    rows = torch.arange(args.batch * args.k)
    repeated = _repeat_targets(generator.encode_targets(targets), args.k)

    def step_bound() -> None:
        model.zero_grad(set_to_none=True)
        logits = generator.target_logits(generator.encode_prefix(inputs), rows, repeated)  # (B*K, T, V)
        logits.gather(-1, repeated.ids[..., None]).sum().backward()

    def step_ours_bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return step_ours()[0]

    steps = {"ours": step_ours, "reference": step_reference, "bound": step_bound}
    if args.bf16:
        steps["ours_bf16"] = step_ours_bf16
    for step in steps.values():
        step()  # first-call costs (allocator, kernels) out of the timing
    best, outs = _timed_rounds(steps, args.repeats)
    ours_s, ref_s = best["ours"], best["reference"]
    (loss_a, dscore_a, demb_a), (loss_b, dscore_b, demb_b) = outs["ours"], outs["reference"]
    checks = {
        "loss_max_abs_diff": float((loss_a - loss_b).abs().max()),
        "doc_score_grad_max_abs_diff": float((dscore_a - dscore_b).abs().max()),
        "embedding_grad_max_abs_diff": float((demb_a - demb_b).abs().max()),
    }
    equal = bool(torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-5)
                 and torch.allclose(dscore_a, dscore_b, rtol=1e-4, atol=1e-6)
                 and torch.allclose(demb_a, demb_b, rtol=1e-3, atol=1e-6))  # fmt: skip
    extra = {"bound_s": best["bound"], "max_speedup_at_equal_losses": ref_s / best["bound"]}
    if "ours_bf16" in best:
        extra |= {"ours_bf16_s": best["ours_bf16"], "speedup_bf16": ref_s / best["ours_bf16"],
                  "bf16_loss_max_abs_diff": float((outs["ours_bf16"] - loss_b).abs().max())}  # fmt: skip
    return {"ours_s": ours_s, "reference_s": ref_s, "speedup": ref_s / ours_s, "equal": equal, **extra,
            "losses_ours": loss_a.tolist(), "losses_reference": loss_b.tolist(), **checks,
            "parameters": sum(p.numel() for p in model.parameters()), "context_tokens": width}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=50261, help="words (+4 specials): BART's 50265")
    parser.add_argument("--repeats", type=int, default=5, help="best of N steps per side, run alternately")
    parser.add_argument("--tiny", action="store_true", help="a 2-layer d=64 model: smoke test")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 autocast row")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "bench_training.json")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    r = run(args)
    shape = "2-layer d=64" if args.tiny else "BART-base shape (6+6 layers, d=768)"
    print(f"\n| one RAG-Token training step ({shape}, k={args.k}, batch {args.batch}, fwd+bwd) "
          "| ours s | transformers s | speed-up | losses equal |")  # fmt: skip
    print("|---|---:|---:|---:|---|")
    print(f"| {r['parameters'] / 1e6:.0f}M parameters, contexts of {r['context_tokens']} tokens "
          f"| {r['ours_s']:.2f} | {r['reference_s']:.2f} | {r['speedup']:.2f}x | {r['equal']} |")  # fmt: skip
    print(f"| bound: the generator's forward + backward alone (same inputs, tokenised beforehand) | {r['bound_s']:.2f} "
          f"| | {r['max_speedup_at_equal_losses']:.2f}x at most | |")  # fmt: skip
    if "ours_bf16_s" in r:
        print(f"| ours, bfloat16 autocast | {r['ours_bf16_s']:.2f} | {r['reference_s']:.2f} | {r['speedup_bf16']:.2f}x "
              f"| no: max |diff| {r['bf16_loss_max_abs_diff']:.2e} |")  # fmt: skip
    import os

    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads")
    print(f"max |diff|: loss {r['loss_max_abs_diff']:.2e}, d loss/d scores {r['doc_score_grad_max_abs_diff']:.2e}, "
          f"d loss/d embeddings {r['embedding_grad_max_abs_diff']:.2e}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps({"settings": vars(args) | {"out": str(args.out)}, **r}, indent=2))
    print(f"wrote {args.out}")
    return 0 if r["equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
