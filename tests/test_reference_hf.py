"""Our RAG against the reference implementation that ships in transformers.

The same random BART / T5 module (shared, not copied) and the same document scores go to both sides;
the reference gets context ids laid out by its own retriever code (tests/hf_reference.py). Losses must
agree to 1e-5 and decoded sequences token for token. The conventions matched here are written up in
/work/notes/hf_reference_facts.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hf_reference import (
    SpecialIds,
    context_inputs,
    generator_config,
    labels_from_targets,
    random_generator,
    reference_generate,
    reference_input_strings,
    reference_loss,
    reference_model,
    special_ids,
    trim,
    word_tokenizer,
)
from transformers import PreTrainedModel, PreTrainedTokenizerFast

from rag import decoding, marginalize
from rag.config import DecodingConfig, GeneratorConfig
from rag.generators import Seq2SeqGenerator
from rag.model import RagModel

K = 4
QUESTIONS = [
    "what is the capital of angola ?",
    "which river is in egypt ?",
    "who is the largest country in africa ?",
]
# quoted title (DPR style) and a double space: both are normalised by the reference layout
DOCS = [
    ('"angola"', "luanda is the capital of  angola"),
    ("paris", "paris is the capital and largest city of france"),
    ("nile", "the nile is a river in egypt and north africa"),
    ("portugal", "lisbon is the capital of portugal , portuguese is spoken"),
]
PASSAGES = [DOCS, DOCS[1:] + DOCS[:1], DOCS[2:] + DOCS[:2]]
# at least two scored tokens each (see test_one_token_targets_are_where_we_differ)
TARGETS = ["luanda", "the nile river in north africa", "egypt is the largest"]
# init scale and seed chosen so that hypotheses differ across passages and some end with eos early
SETTINGS = {"bart": (0.3, 0), "t5": (0.2, 4)}


@dataclass(frozen=True)
class Setup:
    tokenizer: PreTrainedTokenizerFast
    model: PreTrainedModel  # the one transformers module both sides run
    ours: Seq2SeqGenerator
    ids: SpecialIds
    scores: torch.Tensor  # (B, K) document scores q(x).d(z)


@pytest.fixture(scope="module", params=["bart", "t5"])
def setup(request) -> Setup:
    family = request.param
    init_std, seed = SETTINGS[family]
    tokenizer = word_tokenizer(family)
    model = random_generator(generator_config(family, len(tokenizer), init_std=init_std), seed)
    ours = Seq2SeqGenerator(model, tokenizer, GeneratorConfig(path=f"tiny-{family}", max_input_tokens=64))
    scores = torch.Generator().manual_seed(7)
    doc_scores = 2.0 * torch.randn(len(QUESTIONS), K, generator=scores)
    return Setup(tokenizer, model, ours, special_ids(model.config), doc_scores)


def _reference(setup: Setup, kind: str, **config) -> tuple:
    model = reference_model(kind, setup.model, K, **config)
    ids, mask = context_inputs(model, setup.tokenizer, QUESTIONS, PASSAGES)
    return model, ids, mask


def test_input_layout_is_the_reference_retrievers(setup):
    model, ref_ids, ref_mask = _reference(setup, "token")
    inputs = setup.ours.format_inputs(QUESTIONS, PASSAGES)
    assert inputs.texts == reference_input_strings(QUESTIONS, PASSAGES)
    assert inputs.texts[0].startswith("angola / luanda is the capital of angola // what")
    width = inputs.input_ids.shape[1]
    assert torch.equal(inputs.attention_mask, ref_mask[:, :width])
    assert not ref_mask[:, width:].any()
    assert torch.equal(inputs.input_ids, ref_ids[:, :width])


def _training_labels(setup: Setup, targets) -> torch.Tensor:
    """The labels transformers' RAG fine-tuning gives its model. BART: the generator tokenizer's own
    `<s> y </s>` (labels = generator_tokenizer(target), read from bos); T5 has no bos, and its labels are
    [decoder_start] + y </s> (the layout the reference scores every target position with)."""
    if setup.ids.bos is not None:
        labels = setup.tokenizer(TARGETS, padding=True, return_tensors="pt")["input_ids"]
        # exactly our training targets behind bos: the same tokens, the same padding
        assert targets.start == setup.ids.bos
        assert torch.equal(labels, labels_from_targets(targets.ids, setup.ids.bos))
        return labels
    assert targets.start is None
    return labels_from_targets(targets.ids, setup.ids.decoder_start)


@pytest.mark.parametrize("kind", ["token", "sequence"])
@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_losses_equal_the_reference(setup, kind, epsilon):
    model, ref_ids, ref_mask = _reference(setup, kind, label_smoothing=epsilon)
    targets = setup.ours.encode_targets(TARGETS)
    labels = _training_labels(setup, targets)
    expected = reference_loss(model, ref_ids, ref_mask, setup.scores, labels)  # (B,)

    with torch.no_grad():
        rag = RagModel(None, None, setup.ours, kind, K)
        out = rag.score_passages(QUESTIONS, TARGETS, PASSAGES, setup.scores, label_smoothing=epsilon)
        prefix = setup.ours.encode_prefix(setup.ours.format_inputs(QUESTIONS, PASSAGES))
        rows = torch.arange(len(QUESTIONS) * K)
        logprobs = setup.ours.target_logprobs(prefix, rows, targets.select(rows // K))
        logprobs = logprobs.view(len(QUESTIONS), K, *logprobs.shape[1:])  # (B, K, T, V)
        loss_fn = marginalize.rag_token_nll if kind == "token" else marginalize.rag_sequence_nll
        per_example = loss_fn(
            logprobs, marginalize.doc_logprior(setup.scores), targets.ids, targets.mask, epsilon
        )

    assert expected.shape == (len(QUESTIONS),)
    torch.testing.assert_close(per_example, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(out.loss, expected.mean(), rtol=1e-6, atol=1e-5)
    if epsilon == 0.0:
        torch.testing.assert_close(out.nll, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_bart_training_reads_the_tokenizers_labels_not_the_decoder_start(setup, kind):
    """The defect: training targets started from decoder_start_token_id, while transformers' RAG
    fine-tuning (labels = generator_tokenizer(target)) starts from <s>; the losses differed by up to 9%.
    Decoding is untouched: generated hypotheses are still read from decoder_start (rescoring equals the
    reference's generate, tests below)."""
    if setup.ids.bos is None:
        pytest.skip("T5 has no bos: its labels are the generation layout, unchanged")
    model, ref_ids, ref_mask = _reference(setup, kind)
    targets = setup.ours.encode_targets(TARGETS)
    as_trained = reference_loss(model, ref_ids, ref_mask, setup.scores, _training_labels(setup, targets))
    from_start = reference_loss(model, ref_ids, ref_mask, setup.scores,
                                labels_from_targets(targets.ids, setup.ids.decoder_start))  # fmt: skip
    with torch.no_grad():
        ours = RagModel(None, None, setup.ours, kind, K).score_passages(QUESTIONS, TARGETS, PASSAGES, setup.scores)
    torch.testing.assert_close(ours.nll, as_trained, rtol=1e-6, atol=1e-5)
    assert (ours.nll - from_start).abs().max() > 0.05  # the old layout is measurably another loss


def test_one_token_targets_are_where_we_differ(setup):
    """The reference adds log p(z|x) at the second target position, so a target that is only eos loses
    the prior; ours keeps it (the paper's eq. 1). Both are pinned here against a hand computation."""
    model, ref_ids, ref_mask = _reference(setup, "sequence")
    targets = setup.ours.encode_targets([""] * len(QUESTIONS))  # eos only
    assert targets.mask.sum(1).tolist() == [1] * len(QUESTIONS)
    start = setup.ids.decoder_start if targets.start is None else targets.start  # BART's training: <s>
    labels = labels_from_targets(targets.ids, start)
    reference = reference_loss(model, ref_ids, ref_mask, setup.scores, labels)
    with torch.no_grad():
        rag = RagModel(None, None, setup.ours, "sequence", K)
        out = rag.score_passages(QUESTIONS, [""] * len(QUESTIONS), PASSAGES, setup.scores)
        start = labels[:, :1].repeat_interleave(K, 0)  # (B*K, 1) the decoder start token
        logits = setup.model(input_ids=ref_ids, attention_mask=ref_mask, decoder_input_ids=start).logits
    eos_logprob = logits[:, 0].log_softmax(-1)[:, setup.ids.eos].view(len(QUESTIONS), K)  # (B, K)
    prior = setup.scores.log_softmax(-1)
    # a separate forward of another shape: float error grows with these large random logits
    torch.testing.assert_close(reference, -eos_logprob.logsumexp(-1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.nll, -(prior + eos_logprob).logsumexp(-1), rtol=1e-5, atol=1e-5)
    assert (out.nll - reference).abs().min() > 0.01  # the prior really makes a difference here


def _ours(setup: Setup, kind: str, config: DecodingConfig) -> list[list[list[int]]]:
    return decoding.answer(setup.ours, QUESTIONS, PASSAGES, setup.scores, kind, config).sequences


def _grouped(rows: list[list[int]], per_question: int) -> list[list[list[int]]]:
    return [rows[i : i + per_question] for i in range(0, len(rows), per_question)]


@pytest.mark.parametrize(
    ("num_beams", "num_return", "min_new"),
    [(1, 1, 0), (1, 1, 3), (4, 1, 1), (4, 3, 0), (3, 2, 4)],
)
def test_rag_token_decoding_equals_the_reference(setup, num_beams, num_return, min_new):
    max_new = 8
    model, ref_ids, ref_mask = _reference(setup, "token")
    expected = reference_generate(
        model,
        ref_ids,
        ref_mask,
        setup.scores,
        num_beams=num_beams,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        num_return_sequences=num_return,
    )
    config = DecodingConfig(
        num_beams=num_beams, num_return_sequences=num_return, max_new_tokens=max_new, min_new_tokens=min_new
    )
    assert _ours(setup, "token", config) == _grouped(trim(expected, setup.ids), num_return)


@pytest.mark.parametrize(
    ("num_beams", "num_return", "dedup", "min_new"),
    [(1, 1, True, 1), (4, 1, True, 1), (4, 3, True, 2), (2, 3, False, 1)],
)
def test_rag_sequence_thorough_equals_the_reference(setup, num_beams, num_return, dedup, min_new):
    """min_new >= 1 keeps eos-only hypotheses out (the reference scores them without the prior)."""
    max_new = 8
    model, ref_ids, ref_mask = _reference(setup, "sequence", do_deduplication=dedup)
    expected = reference_generate(
        model,
        ref_ids,
        ref_mask,
        setup.scores,
        num_beams=num_beams,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        num_return_sequences=num_return,
    )
    config = DecodingConfig(
        num_beams=num_beams,
        num_return_sequences=num_return,
        max_new_tokens=max_new,
        min_new_tokens=min_new,
        decoding="thorough",
        dedup=dedup,
    )
    assert _ours(setup, "sequence", config) == _grouped(trim(expected, setup.ids), num_return)


def test_comparisons_are_not_degenerate(setup):
    """The cases above only mean something if answers differ and beams end at eos as well as at max length."""
    model, ref_ids, ref_mask = _reference(setup, "token")
    beams = trim(
        reference_generate(
            model, ref_ids, ref_mask, setup.scores, num_beams=4, max_new_tokens=8, num_return_sequences=4
        ),
        setup.ids,
    )
    assert len({tuple(b) for b in beams}) >= 8
    per_passage = setup.model.generate(
        ref_ids,
        attention_mask=ref_mask,
        num_beams=4,
        num_return_sequences=4,
        max_new_tokens=8,
        min_new_tokens=1,
    )
    ends = [row for row in trim(per_passage, setup.ids) if row[-1] == setup.ids.eos and len(row) < 8]
    assert len(ends) >= 5


def test_thorough_equals_the_unpatched_reference_without_padding():
    """tests/hf_reference.py corrects two upstream padding bugs in RagSequenceForGeneration.generate.
    With BART (pad != 0) and inputs of one length there is no padding, so neither correction applies:
    the untouched reference must give the same sequences."""
    tokenizer = word_tokenizer("bart")
    model = random_generator(generator_config("bart", len(tokenizer), init_std=0.3), 0)
    ours = Seq2SeqGenerator(model, tokenizer, GeneratorConfig(path="tiny-bart", max_input_tokens=64))
    questions = ["what is the capital of angola ?", "which river is in north africa ?"]
    docs = [
        ("angola", "luanda is the capital"),
        ("egypt", "cairo is the capital"),
        ("nile", "a river in africa"),
    ]
    passages = [docs, docs[::-1]]
    width = ours.format_inputs(questions, passages).attention_mask
    assert bool(width.all()), "inputs must share one length"
    reference = reference_model("sequence", model, 3, max_combined_length=width.shape[1])
    ref_ids, ref_mask = context_inputs(reference, tokenizer, questions, passages)
    scores = torch.tensor([[0.5, 2.0, -1.0], [1.0, 0.0, 1.5]])
    expected = reference_generate(
        reference,
        ref_ids,
        ref_mask,
        scores,
        num_beams=3,
        max_new_tokens=6,
        min_new_tokens=1,
        num_return_sequences=2,
        corrected=False,
    )
    config = DecodingConfig(num_beams=3, num_return_sequences=2, max_new_tokens=6, min_new_tokens=1)
    got = decoding.answer(ours, questions, passages, scores, "sequence", config).sequences
    assert got == _grouped(trim(expected, special_ids(model.config)), 2)
