from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny_encoders import tiny_bert_dir, tiny_dpr_dir, tiny_sentence_transformers_dir
from transformers import AutoModel

from rag.config import EncoderConfig
from rag.encoders import Encoder, batches_by_length, inspect_encoder_dir, load_encoder, passage_text

TEXTS = [
    "what is the capital of angola?",
    "luanda is the capital and largest city of angola, on the atlantic coast.",
    "a river",
    "the congo river is the deepest river in the world; it flows through the largest country of central africa.",
    "x",
]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="module")
def st_dir(tmp_path_factory):
    return tiny_sentence_transformers_dir(tmp_path_factory.mktemp("st"), seed=1)


def _one_by_one(encoder: Encoder, texts: list[str]) -> np.ndarray:
    """Reference: each text alone, no padding, no sorting."""
    with torch.no_grad():
        return np.stack([encoder(**encoder.tokenize([t]))[0].numpy() for t in texts])


def test_forward_is_differentiable(bert_dir):
    encoder = load_encoder(EncoderConfig(path=str(bert_dir)))
    batch = encoder.tokenize(TEXTS[:3])
    assert encoder.tokenizer.unk_token_id not in batch["input_ids"]  # the tiny vocabulary covers the texts
    out = encoder(**batch)
    assert out.shape == (3, 32) and out.requires_grad
    out.pow(2).sum().backward()
    grads = [p.grad for p in encoder.parameters() if p.grad is not None]
    assert grads and any(g.abs().sum() > 0 for g in grads)


def test_encode_equals_forward_and_keeps_order(bert_dir):
    encoder = load_encoder(EncoderConfig(path=str(bert_dir)))
    expected = _one_by_one(encoder, TEXTS)
    got = encoder.encode(TEXTS, batch_size=2)
    assert got.dtype == np.float32 and got.shape == (len(TEXTS), encoder.dim)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    perm = [3, 0, 4, 2, 1]
    np.testing.assert_allclose(
        encoder.encode([TEXTS[i] for i in perm], batch_size=3), expected[perm], atol=1e-5
    )
    assert torch.is_grad_enabled()  # encode must not leave gradients switched off


def test_batches_by_length_sorts_and_covers_every_row():
    lengths = [5, 1, 9, 3, 9, 2, 7]
    batches = batches_by_length(lengths, 3)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(lengths)))
    assert [sorted(lengths[i] for i in b) for b in batches] == [[7, 9, 9], [2, 3, 5], [1]]
    with pytest.raises(ValueError):
        batches_by_length(lengths, 0)


def test_mean_and_cls_pooling_match_hand_pooling(bert_dir):
    model = AutoModel.from_pretrained(bert_dir).eval()
    mean = load_encoder(EncoderConfig(path=str(bert_dir), pooling="mean"))
    cls = load_encoder(EncoderConfig(path=str(bert_dir), pooling="cls"))
    batch = mean.tokenize(TEXTS)  # padded: the mask matters for the mean
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state.numpy()  # (B, T, D)
    mask = batch["attention_mask"].numpy()
    hand_mean = np.stack([hidden[i, mask[i] == 1].mean(0) for i in range(len(TEXTS))])
    np.testing.assert_allclose(mean.encode(TEXTS), hand_mean, atol=1e-5)
    np.testing.assert_allclose(cls.encode(TEXTS), hidden[:, 0], atol=1e-5)


def test_normalize_option(bert_dir):
    plain = load_encoder(EncoderConfig(path=str(bert_dir)))
    normed = load_encoder(EncoderConfig(path=str(bert_dir), normalize=True))
    a, b = plain.encode(TEXTS), normed.encode(TEXTS)
    assert not np.allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(b, a / np.linalg.norm(a, axis=1, keepdims=True), atol=1e-5)


