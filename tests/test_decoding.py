"""Decoding against brute force: every sequence over a tiny vocabulary is enumerated and scored by
teacher forcing (gen.target_logprobs), independently of the incremental decoding path (gen.step with
its key/value cache), on real tiny transformers models driven through rag/generators/."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest
import torch
from tiny_generators import tiny_bart, tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from rag import decoding
from rag.config import DecodingConfig, GeneratorConfig
from rag.decoding import (
    SearchOptions,
    answer,
    answer_stream,
    rag_sequence_generate,
    rag_token_generate,
    rag_token_greedy_stream,
    sequence_candidates,
)
from rag.generators import CausalGenerator, Seq2SeqGenerator, TargetBatch

VOCAB = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "yes": 4, "no": 5}
EOS, MAX_LEN = 2, 3
QUESTIONS = ["yes no yes", "no no"]
PASSAGES = [[("yes", "no no yes"), ("no", "yes"), ("yes yes", "no")]] * 2
SCORES = torch.tensor([[1.5, 0.2, -0.7], [0.0, 0.9, 0.4]])
EXACT = SearchOptions(length_penalty=0.0)  # rank by log p(y|x) itself, as the enumeration does


def _tokenizer() -> PreTrainedTokenizerFast:
    core = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _six_token_generator(family: str):
    """A real BART / Llama with a six-token vocabulary and peaked (large-init) random weights."""
    torch.manual_seed(0)
    ids = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": EOS}
    if family == "bart":
        config = BartConfig(vocab_size=6, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                            decoder_attention_heads=2, encoder_ffn_dim=16, decoder_ffn_dim=16,
                            max_position_embeddings=64, decoder_start_token_id=EOS, forced_bos_token_id=None,
                            forced_eos_token_id=None, init_std=0.5, **ids)
        return Seq2SeqGenerator(BartForConditionalGeneration(config).eval(), _tokenizer(), GeneratorConfig(path="b"))
    config = LlamaConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         initializer_range=0.5, **ids)
    return CausalGenerator(LlamaForCausalLM(config).eval(), _tokenizer(), GeneratorConfig(path="l"))


def _space(max_len: int) -> list[tuple[int, ...]]:
    """Every outcome of decoding with max_len new tokens: eos-terminated, or eos-free at max_len."""
    words = [t for t in VOCAB.values() if t != EOS]
    out = [s + (EOS,) for n in range(max_len) for s in itertools.product(words, repeat=n)]
    return out + list(itertools.product(words, repeat=max_len))


@pytest.fixture(scope="module", params=["bart", "llama"])
def setup(request):
    """(gen, prefix, log prior, brute force) where brute force holds, for every sequence y of the space,
    log p(y_i | x, z, y_<i) (B, K, S, T) teacher-forced and the two models' log p(y|x) (B, S)."""
    gen = _six_token_generator(request.param)
    with torch.no_grad():
        prefix = gen.encode_prefix(gen.format_inputs(QUESTIONS, PASSAGES))
        space = _space(MAX_LEN)
        batch, docs, size = len(QUESTIONS), len(PASSAGES[0]), len(space)
        ids = torch.full((size, MAX_LEN), gen.pad_token_id)
        mask = torch.zeros(size, MAX_LEN, dtype=torch.bool)
        for s, y in enumerate(space):
            ids[s, : len(y)], mask[s, : len(y)] = torch.tensor(y), True
        rows = torch.arange(batch * docs).repeat_interleave(size)
        lp = gen.target_logprobs(prefix, rows, TargetBatch(ids.repeat(batch * docs, 1), mask.repeat(batch * docs, 1)))
        tok = lp.gather(-1, ids.repeat(batch * docs, 1)[:, :, None]).squeeze(-1).view(batch, docs, size, MAX_LEN)
        tok = torch.where(mask, tok, 0.0).double()
        prior = torch.log_softmax(SCORES.double(), dim=1)
        seq = torch.logsumexp(prior[:, :, None] + tok.sum(-1), dim=1)  # eq. 1
        token = torch.where(mask, torch.logsumexp(prior[:, :, None, None] + tok, dim=1), 0.0).sum(-1)  # eq. 2
    brute = {"space": space, "tok": tok, "seq": seq, "token": token, "mask": mask}
    return gen, prefix, torch.log_softmax(SCORES, dim=1), brute


