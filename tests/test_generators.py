"""Generators: input layout, cached scoring against plain full forwards, incremental decoding, loading."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
import torch
from tiny_generators import tiny_bart, tiny_generator, tiny_llama, tiny_short_answer_llama

from rag.config import GeneratorConfig
from rag.generators import (
    SHORT_ANSWER_EXAMPLES,
    CausalGenerator,
    Seq2SeqGenerator,
    TargetBatch,
    _copy_cache,
    converted_gguf_dir,
    load_generator,
)
from rag.resources import resolve_path, wiki_summaries_path

NAMES = ["bart", "t5", "llama", "llama-chat", "llama-short-answer", "gpt2"]
QUESTIONS = ["what is the capital of angola ?", "who wrote the book ?"]
PASSAGES = [
    [("angola", "luanda is the capital city of angola"), ("france", "paris")],
    [("book", "one two three the book was born in the year one"), ("portugal", "lisbon")],
]
TARGETS = ["luanda", "the capital city of angola", "paris", "one"]
ROWS = torch.tensor([0, 3, 1, 3])  # row n of TARGETS read under (question, passage) row ROWS[n]


def _prefix_and_targets(gen):
    inputs = gen.format_inputs(QUESTIONS, PASSAGES)
    return inputs, gen.encode_prefix(inputs), gen.encode_targets(TARGETS)


def _reference_logprobs(gen, inputs, row: int, target: torch.Tensor) -> torch.Tensor:
    """One plain forward, no cache, no padding: (len(target), V)."""
    prompt = inputs.input_ids[row][inputs.attention_mask[row].bool()][None]
    if isinstance(gen, Seq2SeqGenerator):
        start = torch.tensor([[gen.model.config.decoder_start_token_id]])
        logits = gen.model(
            input_ids=prompt, decoder_input_ids=torch.cat([start, target[None, :-1]], 1)
        ).logits[0]
    else:
        full = torch.cat([prompt, target[None]], 1)
        logits = gen.model(input_ids=full).logits[0, prompt.shape[1] - 1 : -1]
    return torch.log_softmax(logits, -1)


def test_seq2seq_layout_is_the_released_rag_layout():
    gen = tiny_bart()
    # Hand-written from transformers' RagRetriever.postprocess_docs: quotes stripped from the title,
    # " / " and " // " separators, every double space collapsed once.
    assert gen.format_text("who?", '"Angola"', "A  country") == "Angola / A country // who?"
    gen.input_prefix = "question: "
    assert gen.format_text("who?", "T", "x") == "question: T / x // who?"
    assert gen.format_text("who?", None, None) == "question: who?"
    gen.input_prefix = ""
    inputs = gen.format_inputs(QUESTIONS, PASSAGES)
    assert inputs.texts[1] == "france / paris // what is the capital of angola ?"
    assert inputs.input_ids.shape[0] == 4


@pytest.mark.parametrize("name", NAMES)
def test_target_logprobs_equal_a_full_forward(name):
    gen = tiny_generator(name)
    inputs, prefix, targets = _prefix_and_targets(gen)
    with torch.no_grad():
        got = gen.target_logprobs(prefix, ROWS, targets)  # (N, T, V)
        assert got.shape == (*targets.ids.shape, gen.vocab_size)
        for n, row in enumerate(ROWS.tolist()):
            length = int(targets.mask[n].sum())
            want = _reference_logprobs(gen, inputs, row, targets.ids[n, :length])
            torch.testing.assert_close(got[n, :length], want, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_target_token_logprobs_are_the_gathered_target_logprobs(name):
    """Taken only at the real positions, the targets' log-probabilities are those of the whole (N, T, V)
    log-softmax to the bit (rescoring in decoding sums them), and 0 on padding. Seq2seq computes the
    cross-attention keys once per distinct prefix row (ROWS repeats row 3) and reads them from the cache."""
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    assert not bool(targets.mask.all()), "targets of different lengths: padding must be there to skip"
    with torch.no_grad():
        full = gen.target_logprobs(prefix, ROWS, targets).gather(-1, targets.ids[:, :, None]).squeeze(-1)
        got = gen.target_token_logprobs(prefix, ROWS, targets)  # (N, T)
    assert torch.equal(got, torch.where(targets.mask, full, 0.0))


@pytest.mark.parametrize("name", ["llama", "llama-chat", "llama-short-answer", "gpt2"])
def test_hypotheses_as_a_trie_equal_teacher_forcing_each_alone(name):
    """Causal rescoring feeds each prompt row's hypotheses as one trie with a tree attention mask: every
    hypothesis's log p(y|prompt) equals teacher-forcing it alone (shared prefixes, a prefix of another
    hypothesis, a duplicate, one-token hypotheses, rows with different trie sizes)."""
    gen = tiny_generator(name)
    _, prefix, _ = _prefix_and_targets(gen)
    hypotheses = [[[5, 6, 7, 8], [5, 6, 9], [5, 6], [5, 6, 7, 8], [10]], [[11]], [[7, 8, 9, 10, 11, 12], [7, 12]]]
    rows = torch.tensor([0, 3, 1])
    with torch.no_grad():
        got = gen.hypotheses_logprobs(prefix, rows, hypotheses)
        for p, hyps in enumerate(hypotheses):
            for y, value in zip(hyps, got[p], strict=True):
                alone = gen.target_token_logprobs(prefix, rows[p : p + 1], TargetBatch(torch.tensor([y]), torch.ones(1, len(y), dtype=torch.bool)))
                assert value == pytest.approx(float(alone.sum()), abs=1e-4)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoding_with_room_gives_the_same_numbers_and_states_stay_values(name):
    """start(..., room=n) writes generated tokens into the cache in place: every step's distribution is
    the one without room to the bit (also past the room, and after a reorder), and an older state stepped
    again (a second continuation) still gives its own numbers."""
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    index = torch.tensor([1, 1, 3, 0])
    with torch.no_grad():
        states = {room: gen.start(prefix, ROWS, room=room) for room in (0, 2)}
        got: dict[int, list[torch.Tensor]] = {0: [], 2: []}
        kept = {}
        for room, state in states.items():
            logprobs, state = gen.step(state, None)
            got[room].append(logprobs)
            for t in range(1, targets.ids.shape[1]):
                if t == 2:
                    kept[room] = state
                    state = gen.reorder(state, index)
                tokens = targets.ids[:, t - 1] if t < 2 else targets.ids[index, t - 1]
                logprobs, state = gen.step(state, tokens)
                got[room].append(logprobs)
            first, first_state = gen.step(kept[room], targets.ids[:, 1])  # the older state, continued again
            second, _ = gen.step(kept[room], targets.ids[:, 2])  # and once more, otherwise
            got[room] += [first, second, gen.step(first_state, targets.ids[:, 0])[0]]  # the first goes on
    assert targets.ids.shape[1] > 3, "the targets must outgrow the room"
    assert all(torch.equal(a, b) for a, b in zip(got[0], got[2], strict=True))
    assert not torch.equal(got[2][-2], got[2][-3])


@pytest.mark.parametrize("name", NAMES)
def test_step_by_step_equals_teacher_forcing(name):
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    with torch.no_grad():
        forced = gen.target_logprobs(prefix, ROWS, targets)
        state = gen.start(prefix, ROWS)
        logprobs, state = gen.step(state, None)
        torch.testing.assert_close(logprobs, forced[:, 0], atol=1e-5, rtol=0)
        for t in range(1, targets.ids.shape[1]):
            logprobs, state = gen.step(state, targets.ids[:, t - 1])
            torch.testing.assert_close(logprobs, forced[:, t], atol=1e-5, rtol=0)
        with pytest.raises(ValueError):
            gen.step(gen.start(prefix, ROWS), targets.ids[:, 0])


@pytest.mark.parametrize("name", NAMES)
def test_reorder_selects_rows_and_states_stay_unchanged(name):
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    index = torch.tensor([1, 1, 3, 0, 2])  # duplicates and drops rows, as beam search does
    with torch.no_grad():
        want = gen.target_logprobs(prefix, ROWS[index], targets.select(index))
        _, state = gen.step(gen.start(prefix, ROWS), None)
        _, state = gen.step(state, targets.ids[:, 0])
        before, _ = gen.step(state, targets.ids[:, 1])
        moved = gen.reorder(state, index)
        got, _ = gen.step(moved, targets.ids[index, 1])
        torch.testing.assert_close(got, want[:, 2], atol=1e-5, rtol=0)
        # Stepping and reordering made new states: the old one still gives the same distribution.
        again, _ = gen.step(state, targets.ids[:, 1])
        torch.testing.assert_close(again, before, atol=0, rtol=0)


@pytest.mark.parametrize("name", ["bart", "t5", "llama"])
def test_reorder_within_prefix_rows_shares_what_only_the_prefix_decides(name):
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    rows = torch.tensor([0, 0, 3, 3])  # two beams on each of two (question, passage) rows
    index = torch.tensor([1, 1, 3, 2])  # beam search: every new row continues a row of its prefix row
    with torch.no_grad():
        want = gen.target_logprobs(prefix, rows, targets.select(index))
        _, state = gen.step(gen.start(prefix, rows), None)
        _, state = gen.step(state, targets.ids[:, 0])
        moved = gen.reorder(state, index)
        got, _ = gen.step(moved, targets.ids[index, 1])
    torch.testing.assert_close(got, want[:, 2], atol=1e-5, rtol=0)
    if gen.family == "seq2seq":
        assert moved.hidden is state.hidden and moved.attention_mask is state.attention_mask
        cross = [layer.keys for layer in state.cache.cross_attention_cache.layers]
        kept = [layer.keys for layer in moved.cache.cross_attention_cache.layers]
        assert cross and all(a is b for a, b in zip(cross, kept, strict=True))
    else:  # the causal cache holds prompt and generated tokens in one tensor per layer: all rows move
        assert torch.equal(moved.rows, rows)


@pytest.mark.parametrize("name", ["bart", "llama-chat"])
def test_prefix_select_equals_reading_the_rows_in_place(name):
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    picked = prefix.select(ROWS)
    assert len(picked) == len(ROWS)
    with torch.no_grad():
        want = gen.target_logprobs(prefix, ROWS, targets)
        got = gen.target_logprobs(picked, torch.arange(len(ROWS)), targets)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        # the selection copied its rows: stepping it leaves the original prefix usable and unchanged
        _, state = gen.step(gen.start(picked, torch.arange(len(ROWS))), None)
        gen.step(state, targets.ids[:, 0])
        torch.testing.assert_close(gen.target_logprobs(prefix, ROWS, targets), want, atol=0, rtol=0)


def test_cache_copies_share_tensors_and_forwards_leave_the_original_alone():
    gen = tiny_llama()
    _, prefix, targets = _prefix_and_targets(gen)
    copied = _copy_cache(prefix.cache)
    assert all(a.keys is b.keys for a, b in zip(prefix.cache.layers, copied.layers, strict=True))
    lengths = [layer.keys.shape[-2] for layer in prefix.cache.layers]
    with torch.no_grad():
        _, state = gen.step(gen.start(prefix, torch.arange(len(prefix))), None)
        gen.step(state, targets.ids[:, 0])
    assert [layer.keys.shape[-2] for layer in prefix.cache.layers] == lengths


def test_targets_end_with_eos_and_chat_models_end_the_turn():
    gen = tiny_bart()
    batch = gen.encode_targets(["luanda", "the capital city"])
    vocab = gen.tokenizer.get_vocab()
    assert batch.ids.tolist() == [
        [vocab["luanda"], 2, 1, 1],
        [vocab["the"], vocab["capital"], vocab["city"], 2],
    ]
    assert batch.mask.tolist() == [[True, True, False, False], [True] * 4]
    chat = tiny_llama(chat=True)
    assert chat.eos_token_id == chat.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.encode_targets(["paris"]).ids[0, -1].item() == chat.eos_token_id
    plain = tiny_llama()
    assert plain.eos_token_id == 2


def test_short_answer_prompt_shows_bare_answers_and_ends_the_answer_at_a_newline():
    gen = tiny_short_answer_llama()
    newline = gen.tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert len(newline) == 1 and gen.eos_token_id == newline[0] != gen.tokenizer.eos_token_id
    closed, with_passage = (
        gen.format_inputs(QUESTIONS[:1], None),
        gen.format_inputs(QUESTIONS[:1], [[PASSAGES[0][0]]]),
    )
    demos = "".join(f"Question: {q}\nAnswer: {a}\n" for q, a in SHORT_ANSWER_EXAMPLES)
    assert closed.texts[0] == f"{demos}Question: {QUESTIONS[0]}\nAnswer:"
    title, text = PASSAGES[0][0]
    assert with_passage.texts[0] == f"{title}. {text}\n{demos}Question: {QUESTIONS[0]}\nAnswer:"
    targets = gen.encode_targets(["luanda"])
    # " luanda" then the newline: the same tokens as the prompt's text continued by the answer line.
    full = gen.tokenizer(with_passage.texts[0] + " luanda\n", add_special_tokens=False)["input_ids"]
    assert full[-targets.ids.shape[1] :] == targets.ids[0].tolist()
    assert gen.decode(targets.ids[0].tolist()) == "luanda"
    with pytest.raises(ValueError, match="no chat template"):
        CausalGenerator(gen.model, gen.tokenizer, GeneratorConfig(path="tiny-short", prompt="chat"))


def test_closed_book_and_truncated_prompts():
    gen = tiny_llama(chat=True)
    closed = gen.format_inputs(QUESTIONS, None)
    assert len(closed.texts) == 2 and "Passage" not in closed.texts[0] and QUESTIONS[0] in closed.texts[0]
    long_text = " ".join(["the capital city of angola"] * 60)
    inputs = gen.format_inputs(QUESTIONS[:1], [[("angola", long_text)]])
    assert inputs.input_ids.shape[1] <= gen.generator_config.max_input_tokens
    # The passage is cut, never the question or the generation prompt at the end.
    assert inputs.texts[0].endswith(QUESTIONS[0] + "<|im_end|> <|im_start|>assistant ")
    # A question too long by itself: the prompt keeps its end (the question's end and the turn marker).
    huge = " ".join(["the capital of angola"] * 40) + " ?"
    cut = gen.format_inputs([huge], None)
    full = gen.tokenizer(cut.texts[0], add_special_tokens=False)["input_ids"]
    assert cut.input_ids[0].tolist() == full[-gen.generator_config.max_input_tokens :]
    with pytest.raises(ValueError, match="same number"):
        gen.format_inputs(QUESTIONS, [PASSAGES[0], PASSAGES[1][:1]])
    # Left padding: every prompt ends in the last column, where the target starts.
    mixed = gen.format_inputs(QUESTIONS, PASSAGES)
    assert bool(mixed.attention_mask[:, -1].all()) and not bool(mixed.attention_mask[:, 0].all())


@pytest.mark.parametrize("name", ["bart", "llama"])
def test_gradients_flow_through_the_prefix(name):
    gen = tiny_generator(name)
    _, prefix, targets = _prefix_and_targets(gen)
    logprobs = gen.target_logprobs(prefix, ROWS, targets)
    picked = logprobs.gather(-1, targets.ids[..., None])[..., 0]
    (-(picked * targets.mask).sum()).backward()
    embeddings = gen.model.get_input_embeddings().weight.grad
    assert embeddings is not None
    prompt_token = gen.tokenizer.convert_tokens_to_ids("angola")  # appears only in prompts, never as target
    assert embeddings[prompt_token].abs().sum() > 0


@pytest.mark.parametrize("name", ["bart", "llama-chat"])
def test_load_generator_detects_the_family_and_reloads_the_same_model(name, tmp_path):
    gen = tiny_generator(name)
    gen.model.save_pretrained(tmp_path)
    gen.tokenizer.save_pretrained(tmp_path)
    loaded = load_generator(GeneratorConfig(path=str(tmp_path), max_input_tokens=96, prompt="chat"))
    assert isinstance(loaded, Seq2SeqGenerator if name == "bart" else CausalGenerator)
    _, prefix, targets = _prefix_and_targets(gen)
    _, prefix2, targets2 = _prefix_and_targets(loaded)
    assert torch.equal(targets.ids, targets2.ids) and loaded.eos_token_id == gen.eos_token_id
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.target_logprobs(prefix2, ROWS, targets2), gen.target_logprobs(prefix, ROWS, targets)
        )


def test_load_generator_reports_bad_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_generator(GeneratorConfig(path=str(tmp_path / "missing")))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_generator(GeneratorConfig(path=str(tmp_path)))
    (tmp_path / "config.json").write_text('{"is_encoder_decoder": true,\n oops}')
    with pytest.raises(ValueError, match=r"config.json: line 2"):
        load_generator(GeneratorConfig(path=str(tmp_path)))


@pytest.mark.slow
def test_smollm2_gguf_converts_once_and_reads_luanda_from_the_angola_passage():
    config = GeneratorConfig()
    gen = load_generator(config)  # converts on the first run in this cache
    converted = converted_gguf_dir(resolve_path(config.path), config)
    stamp = (converted / "model.safetensors").stat().st_mtime
    started = time.perf_counter()
    gen = load_generator(config)
    reload_s = time.perf_counter() - started
    assert (converted / "model.safetensors").stat().st_mtime == stamp  # not converted again
    assert reload_s < 15, f"reloading the converted model took {reload_s:.1f} s"
    angola = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))["Angola"]
    question = "What is the capital of Angola?"
    passage = [[(angola["title"], angola["extract"])]]
    candidates = ["Luanda", "Lisbon", "Namibia", "Cabinda", "Brazil", "Nairobi"]

    def scores(generator):
        targets = generator.encode_targets(candidates)
        prefix = generator.encode_prefix(generator.format_inputs([question], passage))
        with torch.no_grad():
            logprobs = generator.target_logprobs(prefix, torch.zeros(len(candidates), dtype=torch.long), targets)
        return dict(zip(candidates, (logprobs.gather(-1, targets.ids[..., None])[..., 0] * targets.mask).sum(-1).tolist(), strict=True))

    # The default short-answer prompt ranks the two places the passage names first (Cabinda, the
    # exclave, above Luanda for this one passage); the chat prompt ranks Luanda first.
    short = scores(gen)
    assert set(sorted(short, key=short.get)[-2:]) == {"Luanda", "Cabinda"}, short
    gen = load_generator(dataclasses.replace(config, prompt="chat"))
    chat = scores(gen)
    assert max(chat, key=chat.get) == "Luanda", chat
    prefix = gen.encode_prefix(gen.format_inputs([question], passage))
    # Greedy decoding through step() writes the answer too.
    state, tokens = gen.start(prefix, torch.zeros(1, dtype=torch.long)), None
    out: list[int] = []
    with torch.no_grad():
        for _ in range(8):
            logprobs_next, state = gen.step(state, tokens)
            tokens = logprobs_next.argmax(-1)
            if tokens.item() == gen.eos_token_id:
                break
            out.append(int(tokens.item()))
    assert "Luanda" in gen.decode(out)


@pytest.mark.parametrize("name", ["llama", "llama-short-answer", "gpt2", "bart", "t5"])
def test_prefill_by_length_equals_one_padded_prefill(name):
    """Inference prefills (causal) or encodes (seq2seq) more than PREFILL_ROWS inputs in length groups and
    lays their caches / encoder outputs back into one padded batch: every row's first-token distribution,
    scored targets and greedy steps equal those of the single padded forward (training's path)."""
    from rag.generators.causal import PREFILL_ROWS

    gen = tiny_generator(name)
    lengths = [1, 7, 3, 12, 5, 9, 2, 11, 4, 6]  # more rows than PREFILL_ROWS, all widths different
    assert len(lengths) > PREFILL_ROWS
    words = "luanda is the capital city of angola one two three the book was born".split()
    questions = [" ".join(words[:n]) for n in lengths]
    inputs = gen.format_inputs(questions, None)
    with torch.no_grad():
        grouped = gen.encode_prefix(inputs)
        with torch.enable_grad():
            single = gen.encode_prefix(inputs)  # under grad: the one padded forward
        if gen.family == "causal":
            torch.testing.assert_close(grouped.first_logprobs, single.first_logprobs, atol=1e-5, rtol=0)
        else:  # the encoder's output at the real positions; zeros where padding was
            real = inputs.attention_mask.bool()
            torch.testing.assert_close(grouped.hidden[real], single.hidden[real], atol=1e-5, rtol=0)
            assert not grouped.hidden[~real].any()
        rows = torch.arange(len(questions))
        targets = gen.encode_targets(["the capital", "one two", "angola"] * 3 + ["born"])
        torch.testing.assert_close(gen.target_logprobs(grouped, rows, targets), gen.target_logprobs(single, rows, targets),
                                   atol=1e-5, rtol=0)  # fmt: skip
        a, b = gen.start(grouped, rows), gen.start(single, rows)
        tokens = None
        for _ in range(3):
            (la, a), (lb, b) = gen.step(a, tokens), gen.step(b, tokens)
            torch.testing.assert_close(la, lb, atol=1e-5, rtol=0)
            tokens = la.argmax(-1)
