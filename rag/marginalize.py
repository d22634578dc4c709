"""The paper's equations as pure functions, in log space (Lewis et al. 2020, "Retrieval-Augmented
Generation for Knowledge-Intensive NLP Tasks").

Shape legend: B batch (questions), K retrieved documents z per question, T target length,
V vocabulary, C classes, D embedding dimension.

Inputs are the generator's per-token log-probabilities log p_theta(y_i | x, z, y_<i), either over the
whole vocabulary (B, K, T, V) or already gathered at the target tokens (B, K, T), plus the retriever's
document log-prior log p_eta(z | x) (B, K). Every function returns log-probabilities (never
probabilities), so nothing underflows for long targets or many documents.

    RAG-Sequence (eq. 1):  p(y|x) = sum_z p(z|x) prod_i p(y_i | x, z, y_<i)
    RAG-Token    (eq. 2):  p(y|x) = prod_i sum_z p(z|x) p(y_i | x, z, y_<i)
    Retriever    (sec 2.2): p(z|x) proportional to exp(d(z) . q(x)), over the top-K documents
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Kind = Literal["sequence", "token"]


def doc_logprior(scores: Tensor) -> Tensor:
    """log p(z|x) from the inner products d(z).q(x) of the top-K documents (sec 2.2)."""
    # at least float32: a bfloat16 prior would round away the differences between close scores
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # (B, K)
    return torch.log_softmax(wide, dim=-1)  # (B, K)


def gather_targets(token_logprobs: Tensor, targets: Tensor) -> Tensor:
    """Pick log p(y_i | x, z, y_<i) at the target tokens: (B, K, T, V) + (B, T) -> (B, K, T)."""
    index = targets[:, None, :, None].expand(-1, token_logprobs.shape[1], -1, 1)  # (B, K, T, 1)
    return token_logprobs.gather(-1, index).squeeze(-1)  # (B, K, T)


def target_logprobs_from_logits(logits: Tensor, targets: Tensor, vocab_sums: bool = False
                                ) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """log p(y_i | x, z, y_<i) at the targets straight from the logits, without the (B, K, T, V)
    log-softmax: logit[y_i] - logsumexp_v logit[v], in float32. (B, K, T, V) + (B, T) -> (B, K, T).

    vocab_sums: also sum_v log p(v | x, z, y_<i) = sum_v logit[v] - V logsumexp (label smoothing's term,
    RAG-Sequence), (B, K, T), from the same pass. Only the logits stay alive for the backward pass.
    """
    wide = logits.float()  # no copy for float32 logits
    lse = torch.logsumexp(wide, dim=-1)  # (B, K, T)
    index = targets[:, None, :, None].expand(-1, wide.shape[1], -1, 1)  # (B, K, T, 1)
    picked = wide.gather(-1, index).squeeze(-1) - lse  # (B, K, T)
    return picked, (wide.sum(-1) - wide.shape[-1] * lse) if vocab_sums else None


def _gathered(token_logprobs: Tensor, targets: Tensor | None) -> Tensor:
    if token_logprobs.dim() == 3:
        return token_logprobs  # (B, K, T)
    if targets is None:
        raise ValueError("token_logprobs of shape (B, K, T, V) need the target ids (B, T)")
    return gather_targets(token_logprobs, targets)  # (B, K, T)


def _masked(target_logprobs: Tensor, mask: Tensor) -> Tensor:
    # where() rather than a product: a padded position may hold -inf, and -inf * 0 is nan
    return torch.where(mask[:, None, :].bool(), target_logprobs, 0.0)  # (B, K, T)


def passage_logprob(token_logprobs: Tensor, mask: Tensor, targets: Tensor | None = None) -> Tensor:
    """log p(y | x, z) = sum_i log p(y_i | x, z, y_<i) under each document: -> (B, K)."""
    gathered = _gathered(token_logprobs, targets)  # (B, K, T)
    return _masked(gathered, mask).sum(-1)  # (B, K)


def sequence_logprob(
    token_logprobs: Tensor, doc_logprior: Tensor, mask: Tensor, targets: Tensor | None = None
) -> Tensor:
    """RAG-Sequence log p(y|x) (eq. 1): logsumexp_z [log p(z|x) + sum_i log p(y_i|x,z,y_<i)] -> (B,)."""
    per_doc = passage_logprob(token_logprobs, mask, targets)  # (B, K)
    return torch.logsumexp(doc_logprior + per_doc, dim=1)  # (B,)


def token_marginals(token_logprobs: Tensor, doc_logprior: Tensor) -> Tensor:
    """RAG-Token per-position marginal (eq. 2, inner sum): (B, K, T[, V]) -> (B, T[, V])."""
    extra = token_logprobs.dim() - 2
    prior = doc_logprior.reshape(doc_logprior.shape + (1,) * extra)  # (B, K, 1[, 1])
    return torch.logsumexp(token_logprobs + prior, dim=1)  # (B, T[, V])


def token_logprob(
    token_logprobs: Tensor, doc_logprior: Tensor, mask: Tensor, targets: Tensor | None = None
) -> Tensor:
    """RAG-Token log p(y|x) (eq. 2): sum_i logsumexp_z [log p(z|x) + log p(y_i|x,z,y_<i)] -> (B,)."""
    gathered = _gathered(token_logprobs, targets)  # (B, K, T)
    per_token = token_marginals(gathered, doc_logprior)  # (B, T)
    return torch.where(mask.bool(), per_token, 0.0).sum(-1)  # (B,)


def token_marginal_next(logprobs: Tensor, doc_logprior: Tensor) -> Tensor:
    """Next-token distribution of RAG-Token decoding (eq. 2 at one position):
    log p'(y_i | x, y_<i) = logsumexp_z [log p(z|x) + log p(y_i | x, z, y_<i)]: (B, K, V) -> (B, V)."""
    return torch.logsumexp(logprobs + doc_logprior[:, :, None], dim=1)  # (B, V)