def _config(**kw) -> DecodingConfig:
    base = DecodingConfig(num_beams=1, num_return_sequences=1, max_new_tokens=MAX_LEN, min_new_tokens=0)
    return replace(base, **kw)


def test_probabilities_over_every_sequence_sum_to_one(setup):
    _, _, _, brute = setup
    assert len(brute["space"]) == 1 + 5 + 25 + 125
    torch.testing.assert_close(brute["seq"].exp().sum(1), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(brute["token"].exp().sum(1), torch.ones(2, dtype=torch.float64), atol=1e-5, rtol=0)


def test_rag_token_beam_search_finds_the_exact_argmax(setup):
    gen, prefix, prior, brute = setup
    # 6 * 25 candidates at the last step: 150 beams keep every prefix and let every sequence finish
    out = rag_token_generate(gen, prefix, prior, _config(num_beams=150, num_return_sequences=3), EXACT)
    for b in range(2):
        best = torch.topk(brute["token"][b], 3)
        assert out.sequences[b] == [list(brute["space"][s]) for s in best.indices.tolist()]
        torch.testing.assert_close(out.scores[b].double(), best.values, atol=1e-4, rtol=0)


def test_rag_token_greedy_takes_the_argmax_of_the_marginal_at_each_step(setup):
    gen, prefix, prior, brute = setup
    out = rag_token_generate(gen, prefix, prior, _config())
    p_z = prior.double().exp()
    for b in range(2):
        y = out.sequences[b][0]
        prefix_ids: tuple[int, ...] = ()
        for token in y:  # the marginal next-token distribution, from the enumerated sequences' prefixes
            nxt = {s[len(prefix_ids)]: s for s in brute["space"] if s[: len(prefix_ids)] == prefix_ids
                   and len(s) > len(prefix_ids)}
            i = len(prefix_ids)
            marg = {v: sum(p_z[b, z] * brute["tok"][b, z, brute["space"].index(s), i].exp() for z in range(3))
                    for v, s in nxt.items()}
            assert token == max(marg, key=marg.get)
            prefix_ids += (token,)
        assert out.scores[b, 0].item() == pytest.approx(brute["token"][b, brute["space"].index(tuple(y))].item(),
                                                        abs=1e-4)


def test_rag_token_provenance_matches_teacher_forcing(setup):
    gen, prefix, prior, brute = setup
    out = rag_token_generate(gen, prefix, prior, _config(num_beams=4, num_return_sequences=2))
    for b, r in itertools.product(range(2), range(2)):
        s = brute["space"].index(tuple(out.sequences[b][r]))
        per_doc = brute["tok"][b, :, s]  # (K, T)
        torch.testing.assert_close(out.passage_logprobs[b, r].double(), per_doc.sum(-1), atol=1e-4, rtol=0)
        for i in range(len(out.sequences[b][r])):  # Figure 2: p(z_i | x, y_<=i) by Bayes, per token
            want = torch.softmax(prior[b].double() + per_doc[:, i], dim=0)
            torch.testing.assert_close(out.token_doc_logposterior[b, r, i].exp().double(), want, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.doc_logposterior.exp().sum(-1), torch.ones(2, 2))


@pytest.mark.parametrize("num_beams", [1, 2])
def test_rag_sequence_thorough_returns_the_argmax_of_its_candidates(setup, num_beams):
    gen, prefix, prior, brute = setup
    config = _config(num_beams=num_beams, num_return_sequences=2, decoding="thorough")
    cands = sequence_candidates(gen, prefix, prior, config)
    out = rag_sequence_generate(gen, prefix, prior, config)
    for b in range(2):
        index = [brute["space"].index(tuple(y)) for y in cands.sequences[b]]
        assert len(set(index)) == len(index) <= 3 * num_beams  # de-duplicated union of the K beams
        # every candidate scored under every passage, equal to teacher forcing
        torch.testing.assert_close(cands.passage_logprobs[b].double(), brute["tok"][b][:, index].sum(-1).T,
                                   atol=1e-4, rtol=0)
        true = brute["seq"][b, index]
        order = torch.argsort(true, descending=True)[:2]
        assert out.sequences[b] == [cands.sequences[b][c] for c in order.tolist()]
        torch.testing.assert_close(out.scores[b].double()[: len(order)], true[order], atol=1e-4, rtol=0)


def test_rag_sequence_with_every_sequence_in_every_beam(setup):
    gen, prefix, prior, brute = setup
    # 156 sequences: 160 beams under each passage hold all of them, so fast == thorough == the true argmax
    config = _config(num_beams=160, num_return_sequences=3)
    thorough = sequence_candidates(gen, prefix, prior, replace(config, decoding="thorough"), EXACT)
    fast = rag_sequence_generate(gen, prefix, prior, replace(config, decoding="fast"), EXACT)
    for b in range(2):
        assert bool(thorough.in_beam[b].all()) and len(thorough.sequences[b]) == len(brute["space"])
        best = torch.topk(brute["seq"][b], 3)
        assert fast.sequences[b] == [list(brute["space"][s]) for s in best.indices.tolist()]
        torch.testing.assert_close(fast.scores[b].double(), best.values, atol=1e-4, rtol=0)


def test_fast_is_thorough_with_zero_outside_the_beams(setup):
    gen, prefix, prior, _ = setup
    config = _config(num_beams=2, num_return_sequences=4)
    thorough = sequence_candidates(gen, prefix, prior, replace(config, decoding="thorough"))
    fast = sequence_candidates(gen, prefix, prior, replace(config, decoding="fast"))
    assert fast.sequences == thorough.sequences
    some_missing = False
    for b in range(2):
        hit = fast.in_beam[b]
        some_missing |= bool((~hit).any())
        torch.testing.assert_close(fast.passage_logprobs[b][hit], thorough.passage_logprobs[b][hit])
        assert torch.isneginf(fast.passage_logprobs[b][~hit]).all()
        assert torch.isfinite(thorough.passage_logprobs[b]).all()
    assert some_missing  # otherwise this test would not tell fast from thorough
    fast_out = rag_sequence_generate(gen, prefix, prior, replace(config, decoding="fast"))
    thorough_out = rag_sequence_generate(gen, prefix, prior, replace(config, decoding="thorough"))
    for b in range(2):  # each hypothesis: fast drops terms of thorough's sum, so never scores higher
        n = len(thorough_out.sequences[b])  # fewer than 4 when de-duplication leaves fewer: -inf pads
        assert torch.isneginf(thorough_out.scores[b, n:]).all()
        tscore = {tuple(y): s for y, s in zip(thorough_out.sequences[b], thorough_out.scores[b, :n].tolist(), strict=True)}
        for y, s in zip(fast_out.sequences[b], fast_out.scores[b].tolist(), strict=False):
            if tuple(y) in tscore:
                assert s <= tscore[tuple(y)] + 1e-5


class _CountingSteps:
    """The generator, counting its decoding forwards (gen.step with tokens)."""

    def __init__(self, gen) -> None:
        self.gen, self.forwards = gen, 0

    def __getattr__(self, name):
        return getattr(self.gen, name)

    def step(self, state, tokens):
        self.forwards += tokens is not None
        return self.gen.step(state, tokens)


def test_rag_token_greedy_stream_hands_out_each_token_with_its_posteriors(setup):
    """Each step comes out before the next forward, with p(z_i|x,y_<=i) and p(z|x,y_<=i) by Bayes from
    teacher forcing; the stream's result is rag_token_generate's greedy Generation."""
    gen, prefix, prior, brute = setup
    counting = _CountingSteps(gen)
    stream = rag_token_greedy_stream(counting, prefix, prior, _config())
    steps = []
    while True:
        try:
            steps.append(next(stream))
        except StopIteration as done:
            result = done.value
            break
        assert counting.forwards == steps[-1].step  # token i was chosen after i forwards, none ahead
    want = rag_token_generate(gen, prefix, prior, _config())
    assert result.sequences == want.sequences
    for name in ("scores", "passage_logprobs", "doc_logposterior", "token_doc_logposterior"):
        torch.testing.assert_close(getattr(result, name), getattr(want, name))
    for b in range(2):
        y = want.sequences[b][0]
        s = brute["space"].index(tuple(y))
        assert [int(st.tokens[b]) for st in steps[: len(y)]] == y
        assert all(bool(st.generated[b]) == (st.step < len(y)) for st in steps)
        for i in range(len(y)):
            per_doc = brute["tok"][b, :, s]  # (K, T)
            token_post = torch.softmax(prior[b].double() + per_doc[:, i], dim=0)
            running = torch.softmax(prior[b].double() + per_doc[:, : i + 1].sum(-1), dim=0)
            torch.testing.assert_close(steps[i].token_doc_logposterior[b].exp().double(), token_post, atol=1e-4, rtol=0)
            torch.testing.assert_close(steps[i].doc_logposterior[b].exp().double(), running, atol=1e-4, rtol=0)
        torch.testing.assert_close(steps[len(y) - 1].doc_logposterior[b], want.doc_logposterior[b, 0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="greedily"):
        next(rag_token_greedy_stream(gen, prefix, prior, _config(num_beams=2)))


def test_answer_stream_equals_answer(setup):
    gen, _, _, _ = setup
    stream = answer_stream(gen, QUESTIONS, PASSAGES, SCORES, _config())
    tokens = []
    while True:
        try:
            tokens.append(next(stream).tokens.tolist())
        except StopIteration as done:
            result = done.value
            break
    want = answer(gen, QUESTIONS, PASSAGES, SCORES, "token", _config())
    assert result.sequences == want.sequences and tokens
    torch.testing.assert_close(result.token_doc_logposterior, want.token_doc_logposterior)


def test_min_and_max_new_tokens(setup):
    gen, prefix, prior, _ = setup
    for kind_fn in (rag_token_generate, rag_sequence_generate):
        out = kind_fn(gen, prefix, prior, _config(num_beams=3, num_return_sequences=3, min_new_tokens=2))
        for hyps in out.sequences:
            for y in hyps:
                assert 2 <= len(y) <= MAX_LEN and EOS not in y[:2]
                assert EOS not in y[:-1]


def test_batching_over_questions_changes_nothing(setup):
    gen, _, _, _ = setup
    config = _config(num_beams=3, num_return_sequences=2)
    both = answer(gen, QUESTIONS, PASSAGES, SCORES, "token", config)
    seq_both = answer(gen, QUESTIONS, PASSAGES, SCORES, "sequence", config)
    for b in range(2):
        alone = answer(gen, QUESTIONS[b : b + 1], PASSAGES[b : b + 1], SCORES[b : b + 1], "token", config)
        seq_alone = answer(gen, QUESTIONS[b : b + 1], PASSAGES[b : b + 1], SCORES[b : b + 1], "sequence", config)
        assert alone.sequences[0] == both.sequences[b] and seq_alone.sequences[0] == seq_both.sequences[b]
        torch.testing.assert_close(alone.scores[0], both.scores[b], atol=1e-5, rtol=0)
        torch.testing.assert_close(seq_alone.scores[0], seq_both.scores[b], atol=1e-5, rtol=0)


def _hf_hypotheses(model, sequences: torch.Tensor, skip: int) -> list[list[int]]:
    out = []
    for row in sequences[:, skip:].tolist():
        out.append(row[: row.index(model.config.eos_token_id) + 1] if model.config.eos_token_id in row else row)
    return out


@pytest.mark.parametrize("builder", [tiny_bart, tiny_llama])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_k1_equals_the_plain_generator(builder, num_beams):
    """k = 1: RAG-Token decoding is the plain generator's own transformers generate(), and both models'
    scores are the plain likelihood log p(y|x) computed by the transformers model's forward."""
    gen = builder(0)
    question, passage = "what is the capital of angola ?", ("angola", "luanda is the capital city of angola")
    config = DecodingConfig(num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=5, min_new_tokens=1)
    ours = answer(gen, [question], [[passage]], torch.tensor([[3.0]]), "token", config)
    inputs = gen.format_inputs([question], [[passage]])
    with torch.no_grad():
        hf = gen.model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, do_sample=False,
                                num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=5,
                                min_new_tokens=1, length_penalty=1.0, early_stopping=False,
                                pad_token_id=gen.pad_token_id)
    skip = 1 if gen.family == "seq2seq" else inputs.input_ids.shape[1]
    assert ours.sequences[0] == _hf_hypotheses(gen.model, hf, skip)
    seq = answer(gen, [question], [[passage]], torch.tensor([[3.0]]), "sequence", config)
    for out in (ours, seq):
        for y, score in zip(out.sequences[0], out.scores[0].tolist(), strict=True):
            assert score == pytest.approx(_plain_logprob(gen, inputs, y), abs=1e-4)


def test_search_options_as_transformers_generate():
    """k = 1 RAG-Token beam search against the plain model's generate() under the other search rules:
    length penalty, early stopping True / "never", and BART's forced EOS at the last step."""
    question, passage = QUESTIONS[0], PASSAGES[0][2]  # a pair whose outputs depend on every option below
    config = DecodingConfig(num_beams=2, num_return_sequences=2, max_new_tokens=8, min_new_tokens=0)
    outputs = set()
    for length_penalty, early_stopping, forced_eos in [(1.0, False, True), (1.0, False, False), (0.5, True, False),
                                                       (2.0, "never", False), (-1.0, False, False)]:
        gen = _six_token_generator("bart")
        gen.model.generation_config.forced_eos_token_id = EOS if forced_eos else None
        options = SearchOptions(length_penalty=length_penalty, early_stopping=early_stopping)
        ours = answer(gen, [question], [[passage]], torch.tensor([[0.0]]), "token", config, options=options)
        inputs = gen.format_inputs([question], [[passage]])
        with torch.no_grad():
            hf = gen.model.generate(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                                    do_sample=False, num_beams=2, num_return_sequences=2, max_new_tokens=8,
                                    length_penalty=length_penalty, early_stopping=early_stopping)
        assert ours.sequences[0] == _hf_hypotheses(gen.model, hf, 1)
        if forced_eos:
            assert all(y[-1] == EOS for y in ours.sequences[0])
        outputs.add(str(ours.sequences[0]))
    assert len(outputs) >= 3  # the options really changed the search


def test_without_dedup_every_beam_is_a_candidate(setup):
    gen, prefix, prior, _ = setup
    config = _config(num_beams=3, num_return_sequences=9, dedup=False)
    cands = sequence_candidates(gen, prefix, prior, config)
    deduped = sequence_candidates(gen, prefix, prior, replace(config, dedup=True))
    for b in range(2):
        assert len(cands.sequences[b]) == 3 * 3  # K passages x nb beams
        assert sorted(map(tuple, deduped.sequences[b])) == sorted(set(map(tuple, cands.sequences[b])))
        for c, y in enumerate(cands.sequences[b]):  # copies of one hypothesis carry the same scores
            d = deduped.sequences[b].index(y)
            torch.testing.assert_close(cands.passage_logprobs[b][c], deduped.passage_logprobs[b][d])


def _plain_logprob(gen, inputs, y: list[int]) -> float:
    target = torch.tensor([y])
    with torch.no_grad():
        if gen.family == "seq2seq":
            start = torch.full((1, 1), gen.model.config.decoder_start_token_id)
            logits = gen.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                               decoder_input_ids=torch.cat([start, target[:, :-1]], 1)).logits
        else:
            ids = torch.cat([inputs.input_ids, target], 1)
            logits = gen.model(input_ids=ids).logits[:, inputs.input_ids.shape[1] - 1 : -1]
    return torch.log_softmax(logits, -1).gather(-1, target[:, :, None]).sum().item()


