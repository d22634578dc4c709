"""Harness around transformers' reference RAG (`RagTokenForGeneration`, `RagSequenceForGeneration`).

Everything runs offline: tiny word-level tokenizers are built in memory, generators and the question
encoder get random weights, and no `RagRetriever` is used. Retrieval is replaced by what the reference
model accepts directly: `context_input_ids` / `context_attention_mask` (laid out by the reference's own
`RagRetriever.postprocess_docs`) and `doc_scores` (B, K). The same generator module and the same
scores are then fed to our implementation, so any difference is a difference in RAG itself.

The facts these helpers encode (label layout, max-length conventions, padding of outputs) are written
up in /work/notes/hf_reference_facts.md.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    DPRConfig,
    DPRQuestionEncoder,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.models.rag.retrieval_rag import RagRetriever

Family = Literal["bart", "t5"]
Kind = Literal["token", "sequence"]
ReferenceModel = RagTokenForGeneration | RagSequenceForGeneration

# Special tokens in the order (and so with the ids) the real BART and T5 vocabularies use.
_SPECIALS: dict[str, tuple[str, ...]] = {
    "bart": ("<s>", "<pad>", "</s>", "<unk>"),
    "t5": ("<pad>", "</s>", "<unk>"),
}

# A small closed vocabulary: passages and questions in tests are written with these words only.
WORDS: tuple[str, ...] = tuple(
    """the a of is in and on to capital city river country largest smallest angola luanda paris
    france lisbon portugal nile egypt cairo africa europe north south river mountain what which who
    where when how many name population people million language spoken portuguese french arabic
    / // ? . ,""".split()
)


@dataclass(frozen=True)
class SpecialIds:
    pad: int
    eos: int
    decoder_start: int
    bos: int | None


def word_tokenizer(family: Family, words: Sequence[str] = WORDS) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer with BART's (`<s> x </s>`) or T5's (`x </s>`) special tokens."""
    specials = _SPECIALS[family]
    ordered = list(dict.fromkeys([*specials, *words]))  # ids stay dense when a word repeats
    vocab = {token: i for i, token in enumerate(ordered)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = ("</s>", vocab["</s>"])
    if family == "bart":
        bos = ("<s>", vocab["<s>"])
        core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[bos, eos])
        return PreTrainedTokenizerFast(
            tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        )
    core.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[eos])
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def generator_config(
    family: Family,
    vocab_size: int,
    *,
    d_model: int = 32,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 64,
    init_std: float = 0.3,
    forced_eos: bool = True,
) -> PretrainedConfig:
    """A BART or T5 configuration; `init_std` well above the default makes random models' next-token
    distributions peaked, so argmax and beam choices are not near-ties that float noise could flip."""
    if family == "bart":
        return BartConfig(
            vocab_size=vocab_size,
            d_model=d_model,
            encoder_layers=layers,
            decoder_layers=layers,
            encoder_attention_heads=heads,
            decoder_attention_heads=heads,
            encoder_ffn_dim=ffn,
            decoder_ffn_dim=ffn,
            max_position_embeddings=1024,
            init_std=init_std,
            dropout=0.0,
            attention_dropout=0.0,
            activation_dropout=0.0,
            # BartConfig's default: the reference forces eos as the last token at max length.
            forced_eos_token_id=2 if forced_eos else None,
        )
    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=ffn,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=heads,
        initializer_factor=init_std / 0.05,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        # T5 has no bos; without the attribute transformers 5.24's RagSequenceForGeneration.get_nll
        # raises AttributeError (it reads `config.generator.bos_token_id`).
        bos_token_id=None,
    )


def special_ids(config: PretrainedConfig) -> SpecialIds:
    start = config.decoder_start_token_id
    return SpecialIds(
        pad=int(config.pad_token_id),
        eos=int(config.eos_token_id),
        decoder_start=int(start if start is not None else config.pad_token_id),
        bos=getattr(config, "bos_token_id", None),
    )


def random_generator(config: PretrainedConfig, seed: int) -> PreTrainedModel:
    """A seq2seq model with random weights drawn under `seed`, in eval mode."""
    torch.manual_seed(seed)
    cls = BartForConditionalGeneration if config.model_type == "bart" else T5ForConditionalGeneration
    return cls(config).eval()


def tiny_question_encoder(seed: int = 0) -> DPRQuestionEncoder:
    """Never run (doc scores are given), but `RagModel` needs one; a tiny one avoids building BERT-base."""
    torch.manual_seed(seed)
    config = DPRConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    return DPRQuestionEncoder(config).eval()


def reference_model(
    kind: Kind,
    generator: PreTrainedModel,
    n_docs: int,
    *,
    label_smoothing: float = 0.0,
    max_combined_length: int = 64,
    do_deduplication: bool = True,
) -> ReferenceModel:
    """The transformers RAG class of `kind` wrapping `generator` itself (shared module, same weights).

    The top-level special ids are set from the generator, as in the released RAG configs: without them
    `RagTokenForGeneration.generate` has no `decoder_start_token_id` for T5.
    """
    ids = special_ids(generator.config)
    config = RagConfig.from_question_encoder_generator_configs(
        tiny_question_encoder().config,
        generator.config,
        n_docs=n_docs,
        label_smoothing=label_smoothing,
        max_combined_length=max_combined_length,
        do_deduplication=do_deduplication,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        decoder_start_token_id=ids.decoder_start,
    )
    cls = RagTokenForGeneration if kind == "token" else RagSequenceForGeneration
    return cls(config=config, question_encoder=tiny_question_encoder(), generator=generator).eval()


def context_inputs(
    model: ReferenceModel,
    tokenizer: PreTrainedTokenizerFast,
    questions: Sequence[str],
    passages: Sequence[Sequence[tuple[str, str]]],
    prefix: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B*K, L): the reference retriever's own layout code
    (`RagRetriever.postprocess_docs`), called without an index. Row b*K + j is question b, passage j."""
    n_docs = len(passages[0])
    docs = [{"title": [t for t, _ in row], "text": [x for _, x in row]} for row in passages]
    retriever = types.SimpleNamespace(config=model.config, generator_tokenizer=tokenizer)
    ids, mask = RagRetriever.postprocess_docs(
        retriever, docs, list(questions), prefix, n_docs, return_tensors="pt"
    )
    return ids, mask


