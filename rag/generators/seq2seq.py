"""Seq2SeqGenerator: BART, T5 and any AutoModelForSeq2SeqLM, reading the released RAG input layout."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from rag.config import GeneratorConfig
from rag.generators.base import (
    PREFILL_ROWS,
    DecodeState,
    Generator,
    GeneratorInputs,
    Prefix,
    TargetBatch,
    _cache_of,
    _copy_cache,
    _logsoftmax,
    _picked_logprobs,
    length_groups,
)


class Seq2SeqGenerator(Generator):
    """Any AutoModelForSeq2SeqLM; the encoder reads the released RAG checkpoints' input layout."""

    family = "seq2seq"
    title_sep = " / "
    doc_sep = " // "

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig) -> None:
        super().__init__(model, tokenizer, config)
        self.decoder_start_token_id: int = int(model.config.decoder_start_token_id)
        self.input_prefix: str = getattr(model.config, "prefix", None) or ""
        # A tokenizer that writes bos before a text (BART's <s> y </s>): training targets start from bos,
        # as transformers' RAG fine-tuning reads labels = generator_tokenizer(target) (TargetBatch.start)
        bos = tokenizer.bos_token_id
        written = tokenizer("x", add_special_tokens=True)["input_ids"]
        self.label_start_token_id = int(bos) if bos is not None and written and written[0] == bos else None

    def format_text(self, question: str, title: str | None, text: str | None) -> str:
        """transformers' RagRetriever.postprocess_docs (cat_input_and_doc), character for character."""
        if title is None or text is None:
            return self.input_prefix + question
        title = title.removeprefix('"').removesuffix('"')
        out = self.input_prefix + title + self.title_sep + text + self.doc_sep + question
        return out.replace("  ", " ")

    def encode_prefix(self, inputs: GeneratorInputs) -> Prefix:
        encoder = self.model.get_encoder()
        ids, mask = inputs.input_ids, inputs.attention_mask
        if torch.is_grad_enabled() or len(mask) <= PREFILL_ROWS:  # training: one forward, one graph
            return Prefix(attention_mask=mask, hidden=encoder(input_ids=ids, attention_mask=mask).last_hidden_state)
        # Inference: groups of similar length, each cut to its own longest (right padding: the first w
        # columns), laid back into one (R, L, H) output with zeros where padding was (the mask hides it).
        hidden = None
        for group in length_groups(mask):
            w = int(mask[group].sum(-1).max())
            part = encoder(input_ids=ids[group, :w], attention_mask=mask[group, :w]).last_hidden_state  # (g, w, H)
            if hidden is None:
                hidden = part.new_zeros(*mask.shape, part.shape[-1])
            hidden[group, :w] = part * mask[group, :w, None]  # (a group's shorter rows: zeros past their end)
        return Prefix(attention_mask=mask, hidden=hidden)

    def _decode_forward(self, hidden: Tensor, mask: Tensor, tokens: Tensor, cache: Cache | None):
        return self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=tokens,
            **{self.cache_kwarg: cache},
            use_cache=cache is not None,
        )

    def target_logprobs(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        return _logsoftmax(self.target_logits(prefix, rows, targets))  # (N, T, V)

    def target_token_logprobs(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        if torch.is_grad_enabled():
            return _picked_logprobs(self.target_logits(prefix, rows, targets), targets.ids, targets.mask)  # (N, T)
        # Inference (decoding's rescoring: many hypotheses under few prefix rows): the cross-attention keys
        # and values depend only on the prefix row, so they are computed once per distinct row (a one-token
        # decoder pass fills them) and read from the cache by every hypothesis, not projected again for each.
        assert prefix.hidden is not None
        unique, inverse = torch.unique(rows, return_inverse=True)  # (U,), (N,)
        hidden, mask = prefix.hidden.index_select(0, unique), prefix.attention_mask.index_select(0, unique)
        start = torch.full((len(unique), 1), self.decoder_start_token_id, dtype=torch.long, device=rows.device)
        filled = _cache_of(self._decode_forward(hidden, mask, start, EncoderDecoderCache(DynamicCache(), DynamicCache())))
        cache = EncoderDecoderCache(DynamicCache(), _copy_cache(filled.cross_attention_cache, inverse))
        logits = self._decode_forward(hidden.index_select(0, inverse), mask.index_select(0, inverse),
                                      self._decoder_input(targets), cache).logits  # (N, T, V)
        return _picked_logprobs(logits, targets.ids, targets.mask)  # (N, T)

    def _decoder_input(self, targets: TargetBatch) -> Tensor:
        first = self.decoder_start_token_id if targets.start is None else targets.start
        start = targets.ids.new_full((targets.ids.shape[0], 1), first)
        return torch.cat([start, targets.ids[:, :-1]], dim=1)  # (N, T)

    def target_logits(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        assert prefix.hidden is not None
        out = self._decode_forward(
            prefix.hidden.index_select(0, rows),
            prefix.attention_mask.index_select(0, rows),
            self._decoder_input(targets),
            None,
        )
        return out.logits  # (N, T, V)

    def start(self, prefix: Prefix, rows: Tensor, room: int = 0) -> DecodeState:  # room: the causal cache's
        assert prefix.hidden is not None
        return DecodeState(
            attention_mask=prefix.attention_mask.index_select(0, rows),
            cache=EncoderDecoderCache(DynamicCache(), DynamicCache()),
            hidden=prefix.hidden.index_select(0, rows),
            rows=rows,
        )

    def step(self, state: DecodeState, tokens: Tensor | None) -> tuple[Tensor, DecodeState]:
        if (tokens is None) != (state.steps == 0):
            raise ValueError("step: pass tokens=None on the first call only")
        if tokens is None:
            tokens = torch.full(
                (len(state),), self.decoder_start_token_id, dtype=torch.long, device=self.device
            )
        assert state.hidden is not None
        out = self._decode_forward(
            state.hidden, state.attention_mask, tokens[:, None], _copy_cache(state.cache)
        )
        new_state = replace(state, cache=_cache_of(out), steps=state.steps + 1)
        return _logsoftmax(out.logits[:, -1]), new_state

    def reorder(self, state: DecodeState, index: Tensor) -> DecodeState:
        assert state.hidden is not None and state.rows is not None
        rows = state.rows.index_select(0, index)
        cache = state.cache
        if torch.equal(rows, state.rows) and isinstance(cache, EncoderDecoderCache):
            # Every row stays on its prefix row: encoder output, mask and cross-attention keys are
            # row for row what they were; only the generated tokens' cache moves.
            moved = EncoderDecoderCache(
                _copy_cache(cache.self_attention_cache, index), _copy_cache(cache.cross_attention_cache)
            )
            return replace(state, cache=moved)
        return replace(
            state,
            attention_mask=state.attention_mask.index_select(0, index),
            hidden=state.hidden.index_select(0, index),
            cache=_copy_cache(cache, index),
            rows=rows,
        )
