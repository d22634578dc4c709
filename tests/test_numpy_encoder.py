"""The torch-free q(x) of `rag search` (rag.numpy_encoder) against the torch Encoder it stands in for."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from tiny_encoders import tiny_bert_dir, tiny_dpr_dir, tiny_sentence_transformers_dir

from rag.config import EncoderConfig
from rag.encoders import load_encoder
from rag.numpy_encoder import load_numpy_encoder

TEXTS = [
    "what is the capital of angola?",
    "luanda is the capital and largest city of angola, on the atlantic coast.",
    "a river",
    "the congo river is the deepest river in the world; " * 12,  # longer than max_length: truncated
    "x",
]


@pytest.mark.parametrize("layout", ["st-mean-normalized", "st-cls", "bert-mean"])
def test_equals_the_torch_encoder_on_tiny_berts(tmp_path, layout):
    if layout == "bert-mean":
        path = tiny_bert_dir(tmp_path / "m")
    else:
        pooling = "cls" if layout == "st-cls" else "mean"
        path = tiny_sentence_transformers_dir(tmp_path / "m", seed=3, pooling=pooling, normalize=pooling == "mean")
    config = EncoderConfig(path=str(path), scale=20.0, max_length=64)  # the tiny models have 128 positions
    fast, reference = load_numpy_encoder(config), load_encoder(config)
    assert fast is not None and fast.dim == reference.dim
    ids = reference.tokenizer(TEXTS, truncation=True, max_length=reference.max_length)["input_ids"]
    assert [e.ids for e in fast.tokenizer.encode_batch(TEXTS)] == ids
    np.testing.assert_allclose(fast.encode(TEXTS, batch_size=2), reference.encode(TEXTS), atol=2e-5, rtol=1e-5)


def _delta(encoder_dir, folder, dtype: str = "float32"):
    """A LoRA delta (rag.lora) with random B over the encoder in `encoder_dir`."""
    import torch

    from rag.config import LoraSpec
    from rag.lora import adapted_modules, attach, base_fingerprint, delta_tensors, save_delta

    model = load_encoder(EncoderConfig(path=str(encoder_dir))).model
    spec = LoraSpec(rank=2, alpha=4.0)
    attach(model, spec)
    with torch.no_grad():
        for i, name in enumerate(adapted_modules(model)):
            b = model.get_submodule(name).lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(i)) * 0.1)
    return save_delta(folder, delta_tensors(model), spec, {"fingerprint": base_fingerprint(model)}, getattr(torch, dtype))


def test_merges_a_float32_lora_delta_as_the_torch_encoder_does(tmp_path):
    st = tiny_sentence_transformers_dir(tmp_path / "st", seed=2)
    config = EncoderConfig(path=str(st), scale=20.0, max_length=64, deltas=(str(_delta(st, tmp_path / "d")),))
    fast, reference = load_numpy_encoder(config), load_encoder(config)
    assert fast is not None
    np.testing.assert_allclose(fast.encode(TEXTS), reference.encode(TEXTS), atol=2e-5, rtol=1e-5)
    plain = load_encoder(EncoderConfig(path=str(st), scale=20.0, max_length=64)).encode(TEXTS)
    assert np.abs(plain - fast.encode(TEXTS)).max() > 1e-3  # the delta is merged, not ignored


def test_declines_what_it_does_not_compute(tmp_path):
    st = tiny_sentence_transformers_dir(tmp_path / "st", seed=1)
    assert load_numpy_encoder(EncoderConfig(path=str(st), dtype="bfloat16")) is None
    assert load_numpy_encoder(EncoderConfig(path=str(st), deltas=(str(_delta(st, tmp_path / "d", "bfloat16")),))) is None
    assert load_numpy_encoder(EncoderConfig(path=str(tiny_dpr_dir(tmp_path / "dpr")))) is None
    assert load_numpy_encoder(EncoderConfig(path=str(tmp_path / "missing"))) is None


def test_packaged_encoder_agrees_and_search_never_imports_torch(tmp_path):
    """The default q(x): vectors within float32 rounding of the torch Encoder, and a `rag search` process
    over a knowledge base built with it loads neither torch nor transformers."""
    config = EncoderConfig(scale=20.0)
    fast = load_numpy_encoder(config)
    assert fast is not None
    np.testing.assert_allclose(fast.encode(TEXTS), load_encoder(config).encode(TEXTS), atol=2e-5)
    from tiny_encoders import write_corpus

    from rag.config import CorpusConfig, IndexConfig
    from rag.knowledge import build_knowledge_base

    corpus = tmp_path / "corpus.jsonl"
    write_corpus(corpus, docs=12)
    build_knowledge_base(CorpusConfig(source=str(corpus)), EncoderConfig(), IndexConfig(), tmp_path / "kb",
                         progress=False)  # fmt: skip
    probe = (
        "import sys; from rag.cli import main; "
        f"code = main(['search', 'capital of angola', '--index', {str(tmp_path / 'kb')!r}, '-k', '2', '--json']); "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'imported torch'; "
        "sys.exit(code)"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count('"rank"') == 2