def reference_input_strings(
    questions: Sequence[str], passages: Sequence[Sequence[tuple[str, str]]], prefix: str = ""
) -> list[str]:
    """The strings `postprocess_docs` tokenizes, written out independently of it (checked in tests)."""
    return [
        (prefix + title.removeprefix('"').removesuffix('"') + " / " + text + " // " + question).replace(
            "  ", " "
        )
        for question, row in zip(questions, passages, strict=True)
        for title, text in row
    ]


def labels_from_targets(target_ids: torch.Tensor, decoder_start: int) -> torch.Tensor:
    """Reference labels (N, 1+T) from targets in our layout (N, T: tokens, eos, pads).

    The reference feeds `labels` unshifted as decoder inputs and scores `labels[:, 1:]`, so labels begin
    with the token our decoder reads first: decoder_start for generated hypotheses (and T5), bos for
    BART's training targets, where these labels are exactly generator_tokenizer(target).
    """
    start = torch.full((target_ids.shape[0], 1), decoder_start, dtype=target_ids.dtype)
    return torch.cat([start, target_ids], dim=1)


@torch.no_grad()
def reference_loss(
    model: ReferenceModel,
    context_ids: torch.Tensor,
    context_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Per-example loss (B,): -log p(y|x), label-smoothed by `model.config.label_smoothing`."""
    out = model(
        context_input_ids=context_ids,
        context_attention_mask=context_mask,
        doc_scores=doc_scores,
        labels=labels,
        n_docs=doc_scores.shape[1],
    )
    return out.loss


@torch.no_grad()
def reference_generate(
    model: ReferenceModel,
    context_ids: torch.Tensor,
    context_mask: torch.Tensor,
    doc_scores: torch.Tensor,
    *,
    num_beams: int,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    num_return_sequences: int = 1,
    corrected: bool = True,
) -> torch.Tensor:
    """The reference's generate with our option names mapped onto its conventions.

    RAG-Token's generate never reads `max_new_tokens` (it skips `_prepare_generated_length`), so the
    budget goes in as `max_length` = 1 (decoder start) + max_new_tokens. RAG-Sequence passes its kwargs
    to the generator's own generate, where `max_new_tokens` works.
    """
    common = {
        "context_input_ids": context_ids,
        "context_attention_mask": context_mask,
        "doc_scores": doc_scores,
        "num_beams": num_beams,
        "num_return_sequences": num_return_sequences,
        "n_docs": doc_scores.shape[1],
    }
    if min_new_tokens:
        common["min_new_tokens"] = min_new_tokens
    if isinstance(model, RagTokenForGeneration):
        return model.generate(**common, max_length=1 + max_new_tokens)
    if not corrected:
        return model.generate(**common, max_new_tokens=max_new_tokens)
    with _pad_after_eos(model.generator):
        return model.generate(**common, max_new_tokens=max_new_tokens)


@contextlib.contextmanager
def _pad_after_eos(generator: PreTrainedModel) -> Iterator[None]:
    """Correct two upstream bugs for the duration of one RAG-Sequence generate.

    1. RagSequenceForGeneration calls `generator.generate(ids, attention_mask=None)` expecting the mask
       to be inferred from padding, but transformers 5 infers it for decoder-only models only: the
       per-passage beams would attend to pad tokens. We pass `ids != pad` (what 4.x inferred).
    2. Beam search fills finished rows with `pad_token_id or eos_token_id`, i.e. with eos when pad is 0
       (T5), and the rescoring then counts those fillers as real tokens. Everything after the first
       generated eos is rewritten to pad.
    The rescoring pass itself (`get_nll`, the part that is RAG) is left untouched.
    """
    ids = special_ids(generator.config)
    original = generator.generate

    def generate(inputs: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = inputs.ne(ids.pad).long()
        out = original(inputs, **kwargs)
        is_eos = out[:, 1:] == ids.eos
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0
        out[:, 1:] = out[:, 1:].masked_fill(after_eos, ids.pad)
        return out

    generator.generate = generate
    try:
        yield
    finally:
        del generator.generate


def trim(sequences: torch.Tensor, ids: SpecialIds) -> list[list[int]]:
    """Generated rows (N, 1+L) -> token lists without the decoder start, through the first eos.

    Only what follows an eos is padding (pad, or eos when pad_token_id == 0 in beam search): a row
    without eos ran to the length limit, which is the full width, so it is kept whole (a random model
    may well generate the pad id as a token).
    """
    rows = []
    for row in sequences[:, 1:].tolist():
        rows.append(row[: row.index(ids.eos) + 1] if ids.eos in row else row)
    return rows