@pytest.mark.parametrize("pooling,normalize", [("mean", True), ("cls", False)])
def test_sentence_transformers_dir_matches_the_library(tmp_path, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    path = tiny_sentence_transformers_dir(tmp_path / "st", seed=2, pooling=pooling, normalize=normalize)
    layout = inspect_encoder_dir(EncoderConfig(path=str(path)))
    assert (layout.kind, layout.pooling, layout.normalize, layout.max_length) == (
        "sentence-transformers", pooling, normalize, 64,
    )  # fmt: skip
    ours = load_encoder(EncoderConfig(path=str(path))).encode(TEXTS)
    reference = SentenceTransformer(str(path), device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(ours, reference, atol=1e-5)


def test_scale_multiplies_the_output(st_dir):
    plain = load_encoder(EncoderConfig(path=str(st_dir)))
    hot = load_encoder(EncoderConfig(path=str(st_dir), scale=20.0))
    assert hot.scale == 20.0
    np.testing.assert_allclose(hot.encode(TEXTS), 20.0 * plain.encode(TEXTS), rtol=1e-5, atol=1e-5)
    batch = hot.tokenize(TEXTS)
    torch.testing.assert_close(hot(**batch), 20.0 * plain(**batch))


def test_query_and_passage_encoders_have_separate_parameters(st_dir):
    q = load_encoder(EncoderConfig(path=str(st_dir)))
    d = load_encoder(EncoderConfig(path=str(st_dir)))
    np.testing.assert_allclose(q.encode(TEXTS), d.encode(TEXTS), atol=1e-6)  # same start
    with torch.no_grad():
        for p in q.parameters():
            p.add_(0.1 * torch.randn_like(p))
    assert not np.allclose(q.encode(TEXTS), d.encode(TEXTS), atol=1e-3)
    assert {p.data_ptr() for p in q.parameters()}.isdisjoint(p.data_ptr() for p in d.parameters())


@pytest.mark.parametrize("side,projection", [("question", 0), ("context", 16)])
def test_dpr_checkpoint_uses_its_pooler_output(tmp_path, side, projection):
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    path = tiny_dpr_dir(tmp_path / side, side=side, projection_dim=projection)
    assert json.loads((path / "config.json").read_text())["architectures"][0].startswith("DPR")
    encoder = load_encoder(EncoderConfig(path=str(path)))
    assert inspect_encoder_dir(EncoderConfig(path=str(path))).kind == f"dpr-{side}"
    assert encoder.dim == (projection or 32)
    reference_class = DPRQuestionEncoder if side == "question" else DPRContextEncoder
    reference = reference_class.from_pretrained(path).eval()
    with torch.no_grad():
        expected = np.stack([reference(**encoder.tokenize([t])).pooler_output[0].numpy() for t in TEXTS])
    np.testing.assert_allclose(encoder.encode(TEXTS, batch_size=2), expected, atol=1e-5)


def test_bfloat16_encode_stays_close_to_float32(st_dir):
    fp32 = load_encoder(EncoderConfig(path=str(st_dir))).encode(TEXTS)
    half = load_encoder(EncoderConfig(path=str(st_dir), dtype="bfloat16"))
    assert half.dtype == torch.bfloat16 and half(**half.tokenize(TEXTS)).dtype == torch.float32
    bf16 = half.encode(TEXTS)
    assert bf16.dtype == np.float32
    cosine = (fp32 * bf16).sum(1)  # both normalised
    assert cosine.min() > 0.99 and not np.array_equal(fp32, bf16)


def test_bad_encoder_dirs(tmp_path, bert_dir):
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        load_encoder(EncoderConfig(path=str(tmp_path / "missing")))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_encoder(EncoderConfig(path=str(tmp_path / "file")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither modules.json nor config.json"):
        load_encoder(EncoderConfig(path=str(tmp_path / "empty")))
    st = tiny_sentence_transformers_dir(tmp_path / "dense")
    modules = json.loads((st / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (st / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match="Dense"):
        load_encoder(EncoderConfig(path=str(st)))
    dpr = tiny_dpr_dir(tmp_path / "dpr")
    with pytest.raises(ValueError, match="pooler"):
        load_encoder(EncoderConfig(path=str(dpr), pooling="mean"))


def test_passage_text_puts_the_title_first():
    assert passage_text("Angola", "Luanda is its capital.") == "Angola. Luanda is its capital."
    assert passage_text(" ", "only text") == "only text"
    assert passage_text("Only title", "") == "Only title"


@pytest.mark.slow
def test_packaged_minilm_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from rag.resources import resolve_path

    config = EncoderConfig()
    ours = load_encoder(config).encode(TEXTS, batch_size=2)
    reference = SentenceTransformer(str(resolve_path(config.path)), device="cpu").encode(TEXTS)
    np.testing.assert_allclose(ours, reference, atol=1e-5)
