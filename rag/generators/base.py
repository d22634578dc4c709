"""The generator p_theta(y_i | x, z, y_<i): seq2seq (BART, T5) and decoder-only LMs behind one interface.
This module holds the contract, the value types, the cache helpers and the shared Generator base;
rag.generators re-exports everything (import from there).

INTERFACE CONTRACT (decoding.py, model.py and training.py code against exactly this):

Rows. A batch of B questions with K passages each is laid out row-major: row b*K + j is question b with
its j-th passage. Closed-book use passes K = 1 and no passage.

    gen.format_inputs(questions: list[str], passages: list[list[tuple[str, str]]] | None) -> GeneratorInputs
        passages[b][j] = (title, text). Seq2seq: "title / text // question" (released RAG layout).
        Causal: a prompt holding passage and question (chat template where the model has one).
    gen.encode_targets(targets: list[str], end: bool = True) -> TargetBatch
        ids (N, T) with eos appended (unless end=False), right-padded with pad_token_id; mask (N, T) bool.
    gen.target_ids(text: str) -> list[int]
        The ids one target is taught as, without the end token (one-token class labels check this).
    gen.encode_prefix(inputs: GeneratorInputs) -> Prefix
        Runs the part that depends only on (x, z) once: the seq2seq encoder, or the causal prompt
        (prefill, key/value cache). Gradients flow when called under grad.
    gen.target_logprobs(prefix: Prefix, rows: LongTensor (N,), targets: TargetBatch) -> Tensor (N, T, V)
        Teacher-forced log-softmax over the vocabulary for each target position; target n is read
        under prefix row rows[n] (so one prefix serves many hypotheses without re-encoding).
        Position t is the distribution of targets.ids[n, t] given targets.ids[n, :t].
    gen.target_logits(prefix, rows, targets) -> Tensor (N, T, V)
        The same distributions as unnormalised logits (log_softmax of them is target_logprobs): training
        gathers the targets as logit - logsumexp (rag.marginalize.target_logprobs_from_logits) and never
        keeps a (N, T, V) log-softmax.
    gen.target_token_logprobs(prefix, rows, targets) -> Tensor (N, T)
        log p(targets.ids[n, t] | ...) at the real positions, 0 on padding: the numbers target_logprobs
        gathers, to the bit, with the log-softmax taken only where the mask is set (decoding's
        rescoring keeps no (N, T, V) float tensor).
    gen.start(prefix: Prefix, rows: LongTensor (N,), room: int = 0) -> DecodeState
        A decoding state of N rows (row n continues prefix row rows[n]), before any generated token.
        room: tokens the caller expects to feed; a causal cache then holds them in place (no per-token
        copy of the cache), with the same numbers.
    gen.step(state: DecodeState, tokens: LongTensor (N,) | None) -> tuple[Tensor (N, V), DecodeState]
        Log-softmax of the next token. The first call passes None (distribution of the first target
        token); each later call feeds the tokens just chosen. Uses and extends the key/value cache.
    gen.reorder(state: DecodeState, index: LongTensor (N',)) -> DecodeState
        Select / duplicate rows (beam search), cache included.
    gen.eos_token_id, gen.pad_token_id, gen.vocab_size, gen.tokenizer, gen.family, gen.model (nn.Module)

Refinements (implementation notes, binding too):
- Prefix and DecodeState are values: step / reorder / target_logprobs never change the objects they
  are given (caches are copied shallowly before a forward extends them), so a state may be stepped
  twice or kept for later. `prefix.select(rows)` gives a Prefix of those rows (cache rows copied).
- DecodeState.rows (N,) is the prefix row each decoding row continues. A reorder that keeps every
  row on its prefix row (beam search inside one (question, passage) group) shares the tensors that
  depend only on the prefix (seq2seq: encoder output, its mask, the cross-attention cache) and
  selects only the self-attention cache.
- Seq2seq targets: the decoder reads [start] + ids[:, :-1], where start is TargetBatch.start or else
  `gen.decoder_start_token_id`. transformers' RagTokenForGeneration / RagSequenceForGeneration feed
  labels as decoder input and score them shifted left: given labels = [decoder_start] + ids (generated
  hypotheses, which decoding rescores) they read decoder_start first; given the generator tokenizer's
  labels <s> y </s> (their fine-tuning; BART) they read bos. encode_targets gives training targets
  start = `gen.label_start_token_id` (bos where the tokenizer writes one, else None), so training
  optimises what a released BART RAG checkpoint was trained on; T5 (no bos) is unchanged.
- Causal targets: the prompt ends where the target starts (left padding). Without a chat template the
  target is tokenised with a leading space (the prompt ends with "Answer:"); with one, eos is the
  template's end-of-turn token (SmolLM2: <|im_end|>). Decode generated ids with
  `gen.decode(ids)` (strips that space and special tokens).
- gen.generator_config (GeneratorConfig) and gen.device; Generator is an nn.Module holding `model`,
  so a RagModel that holds the generator trains and moves it.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, EncoderDecoderCache

from rag.config import GeneratorConfig


@dataclass(frozen=True)
class GeneratorInputs:
    input_ids: Tensor  # (R, L) long; causal: left-padded
    attention_mask: Tensor  # (R, L) long
    texts: list[str]  # the R formatted inputs, for inspection


@dataclass(frozen=True)
class TargetBatch:
    ids: Tensor  # (N, T) long, eos appended, right-padded with pad_token_id
    mask: Tensor  # (N, T) bool, True on real tokens (eos included)
    # seq2seq: the token the decoder reads before ids[:, 0] when these targets are teacher-forced; None:
    # the model's decoder_start_token_id. Training targets of a tokenizer that writes bos (BART) start
    # from bos, as transformers' RAG fine-tuning does with labels = generator_tokenizer(target).
    start: int | None = None

    def select(self, rows: Tensor) -> TargetBatch:
        return TargetBatch(self.ids.index_select(0, rows), self.mask.index_select(0, rows), self.start)


@dataclass(frozen=True)
class Prefix:
    """What depends only on (x, z): R rows."""

    attention_mask: Tensor  # (R, L) encoder (seq2seq) or prompt (causal) mask
    hidden: Tensor | None = None  # seq2seq: encoder output (R, L, H)
    cache: Cache | None = None  # causal: the prompt's key/value cache
    positions: Tensor | None = None  # causal: (R,) position id of the first target token
    first_logprobs: Tensor | None = None  # causal: (R, V) log p(y_1 | prompt)

    def __len__(self) -> int:
        return self.attention_mask.shape[0]

    def select(self, rows: Tensor) -> Prefix:
        """The prefix of rows `rows` (R',): tensors index-selected, cache rows copied."""

        def pick(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.index_select(0, rows)

        return Prefix(
            attention_mask=self.attention_mask.index_select(0, rows),
            hidden=pick(self.hidden),
            cache=None if self.cache is None else _copy_cache(self.cache, rows),
            positions=pick(self.positions),
            first_logprobs=pick(self.first_logprobs),
        )


@dataclass(frozen=True)
class DecodeState:
    """N decoding rows; `steps` tokens fed so far (seq2seq counts decoder_start as step 1)."""

    attention_mask: Tensor  # seq2seq: encoder mask (N, L); causal: prompt + generated mask (N, L + t)
    cache: Cache
    steps: int = 0
    hidden: Tensor | None = None  # seq2seq: encoder output (N, L, H)
    positions: Tensor | None = None  # causal: (N,) position id of the next token fed
    pending: Tensor | None = None  # causal: (N, V) first-token log-probs, returned by step(None)
    rows: Tensor | None = None  # (N,) the prefix row each decoding row continues

    def __len__(self) -> int:
        return self.attention_mask.shape[0]


def _copy_cache(cache: Cache, rows: Tensor | None = None) -> Cache:
    """A new cache object holding the same tensors (or their rows `rows`): a forward extends the copy,
    not `cache`. Layer objects are copied shallowly, never their tensors: DynamicCache(pairs) would
    concatenate every layer into fresh memory (DynamicLayer.update), a full copy at every step."""
    if isinstance(cache, EncoderDecoderCache):
        # its constructor marks cross-attention layers that hold keys as computed: they are reused
        return EncoderDecoderCache(
            _copy_cache(cache.self_attention_cache, rows), _copy_cache(cache.cross_attention_cache, rows)
        )
    filled = [layer for layer in cache.layers if layer.is_initialized]
    if rows is not None and filled and _is_identity(rows, filled[0].keys.shape[0]):
        rows = None  # every row once, in order (training): share the tensors, copy nothing
    out = copy.copy(cache)
    out.layers = [_copy_layer(layer, rows) for layer in cache.layers]
    return out


def _copy_layer(layer, rows: Tensor | None):
    if rows is not None and hasattr(layer, "select_rows"):  # a layer that lays out its own tensors
        return layer.select_rows(rows)
    out = copy.copy(layer)  # update() rebinds keys/values of the copy; the original's tensors stay
    if rows is not None and layer.is_initialized:
        out.keys, out.values = layer.keys.index_select(0, rows), layer.values.index_select(0, rows)
    return out


def _is_identity(rows: Tensor, n: int) -> bool:
    return rows.shape[0] == n and bool((rows == torch.arange(n, device=rows.device)).all())


def _cache_of(output) -> Cache:
    # transformers 5 renamed past_key_values to cache (inputs and outputs)
    cache = output.get("cache")
    return cache if cache is not None else output.past_key_values


def _logsoftmax(logits: Tensor) -> Tensor:
    return torch.log_softmax(logits.float(), dim=-1)


PREFILL_ROWS = 8  # inference encodes / prefills inputs in groups of this many, by length (length_groups)


def length_groups(mask: Tensor) -> list[Tensor]:
    """Rows of an (R, L) attention mask ordered by length, longest first, in groups of PREFILL_ROWS: each
    group run cut to its own longest costs the padding of similar lengths only (a batch's passages differ)."""
    order = torch.argsort(mask.sum(-1), descending=True, stable=True)
    return [order[i : i + PREFILL_ROWS] for i in range(0, mask.shape[0], PREFILL_ROWS)]


def _picked_logprobs(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """(N, T, V) logits -> (N, T) log_softmax at ids, 0 where mask is False. The log-softmax runs on the
    masked positions only; each position's numbers are those of _logsoftmax on the whole tensor (the
    softmax is taken per position)."""
    out = logits.new_zeros(ids.shape, dtype=torch.float32)  # (N, T)
    real = _logsoftmax(logits[mask])  # (M, V)
    out[mask] = real.gather(-1, ids[mask][:, None]).squeeze(-1)
    return out


class Generator(nn.Module):
    """Shared parts: tokenizer handling, target encoding, the attributes the contract names."""

    family: Literal["seq2seq", "causal"]

    label_start_token_id: int | None = None  # see TargetBatch.start (seq2seq sets it)

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig) -> None:
        super().__init__()
        self.model = model
        if tokenizer.pad_token is None and tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token  # GPT-2 style models: padding is masked anyway
        self.tokenizer = tokenizer
        self.generator_config = config
        text_config = model.config.get_text_config()
        self.vocab_size: int = int(text_config.vocab_size)
        eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else text_config.eos_token_id
        self.eos_token_id: int = int(eos)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else text_config.pad_token_id
        self.pad_token_id: int = int(pad) if pad is not None else self.eos_token_id
        params = inspect.signature(model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _target_text(self, text: str) -> str:
        return text

    @staticmethod
    def _check_passages(questions: list[str], passages: list[list[tuple[str, str]]] | None) -> None:
        if passages is None:
            return
        if len(passages) != len(questions):
            raise ValueError(f"format_inputs: {len(questions)} questions but {len(passages)} passage lists")
        if len({len(p) for p in passages}) > 1 or (passages and not passages[0]):
            raise ValueError("format_inputs: every question needs the same number K >= 1 of passages")

    def format_inputs(
        self, questions: list[str], passages: list[list[tuple[str, str]]] | None
    ) -> GeneratorInputs:
        """Rows b*K + j: question b with its j-th passage (title, text); passages=None is closed book."""
        self._check_passages(questions, passages)
        if passages is None:
            texts = [self.format_text(q, None, None) for q in questions]
        else:
            texts = [
                self._passage_prompt(q, t, x)
                for q, ps in zip(questions, passages, strict=True)
                for t, x in ps
            ]
        return self._tokenize(texts)

    def format_text(self, question: str, title: str | None, text: str | None) -> str:
        raise NotImplementedError

    def _passage_prompt(self, question: str, title: str, text: str) -> str:
        """One (question, passage) input; a family that must fit a length budget overrides this."""
        return self.format_text(question, title, text)

    def target_ids(self, text: str) -> list[int]:
        """The token ids a target string is taught as, without the end token (a causal prompt ends with
        "Answer:", so its targets start with a space: " true" is another token than "true")."""
        return self.tokenizer(self._target_text(text), add_special_tokens=False)["input_ids"]

    def encode_targets(self, targets: list[str], end: bool = True) -> TargetBatch:
        """(B, T) target ids and mask; `end` appends the end token (one-token class labels go without it,
        so that a label is a target of length 1, on which RAG-Sequence and RAG-Token coincide)."""
        limit = self.generator_config.max_target_tokens - int(end)
        seqs = [self.target_ids(t)[:limit] + ([self.eos_token_id] if end else []) for t in targets]
        if not all(seqs):
            raise ValueError("encode_targets: an empty target without an end token has nothing to score")
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for n, s in enumerate(seqs):
            ids[n, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[n, : len(s)] = True
        return TargetBatch(ids.to(self.device), mask.to(self.device), self.label_start_token_id)

    def decode(self, ids: list[int] | Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True).strip()

    def _tokenize(self, texts: list[str]) -> GeneratorInputs:
        # Right padding and right truncation, as transformers' RagRetriever tokenises the encoder input.
        enc = self.tokenizer(
            texts,
            padding=True,
            truncation=True,
            max_length=self.generator_config.max_input_tokens,
            padding_side="right",
            return_tensors="pt",
        )
        return GeneratorInputs(enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device), texts)
