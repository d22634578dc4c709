"""CausalGenerator: decoder-only LMs (Llama, SmolLM2, GPT-2); the prompt is prefilled once into a cache."""

from __future__ import annotations

import copy
import inspect
from dataclasses import replace

import torch
from torch import Tensor, nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

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

CAUSAL_SYSTEM_PROMPT = "Answer the question using the passage. Reply with only the answer, in a few words."
CLOSED_BOOK_SYSTEM_PROMPT = "Answer the question. Reply with only the answer, in a few words."
# The "short-answer" prompt's demonstrations. A 135M instruct model told to "reply with only the answer"
# still answers in a sentence (0% EM on Red-Trivia); shown three bare answers it answers with the span
# and a newline.
SHORT_ANSWER_EXAMPLES = (
    ("Who wrote the novel Moby-Dick?", "Herman Melville"),
    ("In which year did the Berlin Wall fall?", "1989"),
    ("What is the largest planet in the Solar System?", "Jupiter"),
)


class CausalGenerator(Generator):
    """Any AutoModelForCausalLM: the prompt (passage + question) is prefilled once into a key/value cache."""

    family = "causal"

    def __init__(self, model: nn.Module, tokenizer, config: GeneratorConfig) -> None:
        super().__init__(model, tokenizer, config)
        self.chat = config.prompt == "chat"
        if self.chat and not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                f"generator.prompt is 'chat' but the tokenizer of {config.path} has no chat template"
            )
        self.demonstrations = ""
        if config.prompt == "short-answer":
            self.demonstrations = "".join(f"Question: {q}\nAnswer: {a}\n" for q, a in SHORT_ANSWER_EXAMPLES)
        keeps = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.last_logits_only = {"logits_to_keep": 1} if keeps else {}
        if self.chat:
            self.eos_token_id = self._end_of_turn_id()
        else:  # short-answer and plain: the answer is one line (the trained reader's layout is plain)
            self.eos_token_id = self._newline_id()

    def _end_of_turn_id(self) -> int:
        """The first special token the template writes after an assistant message (Llama 3: <|eot_id|>)."""
        marker = "RAGMARKER"
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False
        )
        after = self.tokenizer(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
        special = set(self.tokenizer.all_special_ids)
        return next((int(t) for t in after if t in special), self.eos_token_id)

    def _newline_id(self) -> int:
        """The answer ends where the demonstrations' answers end: at a newline, when that is one token."""
        ids = self.tokenizer("\n", add_special_tokens=False)["input_ids"]
        return int(ids[0]) if len(ids) == 1 else self.eos_token_id

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
        passage = "" if title is None or text is None else f"{title}. {text}\n"
        # The demonstrations sit between passage and question: on 120 Red-Trivia questions (k = 5) this
        # order scored 22.5% EM against 20.0% with the demonstrations first.
        return f"{passage}{self.demonstrations}Question: {question}\nAnswer:"

    def _passage_prompt(self, question: str, title: str, text: str) -> str:
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
        if torch.is_grad_enabled() or len(mask) <= PREFILL_ROWS:
            cache, first = self._prefill(inputs.input_ids, mask)  # training: one forward, one graph
        else:
            cache, first = self._prefill_by_length(inputs.input_ids, mask)
        return Prefix(attention_mask=mask, cache=cache, positions=mask.sum(-1), first_logprobs=first)

    def _prefill(self, ids: Tensor, mask: Tensor) -> tuple[Cache, Tensor]:
        """The prompts' key/value cache and log p(y_1 | prompt) (R, V)."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (R, L): left padding starts each prompt at 0
        # logits_to_keep=1: only the last position's logits are used (not (R, L, V))
        out = self._forward(ids, mask, positions, DynamicCache(), **self.last_logits_only)
        return _cache_of(out), _logsoftmax(out.logits[:, -1])

    def _prefill_by_length(self, ids: Tensor, mask: Tensor) -> tuple[Cache, Tensor]:
        """_prefill in groups of PREFILL_ROWS prompts of similar length, each cut to its own longest: a
        batch's prompts differ in length (passages do), and left padding to the longest of all costs a
        third of the prefill. The groups' caches are laid back into one left-padded cache of the full
        width; the padding positions hold zeros instead of values computed from pad tokens, and the
        attention mask hides both. Each row's numbers are those of a batch without padding
        (tests/test_generators.py: equal to one prefill)."""
        rows, width = mask.shape
        lengths = mask.sum(-1)  # (R,)
        parts = []
        for group in length_groups(mask):
            w = int(lengths[group].max())
            parts.append((group, w, *self._prefill(ids[group, width - w :], mask[group, width - w :])))
        template = parts[0][2]
        if not all(type(layer) is DynamicLayer for _, _, cache, _ in parts for layer in cache.layers):
            return self._prefill(ids, mask)  # another cache layout (sliding windows): one padded batch
        first = parts[0][3].new_empty(rows, parts[0][3].shape[-1])  # (R, V)
        cache = copy.copy(template)
        cache.layers = []
        for i, layer in enumerate(template.layers):
            keys = layer.keys.new_zeros(rows, layer.keys.shape[1], width, layer.keys.shape[-1])  # (R, H, L, d)
            values = layer.values.new_zeros(rows, layer.values.shape[1], width, layer.values.shape[-1])
            for group, w, part, _ in parts:
                keys[group, :, width - w :] = part.layers[i].keys
                values[group, :, width - w :] = part.layers[i].values
            merged = copy.copy(layer)
            merged.keys, merged.values = keys, values
            cache.layers.append(merged)
        for group, _, _, part_first in parts:
            first[group] = part_first
        return cache, first

    def target_logprobs(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        first, later = self._target_forward(prefix, rows, targets)
        return first if later is None else torch.cat([first, _logsoftmax(later)], dim=1)  # (N, T, V)

    def target_logits(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        # The first position's log-probabilities are their own logits (log_softmax leaves them as they are).
        first, later = self._target_forward(prefix, rows, targets)
        return first if later is None else torch.cat([first, later.float()], dim=1)  # (N, T, V)

    def target_token_logprobs(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> Tensor:
        first, later = self._target_forward(prefix, rows, targets)
        out = torch.where(targets.mask[:, :1], first[:, 0].gather(-1, targets.ids[:, :1]), 0.0)  # (N, 1): log-probs
        if later is None:
            return out
        return torch.cat([out, _picked_logprobs(later, targets.ids[:, 1:], targets.mask[:, 1:])], dim=1)  # (N, T)

    def hypotheses_logprobs(self, prefix: Prefix, rows: Tensor, hypotheses: list[list[list[int]]]) -> list[list[float]]:
        """log p(y | prompt) of every hypothesis y (token ids, summed over its tokens) under each prompt row
        rows[p], hypotheses[p] its list (inference only). A row's hypotheses share prefixes (beams part late):
        its fed tokens are laid out as a trie and run in one forward with a tree attention mask (a node sees
        the prompt and its own ancestors, at position prompt + depth), so a shared prefix is computed once
        and the prompt's cache is copied once per row, not once per hypothesis. Equal to teacher-forcing
        each hypothesis alone (tests/test_generators.py) up to rounding. Layers other than DynamicLayer
        (sliding windows) take the per-hypothesis path."""
        assert prefix.cache is not None and prefix.positions is not None and prefix.first_logprobs is not None
        first = prefix.first_logprobs.index_select(0, rows)  # (P, V)
        out = [[float(first[p, y[0]]) for y in hyps] for p, hyps in enumerate(hypotheses)]
        tries = [_Trie(hyps) for hyps in hypotheses]
        width = max(len(t.tokens) for t in tries)
        if width == 0:
            return out
        if not all(type(layer) is DynamicLayer for layer in prefix.cache.layers):
            return self._hypotheses_one_by_one(prefix, rows, hypotheses)
        n_rows, prompt = len(tries), prefix.attention_mask.shape[1]
        ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)
        depth = torch.zeros(n_rows, width, dtype=torch.long)
        sees = torch.eye(width, dtype=torch.bool).repeat(n_rows, 1, 1)  # (P, M, M) a node sees itself...
        for p, trie in enumerate(tries):
            ids[p, : len(trie.tokens)] = torch.tensor(trie.tokens, dtype=torch.long)
            depth[p, : len(trie.tokens)] = torch.tensor(trie.depth, dtype=torch.long)
            for node, parent in enumerate(trie.parent):
                if parent >= 0:  # ...and what its parent sees (parents come first)
                    sees[p, node] |= sees[p, parent]
        device = prefix.attention_mask.device
        seen = torch.cat([prefix.attention_mask.index_select(0, rows).bool()[:, None].expand(-1, width, prompt),
                          sees.to(device)], dim=2)  # (P, M, L + M)  # fmt: skip
        dtype = next(self.model.parameters()).dtype
        mask = torch.zeros(seen.shape, dtype=dtype, device=device).masked_fill_(~seen, torch.finfo(dtype).min)
        positions = prefix.positions.index_select(0, rows)[:, None] + depth.to(device)  # (P, M)
        logits = self._forward(ids.to(device), mask[:, None], positions, _copy_cache(prefix.cache, rows)).logits
        for p, trie in enumerate(tries):
            nodes, targets = trie.scored  # (S,) node whose output predicts targets (S,)
            if not nodes:
                continue
            picked = _logsoftmax(logits[p, nodes]).gather(-1, torch.tensor(targets, device=device)[:, None])[:, 0]
            sums = torch.zeros(len(hypotheses[p])).index_add_(0, torch.tensor(trie.owner), picked.cpu().float())
            out[p] = [a + b for a, b in zip(out[p], sums.tolist(), strict=True)]
        return out

    def _hypotheses_one_by_one(self, prefix: Prefix, rows: Tensor, hypotheses: list[list[list[int]]]) -> list[list[float]]:
        out = []
        for p, hyps in enumerate(hypotheses):
            width = max(len(y) for y in hyps)
            ids = torch.full((len(hyps), width), self.pad_token_id, dtype=torch.long, device=rows.device)
            mask = torch.zeros(len(hyps), width, dtype=torch.bool, device=rows.device)
            for n, y in enumerate(hyps):
                ids[n, : len(y)], mask[n, : len(y)] = torch.tensor(y), True
            picked = self.target_token_logprobs(prefix, rows[p].repeat(len(hyps)), TargetBatch(ids, mask))
            out.append(picked.sum(-1).tolist())
        return out

    def _target_forward(self, prefix: Prefix, rows: Tensor, targets: TargetBatch) -> tuple[Tensor, Tensor | None]:
        """log p(y_1 | prompt) (N, 1, V) from the prefix, and the logits of positions 2..T (N, T-1, V)."""
        assert prefix.cache is not None and prefix.positions is not None and prefix.first_logprobs is not None
        first = prefix.first_logprobs.index_select(0, rows)[:, None]  # (N, 1, V)
        n, t = targets.ids.shape
        if t == 1:
            return first, None
        feed = targets.ids[:, :-1]  # (N, T-1); right padding never reaches an earlier position
        mask = torch.cat([prefix.attention_mask.index_select(0, rows), feed.new_ones(n, t - 1)], dim=1)
        positions = prefix.positions.index_select(0, rows)[:, None] + torch.arange(t - 1, device=feed.device)
        out = self._forward(feed, mask, positions, _copy_cache(prefix.cache, rows))
        return first, out.logits

    def start(self, prefix: Prefix, rows: Tensor, room: int = 0) -> DecodeState:
        assert prefix.cache is not None and prefix.positions is not None and prefix.first_logprobs is not None
        cache = _copy_cache(prefix.cache, rows)
        if room > 0 and all(type(layer) is DynamicLayer and layer.is_initialized for layer in cache.layers):
            cache.layers = [_RoomLayer(layer, room) for layer in cache.layers]
        return DecodeState(
            attention_mask=prefix.attention_mask.index_select(0, rows),
            cache=cache,
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


class _Trie:
    """The fed tokens (all but the last) of a prompt row's hypotheses as a trie, nodes in insertion order
    (a parent before its children). scored: for every (hypothesis, position >= 2) the node whose output
    predicts that position's token, the token, and (owner) the hypothesis it counts for."""

    def __init__(self, hypotheses: list[list[int]]) -> None:
        self.tokens: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        index: dict[tuple[int, ...], int] = {}
        nodes, targets, self.owner = [], [], []
        for h, y in enumerate(hypotheses):
            node = -1
            for t in range(len(y) - 1):
                key = tuple(y[: t + 1])
                if key not in index:
                    index[key] = len(self.tokens)
                    self.tokens.append(y[t])
                    self.parent.append(node)
                    self.depth.append(t)
                node = index[key]
                nodes.append(node)
                targets.append(y[t + 1])
                self.owner.append(h)
        self.scored = (nodes, targets)


class _RoomLayer(DynamicLayer):
    """A decoding cache layer with room: keys / values are views [:, :, :length] of buffers that hold `room`
    more positions, and update() writes the new positions in place instead of concatenating (a copy of the
    whole cache, prompt included, for every generated token). Attention reads the same numbers either way.

    Values stay values (DecodeState): the copies _copy_cache makes share the buffers and a one-element list
    `written` (the length written into them); a copy whose length is behind it continues an older state (a
    state stepped twice) and moves to buffers of its own first. A row selection (reorder) copies the buffers."""

    def __init__(self, layer: DynamicLayer, room: int) -> None:
        super().__init__()
        self.device, self.is_initialized = layer.device, True
        keys, values = layer.keys, layer.values  # (N, H, L, d)
        self._buffers = tuple(torch.cat([t, t.new_zeros(*t.shape[:2], room, t.shape[-1])], dim=2) for t in (keys, values))
        self._length, self._written = keys.shape[2], [keys.shape[2]]
        self._view()

    def _view(self) -> None:
        self.keys, self.values = (t[:, :, : self._length] for t in self._buffers)

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs) -> tuple[Tensor, Tensor]:
        n = key_states.shape[2]
        capacity = self._buffers[0].shape[2]
        if self._written[0] != self._length or self._length + n > capacity:  # an older state, or no room left
            grown = max(capacity, self._length + n)
            self._buffers = tuple(torch.cat([t[:, :, : self._length], t.new_zeros(*t.shape[:2], grown - self._length,
                                                                                   t.shape[-1])], dim=2)
                                  for t in self._buffers)  # fmt: skip
            self._written = [self._length]
        for buffer, new in zip(self._buffers, (key_states, value_states), strict=True):
            buffer[:, :, self._length : self._length + n] = new
        self._length += n
        self._written[0] = self._length
        self._view()
        return self.keys, self.values

    def select_rows(self, rows: Tensor) -> _RoomLayer:
        out = copy.copy(self)
        out._buffers = tuple(t.index_select(0, rows) for t in self._buffers)
        out._written = [self._length]
        out._view()
        return out
