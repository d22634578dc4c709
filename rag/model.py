"""RagModel: query encoder q(x) + retriever over stored d(z) + generator + kind (token | sequence) + k.

The training forward follows the paper (sec 2.4): the passage encoder and the index stay fixed, only
q(x) and the generator learn. Retrieval runs on a detached q(x) (MIPS over the index cannot carry a
gradient); the k retrieved scores are then recomputed *in the graph* as q(x) . d(z) from the stored
passage embeddings, so log p(z|x) = log_softmax of those scores passes gradients to q and never to d.

Shapes: B questions, K passages, T target length, V vocabulary, D embedding dimension.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from rag import marginalize
from rag.config import DecodingConfig, RagConfig, checkpoint_rag_config
from rag.generators import Generator, TargetBatch, load_generator

if TYPE_CHECKING:  # the encoder/retriever modules import torch models only when used
    from collections.abc import Generator as Stream

    from rag.counterfactual import Substitution
    from rag.decoding import Generation, TokenStep
    from rag.encoders import Encoder
    from rag.retriever import AnyRetriever, Retrieved

Kind = Literal["token", "sequence"]


@dataclass(frozen=True)
class RagOutput:
    loss: Tensor  # scalar: mean over the batch of the per-example loss (label smoothing included)
    nll: Tensor  # (B,) -log p(y|x) under the model's kind, no smoothing
    doc_logprior: Tensor  # (B, K) log p(z|x), in the graph of q(x)
    passage_logprob: Tensor  # (B, K) log p(y|x,z) = sum_i log p(y_i|x,z,y_<i)
    retrieved: Retrieved | None  # None when the passages were given (score_passages)
    target_mask: Tensor | None = None  # (B, T) bool: the target tokens scored (eos included), tokenised once


@dataclass(frozen=True)
class RagAnswer:
    generation: Generation  # decoding's result: sequences, scores, priors and posteriors
    answers: list[str]  # the best hypothesis of each question, decoded
    retrieved: Retrieved


def doc_scores(query: Tensor, embeddings: Tensor) -> Tensor:
    """q(x) . d(z) for the retrieved passages: (B, D), (B, K, D) -> (B, K)."""
    return torch.einsum("bd,bkd->bk", query, embeddings.to(device=query.device, dtype=query.dtype))


def _repeat_targets(targets: TargetBatch, k: int) -> TargetBatch:
    """Target b once per passage: rows b*K + j, the generator's row layout."""
    rows = torch.arange(targets.ids.shape[0], device=targets.ids.device).repeat_interleave(k)  # (B*K,)
    return targets.select(rows)


def _counterfactual(passages: list[list[tuple[str, str]]], targets: list[str],
                    substitutions: Sequence[Substitution | None]) -> tuple[list[list[tuple[str, str]]], list[str]]:  # fmt: skip
    from rag.counterfactual import substitute_passages

    passages, targets = list(passages), list(targets)
    for b, substitution in enumerate(substitutions):
        if substitution is not None:
            rewritten, changed = substitute_passages(passages[b], substitution)
            if changed:  # a passage now states the substitute: it is what the reader must answer
                passages[b], targets[b] = rewritten, substitution.replacement
    return passages, targets


