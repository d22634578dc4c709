"""The default knowledge base encodes d(z) in bfloat16 where the CPU computes it natively: the guard that
this keeps float32's rankings on real questions (overlap of the top 10 >= 0.99, same top 1 for >= 98%),
with q(x) in float32 as retrieval runs it. The thresholds are the issue's, not fitted to a run."""

from __future__ import annotations

import numpy as np
import pytest

from rag.config import CorpusConfig, EncoderConfig
from rag.corpus import iter_passages, passage_text
from rag.encoders import load_encoder, passage_dtype
from rag.index import exact_search
from rag.metrics import ranking_agreement
from rag.resources import red_trivia_dir
from rag.tasks import RED_TRIVIA_GENERAL_LISTS, read_task, split_reserved

K = 10


def _questions(n: int) -> list[str]:
    """Real questions (Red-Trivia's general lists, development part only), spread over the lists."""
    examples = split_reserved(read_task("red-trivia", red_trivia_dir(), subsets=list(RED_TRIVIA_GENERAL_LISTS)), "dev")
    step = max(1, len(examples) // n)
    return [e.input for e in examples[::step][:n]]


def _passages(every: int) -> list[str]:
    return [passage_text(p.title, p.text) for i, p in enumerate(iter_passages(CorpusConfig())) if i % every == 0]


def _agreement(passages: list[str], questions: list[str], dtype: str) -> tuple[float, float]:
    float32 = load_encoder(EncoderConfig())
    query = float32.encode(questions)  # q(x): float32, as retrieval runs it
    reference = exact_search(float32.encode(passages), query, K).rows
    fast = exact_search(load_encoder(EncoderConfig(dtype=dtype)).encode(passages), query, K).rows  # type: ignore[arg-type]
    return ranking_agreement(reference.tolist(), fast.tolist())


@pytest.fixture(scope="module")
def fast_dtype() -> str:
    dtype = passage_dtype("auto")
    if dtype == "float32":
        pytest.skip("bfloat16 is not native on this CPU: the default build stays float32, nothing to guard")
    return dtype


def test_bfloat16_passages_keep_float32_rankings_on_a_sample(fast_dtype):
    """200 passages of the default corpus (every 60th), 150 questions: seconds, in the default suite."""
    overlap, top1 = _agreement(_passages(every=60), _questions(150), fast_dtype)
    assert overlap >= 0.99 and top1 >= 0.98, (overlap, top1)


@pytest.mark.slow
def test_bfloat16_passages_keep_float32_rankings_on_the_default_corpus(fast_dtype):
    """All 12,324 passages of the default knowledge base and 1,000 questions (minutes in float32)."""
    overlap, top1 = _agreement(_passages(every=1), _questions(1000), fast_dtype)
    assert overlap >= 0.99 and top1 >= 0.98, (overlap, top1)


def test_native_bfloat16_reads_the_cpu_as_torch_does():
    """The torch-free check (/proc/cpuinfo flags) agrees with torch's own, where torch has one."""
    import torch

    from rag.encoders import native_bfloat16

    checks = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if not all(callable(c) for c in checks):
        pytest.skip("this torch does not report AMX / AVX512-BF16 support")
    assert native_bfloat16("cpu") == any(bool(c()) for c in checks)
    assert passage_dtype("float32") == "float32" and passage_dtype("auto") in ("float32", "bfloat16")
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        passage_dtype("int8")


def test_ranking_agreement_counts_overlap_and_top1():
    overlap, top1 = ranking_agreement([[1, 2, 3], [4, 5, 6]], [[1, 3, 9], [5, 4, 6]])
    assert (overlap, top1) == (pytest.approx((2 / 3 + 1) / 2), 0.5)
    with pytest.raises(ValueError):
        ranking_agreement([], [])
    assert np.isclose(ranking_agreement([[7]], [[7]])[0], 1.0)