def test_bad_options_are_rejected(setup):
    gen, prefix, prior, _ = setup
    with pytest.raises(ValueError, match="num_return_sequences"):
        rag_token_generate(gen, prefix, prior, _config(num_beams=2, num_return_sequences=3))
    with pytest.raises(ValueError, match="B\\*K = 4"):
        rag_token_generate(gen, prefix, prior[:, :2], _config())
    with pytest.raises(ValueError, match="k must be"):
        answer(gen, QUESTIONS, PASSAGES, SCORES, "token", _config(), k=4)


@pytest.mark.parametrize("family", ["bart", "llama"])
def test_greedy_drops_ended_questions_and_changes_nothing(family):
    """Greedy RAG-Token removes a question from the decoder state once it has ended: with questions that
    end at different steps, every question's answer, score and per-token posteriors equal asking it alone."""
    gen = _six_token_generator(family)
    questions = ["yes no yes", "no no", "yes", "no yes no no", "yes yes"]
    passages = [[("yes", "no no yes"), ("no", "yes"), ("yes yes", "no")], [("no", "no"), ("yes", "yes no"), ("no", "yes")]]
    passages = [passages[i % 2] for i in range(len(questions))]
    scores = torch.tensor([[1.5, 0.2, -0.7], [0.0, 0.9, 0.4], [2.0, -1.0, 0.0], [0.3, 0.3, 0.3], [-1.0, 2.0, 0.5]])
    config = _config(max_new_tokens=8, min_new_tokens=0)
    batched = answer(gen, questions, passages, scores, "token", config)
    lengths = {len(s[0]) for s in batched.sequences}
    assert len(lengths) > 1, "the questions must end at different steps for this test to mean anything"
    for b in range(len(questions)):
        alone = answer(gen, questions[b : b + 1], passages[b : b + 1], scores[b : b + 1], "token", config)
        assert alone.sequences[0] == batched.sequences[b]
        torch.testing.assert_close(alone.scores[0], batched.scores[b], atol=1e-5, rtol=0)  # left padding: rounding
        torch.testing.assert_close(alone.token_doc_logposterior[0], batched.token_doc_logposterior[b], atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", ["bart", "llama"])
@pytest.mark.parametrize("kind", ["token", "sequence"])
def test_beam_search_drops_settled_groups_and_changes_nothing(family, kind, monkeypatch):
    """Beam search removes a group (RAG-Sequence: a (question, passage) search; RAG-Token: a question) from
    the decoder state once its finished pool can no longer change: every output equals the search that
    keeps stepping every group to the end, as transformers does."""
    gen = _six_token_generator(family)
    questions = ["yes no yes", "no no", "yes", "no yes no no"]
    passages = [[("yes", "no no yes"), ("no", "yes"), ("yes yes", "no")], [("no", "no"), ("yes", "yes no"), ("no", "yes")]]
    passages = [passages[i % 2] for i in range(len(questions))]
    scores = torch.tensor([[1.5, 0.2, -0.7], [0.0, 0.9, 0.4], [2.0, -1.0, 0.0], [0.3, 0.3, 0.3]])
    config = _config(num_beams=3, num_return_sequences=2, max_new_tokens=20, min_new_tokens=0)
    stepped: list[int] = []
    step = gen.step
    monkeypatch.setattr(gen, "step", lambda state, tokens: stepped.append(len(state)) or step(state, tokens))
    dropping = answer(gen, questions, passages, scores, kind, config)
    rows_dropping, stepped[:] = sum(stepped), []
    monkeypatch.setattr(decoding, "_settled", lambda unsatisfied, finished, score: torch.zeros_like(unsatisfied[:, 0]))
    full = answer(gen, questions, passages, scores, kind, config)
    assert rows_dropping < sum(stepped), "some group must settle before the last step for this test to mean anything"
    assert dropping.sequences == full.sequences
    for name in ("scores", "passage_logprobs", "doc_logposterior", "token_doc_logposterior"):
        if getattr(full, name) is not None:
            torch.testing.assert_close(getattr(dropping, name), getattr(full, name), atol=1e-5, rtol=0)


def test_length_chunks_are_the_cheapest_split():
    """Rescoring's passes over hypotheses sorted by length: the exact minimum of sum(_PASS_COST + rows *
    longest) under the size limit, against every contiguous split (brute force)."""
    rng = torch.Generator().manual_seed(0)
    for _ in range(40):
        n = int(torch.randint(1, 9, (1,), generator=rng))
        lengths = sorted(torch.randint(1, 40, (n,), generator=rng).tolist())
        limit = int(torch.randint(40, 200, (1,), generator=rng))
        chunks = decoding._length_chunks(lengths, limit)
        assert [a for a, _ in chunks] == [0] + [b for _, b in chunks[:-1]] and chunks[-1][1] == n

        def cost(split, lengths=lengths):
            return sum(decoding._PASS_COST + (b - a) * lengths[b - 1] for a, b in split)

        def fits(split, lengths=lengths, limit=limit):
            return all((b - a) * lengths[b - 1] <= limit or b - a == 1 for a, b in split)

        splits = []
        for mask in range(2 ** (n - 1)):
            cuts = [0] + [i + 1 for i in range(n - 1) if mask >> i & 1] + [n]
            splits.append(list(zip(cuts, cuts[1:], strict=False)))
        assert fits(chunks) and cost(chunks) == min(cost(s) for s in splits if fits(s))