class RagModel(nn.Module):
    def __init__(
        self, query_encoder: Encoder, retriever: AnyRetriever, generator: Generator, kind: Kind, k: int
    ) -> None:
        super().__init__()
        if kind not in ("token", "sequence"):
            raise ValueError(f"kind must be 'token' or 'sequence', got {kind!r}")
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.query_encoder = query_encoder  # a registered submodule: trained
        self.generator = generator  # a registered submodule: trained
        # plain attribute: index and stored d(z) are not parameters. Dense (the paper's), BM25 (frozen:
        # the Table 6 ablation) or hybrid (rag.retriever); its query_weight says how much q(x) counts.
        self.retriever = retriever
        # Set only when d(z) is trained too (rag.passage_training): then the retrieved passages'
        # d(z) are recomputed in the graph instead of read from the index.
        self.passage_encoder: Encoder | None = None
        self.kind: Kind = kind
        self.k = k

    @classmethod
    def from_config(cls, config: RagConfig, device: str | torch.device = "cpu") -> RagModel:
        """Encoders, the knowledge base (config.index_dir, or the default one) and the generator."""
        from rag.encoders import load_encoder
        from rag.knowledge import default_knowledge_base, query_encoder_config
        from rag.retriever import open_retriever

        index_dir = config.index_dir or default_knowledge_base()
        query_encoder = load_encoder(config.query_encoder or query_encoder_config(index_dir), device)
        retriever = open_retriever(index_dir, config.retriever, query_encoder=query_encoder)
        return cls(query_encoder, retriever, load_generator(config.generator, device), config.kind, config.k)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "cpu") -> RagModel:
        """A model trained by `rag train`: its RUN/checkpoint folder (q(x), generator, knowledge base,
        kind and k, as its config.json records them; rag.train_checkpoint writes the folder)."""
        return cls.from_config(checkpoint_rag_config(path), device)

    def encode_questions(self, questions: list[str]) -> Tensor:
        """q(x) with gradient: (B, D)."""
        device = next(self.query_encoder.parameters()).device
        tokens = {name: t.to(device) for name, t in self.query_encoder.tokenize(questions).items()}
        return self.query_encoder(tokens["input_ids"], tokens["attention_mask"])

    def forward(
        self,
        questions: list[str],
        targets: list[str],
        label_smoothing: float = 0.0,
        substitutions: Sequence[Substitution | None] | None = None,
        end_token: bool = True,
    ) -> RagOutput:
        """The RAG loss of `targets` given `questions` (sec 2.4). substitutions[b] (training only,
        rag.counterfactual): rewrite question b's retrieved passages to state another answer, which
        becomes its target, when any retrieved passage names the true one. end_token=False scores the
        targets without the end token (one-token class labels: sec 3.4)."""
        # BM25 alone: p(z|x) does not depend on q(x), which is not even computed (nothing to train there)
        weight = self.retriever.query_weight  # 1 dense, 0 BM25, w hybrid
        query = self.encode_questions(questions) if weight > 0 else None  # (B, D), in the graph
        retrieved = self.retriever.retrieve(
            questions, self.k, query_vectors=None if query is None else query.detach()
        )
        scores = retrieved.fixed_logits if retrieved.fixed_logits is not None else 0.0  # (B, K) constants
        if query is not None:
            embeddings = retrieved.embeddings  # (B, K, D): the index's stored d(z), constants
            if self.passage_encoder is not None:  # d(z) is trained too (rag.passage_training)
                from rag.encoders import encode_passages

                embeddings = encode_passages(self.passage_encoder, retrieved.titles, retrieved.texts)  # (B, K, D)
            # (B, K), in the graph; equals retrieved.scores if d(z) is fixed
            scores = weight * doc_scores(query, embeddings) + scores
        passages = _passages(retrieved)
        if substitutions is not None:
            passages, targets = _counterfactual(passages, targets, substitutions)
        out = self.score_passages(questions, targets, passages, scores, label_smoothing, end_token)
        return RagOutput(out.loss, out.nll, out.doc_logprior, out.passage_logprob, retrieved, out.target_mask)

    def score_passages(
        self,
        questions: list[str],
        targets: list[str],
        passages: list[list[tuple[str, str]]] | None,
        scores: Tensor | None,
        label_smoothing: float = 0.0,
        end_token: bool = True,
    ) -> RagOutput:
        """The likelihood of `targets` given passages (title, text) and their scores q(x).d(z) (B, K).

        passages=None is closed book: one row per question and p(z|x) = 1 (scores must be None).
        All K given passages are used (not self.k), so fixed document scores can be compared with a
        reference implementation, and k = 1 reduces to the plain generator.
        """
        k = 1 if passages is None else len(passages[0])
        if passages is not None and any(len(p) != k for p in passages):
            raise ValueError("score_passages: every question needs the same number of passages")
        if scores is None:
            if passages is not None:
                raise ValueError("score_passages: passages need their scores q(x).d(z) (B, K)")
            scores = torch.zeros(len(questions), 1, device=self.generator.device)
        gen = self.generator
        prefix = gen.encode_prefix(gen.format_inputs(questions, passages))
        batch = gen.encode_targets(targets, end=end_token)  # (B, T)
        rows = torch.arange(len(questions) * k, device=batch.ids.device)  # (B*K,)
        logits = gen.target_logits(prefix, rows, _repeat_targets(batch, k))  # (B*K, T, V)
        logits = logits.view(len(questions), k, *logits.shape[1:])  # (B, K, T, V)
        prior = marginalize.doc_logprior(scores.to(logits.device))  # (B, K)
        if self.kind == "token" and label_smoothing:  # its smoothing term needs the whole (B, T, V) marginal
            full = torch.log_softmax(logits.float(), dim=-1)  # (B, K, T, V)
            nll, loss = marginalize.rag_token_smoothed_losses(full, prior, batch.ids, batch.mask, label_smoothing)
            picked = marginalize.gather_targets(full, batch.ids)  # (B, K, T)
        else:  # log p(y_i|x,z,y_<i) = logit - logsumexp: no (B, K, T, V) log-softmax is kept
            picked, sums = marginalize.target_logprobs_from_logits(logits, batch.ids, vocab_sums=bool(label_smoothing))
            if self.kind == "token":
                nll = loss = -marginalize.token_logprob(picked, prior, batch.mask)  # (B,)
            else:
                nll, loss = marginalize.rag_sequence_losses(picked, sums, prior, batch.mask, label_smoothing,
                                                            logits.shape[-1])  # fmt: skip
        per_passage = marginalize.passage_logprob(picked, batch.mask)  # (B, K)
        return RagOutput(loss.mean(), nll, prior, per_passage, None, batch.mask)

    @torch.no_grad()
    def generate(self, questions: list[str], config: DecodingConfig | None = None) -> RagAnswer:
        """Retrieve the top k passages and decode with this model's kind (rag.decoding)."""
        from rag import decoding

        config = config or DecodingConfig()
        retrieved = self.retriever.retrieve(questions, self.k)
        generation = decoding.answer(self.generator, questions, _passages(retrieved), retrieved.scores, self.kind, config)
        return self._answer(generation, retrieved)

    def generate_stream(self, questions: list[str], retrieved: Retrieved,
                        config: DecodingConfig) -> Stream[TokenStep, None, RagAnswer]:
        """RAG-Token greedy decoding over passages already retrieved (`self.retriever.retrieve(questions,
        self.k)`, so a caller can show them first), one TokenStep per position; returns what `generate`
        returns for the same questions."""
        from rag import decoding

        if self.kind != "token":
            raise ValueError("token-by-token streaming needs RAG-Token (RAG-Sequence ranks whole answers)")
        generation = yield from decoding.answer_stream(self.generator, questions, _passages(retrieved),
                                                       retrieved.scores, config)  # fmt: skip
        return self._answer(generation, retrieved)

    def _answer(self, generation: Generation, retrieved: Retrieved) -> RagAnswer:
        answers = [self.generator.decode(hyps[0]) if hyps else "" for hyps in generation.sequences]
        return RagAnswer(generation, answers, retrieved)


def _passages(retrieved: Retrieved) -> list[list[tuple[str, str]]]:
    """(title, text) of each retrieved passage: (B, K)."""
    return [list(zip(t, x, strict=True)) for t, x in zip(retrieved.titles, retrieved.texts, strict=True)]