def rag_sequence_nll(
    token_logprobs: Tensor, doc_logprior: Tensor, targets: Tensor, mask: Tensor, epsilon: float = 0.0
) -> Tensor:
    """RAG-Sequence loss -log p(y|x) (eq. 1) per example, padding masked -> (B,).

    Label smoothing follows transformers' RagSequenceForGeneration.get_nll: the smoothing term is
    -logsumexp_z [V log p(z|x) + sum_i sum_v log p(v | x, z, y_<i)] (the prior enters once per vocabulary
    entry because get_nll adds it to every entry of one position before summing over v), and
    loss = (1 - eps) nll + eps / V * smooth. transformers adds the prior at the second target position,
    so for one-token targets it drops the prior altogether; here it is always counted (the paper's eq. 1).
    """
    sums = token_logprobs.sum(-1) if epsilon else None  # (B, K, T) sum_v log p(v | x, z, y_<i)
    picked = _gathered(token_logprobs, targets)  # (B, K, T)
    return rag_sequence_losses(picked, sums, doc_logprior, mask, epsilon, token_logprobs.shape[-1])[1]


def rag_sequence_losses(target_logprobs: Tensor, vocab_sums: Tensor | None, doc_logprior: Tensor, mask: Tensor,
                        epsilon: float, vocab: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """RAG-Sequence (nll, loss) per example from gathered target log-probs (B, K, T) and, for label
    smoothing, sum_v log p(v | x, z, y_<i) (B, K, T): the loss of rag_sequence_nll, and its nll, in one pass."""
    nll = -sequence_logprob(target_logprobs, doc_logprior, mask)  # (B,)
    if epsilon == 0.0:
        return nll, nll
    if vocab_sums is None:
        raise ValueError("label smoothing needs vocab_sums (B, K, T)")
    smooth = -torch.logsumexp(vocab * doc_logprior + _masked(vocab_sums, mask).sum(-1), dim=1)  # (B,)
    return nll, (1.0 - epsilon) * nll + (epsilon / vocab) * smooth  # (B,)


def rag_token_nll(
    token_logprobs: Tensor, doc_logprior: Tensor, targets: Tensor, mask: Tensor, epsilon: float = 0.0
) -> Tensor:
    """RAG-Token loss -log p(y|x) (eq. 2) per example, padding masked -> (B,).

    Label smoothing as transformers' RagTokenForGeneration.get_nll: smooth = -sum_i sum_v log p'(v|x,y_<i)
    over the marginal p' of eq. 2, loss = (1 - eps) nll + eps / V * smooth.
    """
    if epsilon == 0.0:  # the same numbers without the (B, T, V) marginal: gather the targets first
        return -token_logprob(token_logprobs, doc_logprior, mask, targets)  # (B,)
    return rag_token_smoothed_losses(token_logprobs, doc_logprior, targets, mask, epsilon)[1]


def rag_token_smoothed_losses(token_logprobs: Tensor, doc_logprior: Tensor, targets: Tensor, mask: Tensor,
                              epsilon: float) -> tuple[Tensor, Tensor]:  # fmt: skip
    """RAG-Token (nll, loss) with label smoothing from one (B, T, V) marginal (the smoothing term needs
    the whole of it): token_logprobs (B, K, T, V) -> two (B,)."""
    vocab = token_logprobs.shape[-1]
    marginal = token_marginals(token_logprobs, doc_logprior)  # (B, T, V)
    picked = marginal.gather(-1, targets[:, :, None]).squeeze(-1)  # (B, T)
    keep = mask.bool()  # (B, T)
    nll = -torch.where(keep, picked, 0.0).sum(-1)  # (B,)
    smooth = -torch.where(keep, marginal.sum(-1), 0.0).sum(-1)  # (B,)
    return nll, (1.0 - epsilon) * nll + (epsilon / vocab) * smooth  # (B,)


def sequence_posterior(
    token_logprobs: Tensor, doc_logprior: Tensor, mask: Tensor, targets: Tensor | None = None
) -> Tensor:
    """log p(z | x, y) = log p(z|x) + log p(y|x,z) - log p(y|x) under RAG-Sequence (eq. 1, Bayes) -> (B, K)."""
    joint = doc_logprior + passage_logprob(token_logprobs, mask, targets)  # (B, K)
    return torch.log_softmax(joint, dim=1)  # (B, K)


def token_posterior(
    token_logprobs: Tensor, doc_logprior: Tensor, mask: Tensor, targets: Tensor | None = None
) -> Tensor:
    """RAG-Token document posterior for each target token (the paper's Figure 2) -> (B, T, K).

    In RAG-Token each token i has its own latent document z_i drawn from p(z|x), so given x and
    y_<=i: log p(z_i | x, y_<=i) = log p(z|x) + log p(y_i|x,z,y_<i) - logsumexp over z of the same
    (eq. 2's summand, normalised). Later tokens carry no information about z_i. Padded positions get
    the prior (nothing observed there).
    """
    gathered = _masked(_gathered(token_logprobs, targets), mask)  # (B, K, T)
    joint = doc_logprior[:, :, None] + gathered  # (B, K, T)
    return torch.log_softmax(joint, dim=1).transpose(1, 2)  # (B, T, K)


def class_logprobs(
    first_logprobs: Tensor, doc_logprior: Tensor, label_ids: Tensor, kind: Kind, normalize: bool = True
) -> Tensor:
    """Classification with one-token targets (the paper's FEVER setup, sec 3.4) -> (B, C).

    first_logprobs (B, K, V) is log p(y_1 | x, z) at the first target position; class c is the single
    token label_ids[c]. RAG-Sequence (eq. 1) and RAG-Token (eq. 2) coincide for T = 1: the product over
    i has one factor, so the sum over z and the product commute. With normalize, the class scores are
    renormalised over the C labels (probabilities of the label set).
    """
    batch, docs, _ = first_logprobs.shape
    classes = label_ids.shape[0]
    picked = first_logprobs[:, :, label_ids]  # (B, K, C)
    # each class as a one-token target: fold C into the batch, T = 1
    per_class = picked.permute(0, 2, 1).reshape(batch * classes, docs, 1)  # (B*C, K, 1)
    prior = doc_logprior.repeat_interleave(classes, dim=0)  # (B*C, K)
    mask = torch.ones(batch * classes, 1, dtype=torch.bool, device=first_logprobs.device)  # (B*C, 1)
    fn = sequence_logprob if kind == "sequence" else token_logprob
    scores = fn(per_class, prior, mask).view(batch, classes)  # (B, C)
    return torch.log_softmax(scores, dim=1) if normalize else scores  # (B, C)
