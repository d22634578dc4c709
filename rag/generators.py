"""The generator p_theta(y_i | x, z, y_<i): seq2seq (BART, T5) and decoder-only LMs behind one interface.

INTERFACE CONTRACT (decoding.py, model.py and training.py code against exactly this):

Rows. A batch of B questions with K passages each is laid out row-major: row b*K + j is question b with
its j-th passage. Closed-book use passes K = 1 and no passage.

    gen.format_inputs(questions: list[str], passages: list[list[tuple[str, str]]] | None) -> GeneratorInputs
        passages[b][j] = (title, text). Seq2seq: "title / text // question" (released RAG layout).
        Causal: a prompt holding passage and question (chat template where the model has one).
    gen.encode_targets(targets: list[str]) -> TargetBatch
        ids (N, T) with eos appended, right-padded with pad_token_id; mask (N, T) bool.
    gen.encode_prefix(inputs: GeneratorInputs) -> Prefix
        Runs the part that depends only on (x, z) once: the seq2seq encoder, or the causal prompt
        (prefill, key/value cache). Gradients flow when called under grad.
    gen.target_logprobs(prefix: Prefix, rows: LongTensor (N,), targets: TargetBatch) -> Tensor (N, T, V)
        Teacher-forced log-softmax over the vocabulary for each target position; target n is read
        under prefix row rows[n] (so one prefix serves many hypotheses without re-encoding).
        Position t is the distribution of targets.ids[n, t] given targets.ids[n, :t].
    gen.start(prefix: Prefix, rows: LongTensor (N,)) -> DecodeState
        A decoding state of N rows (row n continues prefix row rows[n]), before any generated token.
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
- Seq2seq targets: the decoder reads [decoder_start_token_id] + ids[:, :-1], exactly what transformers'
  RagTokenForGeneration / RagSequenceForGeneration do with labels = [decoder_start] + ids (they feed
  labels as decoder input and score labels shifted left): `gen.decoder_start_token_id`.
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
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput

from rag.config import GeneratorConfig
from rag.io import atomic_dir
from rag.resources import cache_dir, resolve_path

CAUSAL_SYSTEM_PROMPT = "Answer the question using the passage. Reply with only the answer, in a few words."
CLOSED_BOOK_SYSTEM_PROMPT = "Answer the question. Reply with only the answer, in a few words."


@dataclass(frozen=True)
class GeneratorInputs:
    input_ids: Tensor  # (R, L) long; causal: left-padded
    attention_mask: Tensor  # (R, L) long
    texts: list[str]  # the R formatted inputs, for inspection


@dataclass(frozen=True)
class TargetBatch:
    ids: Tensor  # (N, T) long, eos appended, right-padded with pad_token_id
    mask: Tensor  # (N, T) bool, True on real tokens (eos included)

    def select(self, rows: Tensor) -> TargetBatch:
        return TargetBatch(self.ids.index_select(0, rows), self.mask.index_select(0, rows))


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


class Generator(nn.Module):
    """Shared parts: tokenizer handling, target encoding, the attributes the contract names."""

    family: Literal["seq2seq", "causal"]

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

    def encode_targets(self, targets: list[str]) -> TargetBatch:
        limit = self.generator_config.max_target_tokens - 1
        seqs = [
            self.tokenizer(self._target_text(t), add_special_tokens=False)["input_ids"][:limit]
            + [self.eos_token_id]
            for t in targets
        ]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for n, s in enumerate(seqs):
            ids[n, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[n, : len(s)] = True
        return TargetBatch(ids.to(self.device), mask.to(self.device))

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


class Seq2SeqGenerator(Generator):
    """Any AutoModelForSeq2SeqLM; the encoder reads the released RAG checkpoints' input layout."""

    family = "seq2seq"
    title_sep = " / "
    doc_sep = " // "

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig) -> None:
        super().__init__(model, tokenizer, config)
        self.decoder_start_token_id: int = int(model.config.decoder_start_token_id)
        self.input_prefix: str = getattr(model.config, "prefix", None) or ""

    def format_text(self, question: str, title: str | None, text: str | None) -> str:
        """transformers' RagRetriever.postprocess_docs (cat_input_and_doc), character for character."""
        if title is None or text is None:
            return self.input_prefix + question
        title = title.removeprefix('"').removesuffix('"')
        out = self.input_prefix + title + self.title_sep + text + self.doc_sep + question
        return out.replace("  ", " ")

    def format_inputs(
        self, questions: list[str], passages: list[list[tuple[str, str]]] | None
    ) -> GeneratorInputs:
        self._check_passages(questions, passages)
        if passages is None:
            texts = [self.format_text(q, None, None) for q in questions]
        else:
            texts = [
                self.format_text(q, t, x) for q, ps in zip(questions, passages, strict=True) for t, x in ps
            ]
        return self._tokenize(texts)

    def encode_prefix(self, inputs: GeneratorInputs) -> Prefix:
        encoder = self.model.get_encoder()
        hidden = encoder(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).last_hidden_state
        return Prefix(attention_mask=inputs.attention_mask, hidden=hidden)

    def _decode_forward(self, hidden: Tensor, mask: Tensor, tokens: Tensor, cache: Cache | None):
        return self.model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
            attention_mask=mask,
            decoder_input_ids=tokens,
            **{self.cache_kwarg: cache},
            use_cache=cache is not None,
        )

    def target_logprobs(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        assert prefix.hidden is not None
        start = targets.ids.new_full((targets.ids.shape[0], 1), self.decoder_start_token_id)
        decoder_input = torch.cat([start, targets.ids[:, :-1]], dim=1)  # (N, T)
        out = self._decode_forward(
            prefix.hidden.index_select(0, rows),
            prefix.attention_mask.index_select(0, rows),
            decoder_input,
            None,
        )
        return _logsoftmax(out.logits)  # (N, T, V)

    def start(self, prefix: Prefix, rows: Tensor) -> DecodeState:
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


class CausalGenerator(Generator):
    """Any AutoModelForCausalLM: the prompt (passage + question) is prefilled once into a key/value cache."""

    family = "causal"

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig) -> None:
        super().__init__(model, tokenizer, config)
        self.chat = bool(config.use_chat_template and getattr(tokenizer, "chat_template", None))
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_logits_only = {"logits_to_keep": 1} if keeps else {}
        if self.chat:
            self.eos_token_id = self._end_of_turn_id()

    def _end_of_turn_id(self) -> int:
        """The first special token the template writes after an assistant message (Llama 3: <|eot_id|>)."""
        marker = "RAGMARKER"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = self.tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        return next((int(t) for t in after if t in special), self.eos_token_id)

    def _target_text(self, text: str) -> str:
        # Without a template the prompt ends with "Answer:", so the answer's first word carries its space.
        return text if self.chat else " " + text.lstrip()

    def format_text(self, question: str, title: str | None, text: str | None) -> str:
        if self.chat:
            if title is None or text is None:
                system, user = CLOSED_BOOK_SYSTEM_PROMPT, f"Question: {question}"
            else:
                system, user = CAUSAL_SYSTEM_PROMPT, f"Passage: {title}. {text}\n\nQuestion: {question}"
            messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if title is None or text is None:
            return f"Question: {question}\nAnswer:"
        return f"{title}. {text}\nQuestion: {question}\nAnswer:"

    def _fit_passage(self, question: str, title: str, text: str) -> str:
        """Shorten the passage (never the question or template) so the prompt fits max_input_tokens."""
        limit = self.generator_config.max_input_tokens
        prompt = self.format_text(question, title, text)
        excess = len(self._ids(prompt)) - limit
        if excess <= 0:
            return prompt
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        short = self.tokenizer.decode(ids[: max(len(ids) - excess - 2, 0)])
        return self.format_text(question, title, short)

    def _ids(self, prompt: str) -> list[int]:
        # A chat template writes its own special tokens (BOS included); a plain prompt gets the tokenizer's.
        return self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]

    def _tokenize(self, texts: list[str]) -> GeneratorInputs:
        """Left padding, so every prompt ends in the last column; too long a prompt loses its start."""
        limit = self.generator_config.max_input_tokens
        seqs = [self._ids(t)[-limit:] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s) :] = 1
        return GeneratorInputs(ids.to(self.device), mask.to(self.device), texts)

    def format_inputs(
        self, questions: list[str], passages: list[list[tuple[str, str]]] | None
    ) -> GeneratorInputs:
        self._check_passages(questions, passages)
        if passages is None:
            texts = [self.format_text(q, None, None) for q in questions]
        else:
            texts = [
                self._fit_passage(q, t, x) for q, ps in zip(questions, passages, strict=True) for t, x in ps
            ]
        return self._tokenize(texts)

    def _forward(self, ids: Tensor, mask: Tensor, positions: Tensor, cache: Cache, **extra):
        return self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kwarg: cache},
            **extra,
        )

    def encode_prefix(self, inputs: GeneratorInputs) -> Prefix:
        mask = inputs.attention_mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, L): left padding starts each prompt at 0
        # logits_to_keep=1: only the last position's logits are used (not (R, L, V))
        out = self._forward(inputs.input_ids, mask, positions, DynamicCache(), **self.last_logits_only)
        return Prefix(
            attention_mask=mask,
            cache=_cache_of(out),
            positions=mask.sum(-1),
            first_logprobs=_logsoftmax(out.logits[:, -1]),
        )

    def target_logprobs(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        assert prefix.cache is not None and prefix.positions is not None and prefix.first_logprobs is not None
        first = prefix.first_logprobs.index_select(0, rows)[:, None]  # (N, 1, V)
        n, t = targets.ids.shape
        if t == 1:
            return first
        feed = targets.ids[:, :-1]  # (N, T-1); right padding never reaches an earlier position
        mask = torch.cat([prefix.attention_mask.index_select(0, rows), feed.new_ones(n, t - 1)], dim=1)
        positions = prefix.positions.index_select(0, rows)[:, None] + torch.arange(t - 1, device=feed.device)
        out = self._forward(feed, mask, positions, _copy_cache(prefix.cache, rows))
        return torch.cat([first, _logsoftmax(out.logits)], dim=1)  # (N, T, V)

    def start(self, prefix: Prefix, rows: Tensor) -> DecodeState:
        assert prefix.cache is not None and prefix.positions is not None and prefix.first_logprobs is not None
        return DecodeState(
            attention_mask=prefix.attention_mask.index_select(0, rows),
            cache=_copy_cache(prefix.cache, rows),
            positions=prefix.positions.index_select(0, rows),
            pending=prefix.first_logprobs.index_select(0, rows),
            rows=rows,
        )

    def step(self, state: DecodeState, tokens: Tensor | None) -> tuple[Tensor, DecodeState]:
        if (tokens is None) != (state.steps == 0):
            raise ValueError("step: pass tokens=None on the first call only")
        if tokens is None:
            assert state.pending is not None
            return state.pending, replace(state, pending=None, steps=1)
        assert state.positions is not None
        mask = torch.cat([state.attention_mask, state.attention_mask.new_ones(len(state), 1)], dim=1)
        out = self._forward(tokens[:, None], mask, state.positions[:, None], _copy_cache(state.cache))
        new_state = replace(
            state,
            attention_mask=mask,
            cache=_cache_of(out),
            positions=state.positions + 1,
            steps=state.steps + 1,
        )
        return _logsoftmax(out.logits[:, -1]), new_state

    def reorder(self, state: DecodeState, index: Tensor) -> DecodeState:
        assert state.positions is not None
        return replace(
            state,
            attention_mask=state.attention_mask.index_select(0, index),
            cache=_copy_cache(state.cache, index),
            positions=state.positions.index_select(0, index),
            pending=None if state.pending is None else state.pending.index_select(0, index),
            rows=None if state.rows is None else state.rows.index_select(0, index),
        )


def converted_gguf_dir(gguf: Path, config: GeneratorConfig) -> Path:
    root = Path(config.cache_dir).expanduser() if config.cache_dir else cache_dir()
    return root / "generators" / gguf.stem


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file through transformers once; save safetensors + tokenizer under `out`."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf}: GGUF file does not exist")
    started = time.perf_counter()
    print(f"converting {gguf.name} to safetensors (once) ...", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained: rebuild it without the quantisation marker.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings))
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    with atomic_dir(out) as tmp:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    print(f"converted in {time.perf_counter() - started:.0f} s -> {out}", flush=True)
    return out


def _family(path: Path, config: GeneratorConfig) -> Literal["seq2seq", "causal"]:
    if config.family != "auto":
        return config.family
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{config_file}: no config.json; a generator is a transformers folder or a .gguf"
        )
    try:
        settings = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file}: line {err.lineno}: not valid JSON ({err.msg})") from err
    return "seq2seq" if settings.get("is_encoder_decoder", False) else "causal"


def load_generator(config: GeneratorConfig, device: str | torch.device = "cpu") -> Generator:
    """The generator `config.path` names: a transformers folder (family from config.json) or a .gguf file."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = resolve_path(config.path)
    if path.suffix == ".gguf":
        path = convert_gguf(path, converted_gguf_dir(path, config))
        family: Literal["seq2seq", "causal"] = "causal"
    elif not path.exists():
        raise FileNotFoundError(
            f"{path}: generator path does not exist (GeneratorConfig.path={config.path!r})"
        )
    else:
        family = _family(path, config)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    auto = AutoModelForSeq2SeqLM if family == "seq2seq" else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    cls = Seq2SeqGenerator if family == "seq2seq" else CausalGenerator
    return cls(model, tokenizer, config)
