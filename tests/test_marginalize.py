"""Tier 1: the marginalisation maths against brute force (explicit Python loops over z and i) and
against transformers' own RAG loss definitions."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from rag import marginalize as M

B, K, T, V = 3, 4, 5, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K, T, V, generator=g, dtype=torch.float64) * 2
    token_logprobs = torch.log_softmax(logits, dim=-1)
    scores = torch.randn(B, K, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    lengths = [T, 2, 4]
    mask = torch.tensor([[i < n for i in range(T)] for n in lengths])
    return token_logprobs, scores, targets, mask


def _loop_prior(scores):
    out = torch.empty_like(scores)
    for b in range(scores.shape[0]):
        total = sum(math.exp(scores[b, z].item()) for z in range(scores.shape[1]))
        for z in range(scores.shape[1]):
            out[b, z] = math.exp(scores[b, z].item()) / total
    return out


def _loop_p_y_given_z(lp, targets, mask, b, z):
    prod = 1.0
    for i in range(lp.shape[2]):
        if mask[b, i]:
            prod *= math.exp(lp[b, z, i, targets[b, i]].item())
    return prod


def test_doc_logprior_is_softmax_of_inner_products():
    _, scores, _, _ = _inputs()
    torch.testing.assert_close(M.doc_logprior(scores).exp().double(), _loop_prior(scores), rtol=1e-6, atol=1e-7)


def test_sequence_and_token_logprob_match_loops():
    lp, scores, targets, mask = _inputs(1)
    prior = M.doc_logprior(scores).double()
    p_z = _loop_prior(scores)
    for b in range(B):
        seq = sum(p_z[b, z].item() * _loop_p_y_given_z(lp, targets, mask, b, z) for z in range(K))
        tok = 1.0
        for i in range(T):
            if mask[b, i]:
                tok *= sum(p_z[b, z].item() * math.exp(lp[b, z, i, targets[b, i]].item()) for z in range(K))
        assert M.sequence_logprob(lp, prior, mask, targets)[b].item() == pytest.approx(math.log(seq), abs=1e-9)
        assert M.token_logprob(lp, prior, mask, targets)[b].item() == pytest.approx(math.log(tok), abs=1e-9)
    # the gathered (B, K, T) form gives the same numbers as the full (B, K, T, V) form
    gathered = M.gather_targets(lp, targets)
    torch.testing.assert_close(M.sequence_logprob(gathered, prior, mask), M.sequence_logprob(lp, prior, mask, targets))
    torch.testing.assert_close(M.token_logprob(gathered, prior, mask), M.token_logprob(lp, prior, mask, targets))


def test_posteriors_match_bayes_by_loops():
    lp, scores, targets, mask = _inputs(2)
    prior = M.doc_logprior(scores).double()
    p_z = _loop_prior(scores)
    seq_post = M.sequence_posterior(lp, prior, mask, targets).exp()
    tok_post = M.token_posterior(lp, prior, mask, targets).exp()
    assert tok_post.shape == (B, T, K)
    for b in range(B):
        joint = [p_z[b, z].item() * _loop_p_y_given_z(lp, targets, mask, b, z) for z in range(K)]
        for z in range(K):
            assert seq_post[b, z].item() == pytest.approx(joint[z] / sum(joint), abs=1e-9)
        for i in range(T):
            per = [p_z[b, z].item() * (math.exp(lp[b, z, i, targets[b, i]].item()) if mask[b, i] else 1.0)
                   for z in range(K)]
            for z in range(K):
                assert tok_post[b, i, z].item() == pytest.approx(per[z] / sum(per), abs=1e-9)


def test_token_marginal_next_matches_loops():
    lp, scores, _, _ = _inputs(3)
    prior = M.doc_logprior(scores).double()
    p_z = _loop_prior(scores)
    out = M.token_marginal_next(lp[:, :, 0], prior).exp()
    for b, v in itertools.product(range(B), range(V)):
        want = sum(p_z[b, z].item() * math.exp(lp[b, z, 0, v].item()) for z in range(K))
        assert out[b, v].item() == pytest.approx(want, abs=1e-12)
    torch.testing.assert_close(out.sum(-1), torch.ones(B, dtype=torch.float64))


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_nll_with_label_smoothing_matches_loops(epsilon):
    lp, scores, targets, mask = _inputs(4)
    prior = M.doc_logprior(scores).double()
    p_z = _loop_prior(scores)
    seq = M.rag_sequence_nll(lp, prior, targets, mask, epsilon)
    tok = M.rag_token_nll(lp, prior, targets, mask, epsilon)
    for b in range(B):
        nll = -math.log(sum(p_z[b, z].item() * _loop_p_y_given_z(lp, targets, mask, b, z) for z in range(K)))
        vocab_sum = [sum(lp[b, z, i, v].item() for i in range(T) if mask[b, i] for v in range(V)) for z in range(K)]
        smooth = -math.log(sum(math.exp(V * math.log(p_z[b, z].item()) + vocab_sum[z]) for z in range(K)))
        assert seq[b].item() == pytest.approx((1 - epsilon) * nll + epsilon / V * smooth, abs=1e-8)
        tok_nll, tok_smooth = 0.0, 0.0
        for i in range(T):
            if not mask[b, i]:
                continue
            marg = [sum(p_z[b, z].item() * math.exp(lp[b, z, i, v].item()) for z in range(K)) for v in range(V)]
            tok_nll -= math.log(marg[targets[b, i]])
            tok_smooth -= sum(math.log(m) for m in marg)
        assert tok[b].item() == pytest.approx((1 - epsilon) * tok_nll + epsilon / V * tok_smooth, abs=1e-8)


def _hf_self(pad: int):
    # get_nll reads only these config fields; everything else it computes is transformers' own code
    generator = SimpleNamespace(pad_token_id=pad, bos_token_id=None)
    return SimpleNamespace(config=SimpleNamespace(generator=generator, n_docs=K, bos_token_id=None))


@pytest.mark.parametrize("epsilon", [0.0, 0.1, 0.3])
def test_losses_equal_transformers_get_nll(epsilon):
    from transformers import RagSequenceForGeneration, RagTokenForGeneration

    pad, start = 1, 2
    g = torch.Generator().manual_seed(5)
    seq_logits = torch.randn(B * K, T + 1, V, generator=g)
    doc_scores = torch.randn(B, K, generator=g)
    labels = torch.randint(3, V, (B, T + 1), generator=g)
    labels[:, 0] = start  # transformers scores labels[1:]; labels[0] plays the decoder start token
    labels[1, 4:] = pad  # two scored tokens at least: transformers adds the prior at the second one
    labels[2, 3:] = pad
    hf = _hf_self(pad)
    hf_seq = RagSequenceForGeneration.get_nll(hf, seq_logits, doc_scores, labels, epsilon=epsilon, n_docs=K)
    hf_tok = RagTokenForGeneration.get_nll(
        SimpleNamespace(config=hf.config, marginalize=lambda *a: RagTokenForGeneration.marginalize(hf, *a)),
        seq_logits, doc_scores, labels, epsilon=epsilon, n_docs=K)
    # our layout: position t is the distribution of targets[t]
    lp = torch.log_softmax(seq_logits[:, :T], dim=-1).view(B, K, T, V)
    targets = labels[:, 1:]
    mask = targets != pad
    prior = M.doc_logprior(doc_scores)
    torch.testing.assert_close(M.rag_sequence_nll(lp, prior, targets, mask, epsilon), hf_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(M.rag_token_nll(lp, prior, targets, mask, epsilon), hf_tok, rtol=1e-5, atol=1e-5)


def test_k1_equals_plain_generator_likelihood():
    lp, _, targets, mask = _inputs(6)
    one = lp[:, :1]
    prior = M.doc_logprior(torch.zeros(B, 1, dtype=torch.float64))
    plain = torch.tensor([math.log(_loop_p_y_given_z(lp, targets, mask, b, 0)) for b in range(B)], dtype=torch.float64)
    torch.testing.assert_close(M.sequence_logprob(one, prior, mask, targets), plain)
    torch.testing.assert_close(M.token_logprob(one, prior, mask, targets), plain)


def test_padding_with_minus_inf_gives_no_nan():
    lp, scores, targets, mask = _inputs(7)
    lp = lp.clone()
    lp[1, :, 2:] = float("-inf")  # beyond example 1's length 2
    prior = M.doc_logprior(scores)
    for value in (M.sequence_logprob(lp, prior, mask, targets), M.token_logprob(lp, prior, mask, targets),
                  M.rag_token_nll(lp, prior, targets, mask, 0.0), M.token_posterior(lp, prior, mask, targets)):
        assert torch.isfinite(value).all()


def _table_logprobs(vocab: int, docs: int, prefix: tuple[int, ...], z: int) -> torch.Tensor:
    """A fixed random next-token distribution for every (document, prefix): a table generator."""
    g = torch.Generator().manual_seed(hash((z, prefix)) % (2**31))
    return torch.log_softmax(torch.randn(vocab, generator=g, dtype=torch.float64) * 2, dim=-1)


def test_probabilities_over_every_sequence_sum_to_one():
    vocab, eos, docs, max_len = 3, 0, 3, 4
    prior = M.doc_logprior(torch.tensor([[0.3, -1.0, 2.0]], dtype=torch.float64))
    # the sample space: eos-terminated sequences of length <= max_len, and eos-free ones of length max_len
    space = [s + (eos,) for n in range(max_len) for s in itertools.product(range(1, vocab), repeat=n)]
    space += list(itertools.product(range(1, vocab), repeat=max_len))
    seq_total, tok_total = 0.0, 0.0
    for y in space:
        lp = torch.stack([torch.stack([_table_logprobs(vocab, docs, y[:i], z) for i in range(len(y))])
                          for z in range(docs)])[None]  # (1, K, T, V)
        targets = torch.tensor([y])
        mask = torch.ones(1, len(y), dtype=torch.bool)
        seq_total += M.sequence_logprob(lp, prior, mask, targets).exp().item()
        tok_total += M.token_logprob(lp, prior, mask, targets).exp().item()
    assert len(space) == 1 + 2 + 4 + 8 + 16
    assert seq_total == pytest.approx(1.0, abs=1e-12)
    assert tok_total == pytest.approx(1.0, abs=1e-12)


def test_one_token_classes_same_under_both_models():
    lp, scores, _, _ = _inputs(8)
    prior = M.doc_logprior(scores).double()
    labels = torch.tensor([4, 0, 6])  # e.g. SUPPORTS / REFUTES / NOT ENOUGH INFO as single tokens
    first = lp[:, :, 0]
    seq = M.class_logprobs(first, prior, labels, "sequence")
    tok = M.class_logprobs(first, prior, labels, "token")
    torch.testing.assert_close(seq, tok, rtol=0, atol=1e-12)
    p_z = _loop_prior(scores)
    for b in range(B):
        raw = [sum(p_z[b, z].item() * math.exp(first[b, z, c].item()) for z in range(K)) for c in labels.tolist()]
        for c in range(3):
            assert seq[b, c].exp().item() == pytest.approx(raw[c] / sum(raw), abs=1e-12)
    raw_scores = M.class_logprobs(first, prior, labels, "token", normalize=False)
    assert raw_scores[0, 0].exp().item() == pytest.approx(
        sum(p_z[0, z].item() * math.exp(first[0, z, 4].item()) for z in range(K)), abs=1e-12)


@pytest.mark.parametrize("epsilon", [0.0, 0.1])
def test_losses_from_logits_equal_the_log_softmax_path(epsilon):
    """Training's path (rag.model.score_passages): targets gathered as logit - logsumexp, label smoothing's
    vocabulary sums from the same pass, nll and loss together, equal the (B, K, T, V) log-softmax path."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(B, K, T, V, generator=g, dtype=torch.float64) * 3 + 5  # unnormalised, shifted
    _, scores, targets, mask = _inputs(1)
    prior = M.doc_logprior(scores)
    full = torch.log_softmax(logits, dim=-1)
    picked, sums = M.target_logprobs_from_logits(logits.float(), targets, vocab_sums=True)
    torch.testing.assert_close(picked.double(), M.gather_targets(full, targets), atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(sums.double(), full.sum(-1), atol=1e-4, rtol=1e-6)
    nll, loss = M.rag_sequence_losses(picked.double(), sums.double(), prior, mask, epsilon, V)
    torch.testing.assert_close(nll, M.rag_sequence_nll(full, prior, targets, mask), atol=1e-4, rtol=1e-6)
    torch.testing.assert_close(loss, M.rag_sequence_nll(full, prior, targets, mask, epsilon), atol=1e-4, rtol=1e-6)
    nll, loss = M.rag_token_smoothed_losses(full, prior, targets, mask, 0.1)
    torch.testing.assert_close(nll, M.rag_token_nll(full, prior, targets, mask), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(loss, M.rag_token_nll(full, prior, targets, mask, 0.1), atol=0, rtol=0)
    if epsilon:
        with pytest.raises(ValueError, match="vocab_sums"):
            M.rag_sequence_losses(picked, None, prior.float(), mask, epsilon, V)
