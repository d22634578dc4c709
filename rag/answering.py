"""Answers with their evidence: a loaded RAG model, questions in, answers with the passages' prior
p(z|x), posterior p(z|x,y) and (RAG-Token) the per-token posteriors p(z_i|x,y_<=i) out.

`rag ask` and `rag serve` both answer through `Asker`, and both write an answer's JSON with
`answer_dict`, so `rag ask --json` and the server's /v1/answer are the same object.

    asker = Asker.load(rag_model_config(), DecodingConfig(num_beams=1))
    answers = asker.ask_many(["What is the capital of Angola?", "Who wrote Hamlet?"])  # one batch
    print(answer_dict(answers[0]))
    for event in asker.stream_many(["What is the capital of Angola?"]):  # Retrieval, then tokens
        ...

Streaming (`stream_many`) hands out the retrieved passages first, then each generated token with
its passage posterior p(z_i|x,y_<=i) and the running p(z|x,y_<=i), and finally returns the answers
`ask_many` gives. RAG-Token greedy streams token by token as the decoder produces them; beam search
and RAG-Sequence only know their answer at the end, so their tokens come out together after it.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Generator as Stream
from dataclasses import asdict, dataclass, replace
from typing import Any

from rag.config import DecodingConfig, GeneratorConfig, RagConfig


@dataclass(frozen=True)
class Evidence:
    """One retrieved passage z and what the model made of it."""

    rank: int
    id: str
    title: str
    text: str
    score: float  # the logit of p(z|x): q(x) . d(z) (dense), BM25 / T (bm25), their mixture (hybrid)
    prior: float  # p(z|x)
    posterior: float  # p(z|x,y) for the answer y


@dataclass(frozen=True)
class TokenEvidence:
    """RAG-Token: the document posterior of one generated token, p(z_i|x,y_<=i) (the paper's Figure 2)."""

    token: str
    posterior: list[float]  # (K,) in passage rank order


@dataclass(frozen=True)
class Answer:
    question: str
    answer: str
    kind: str
    k: int
    decoding: str  # "beam" / "greedy" (token), "thorough" / "fast" (sequence)
    log_prob: float | None  # log p(y|x) under the model's kind (fast: its approximation); None: no answer
    token_ids: list[int]  # the generated ids of y (eos included when generated)
    seconds: float
    passages: list[Evidence]
    tokens: list[TokenEvidence]  # empty for RAG-Sequence


@dataclass(frozen=True)
class Retrieval:
    """What a stream hands out first: each question's passages, posterior = prior (nothing generated)."""

    passages: list[list[Evidence]]  # (B, K)


@dataclass(frozen=True)
class StreamedToken:
    """One generated token of question `question` (its index in the batch)."""

    question: int
    step: int  # position i in the answer, from 0
    token_id: int
    token: str  # the token's text, as in Answer.tokens
    text: str  # the answer so far, decoded as Answer.answer is (a stream's text grows by its differences)
    posterior: list[float] | None  # (K,) p(z_i|x,y_<=i) (RAG-Token); None for RAG-Sequence
    running: list[float] | None  # (K,) p(z|x,y_<=i) over the answer so far; None after the fact


StreamEvent = Retrieval | list[StreamedToken]  # a list: the tokens of one decoding step


def answer_dict(answer: Answer) -> dict[str, Any]:
    """The answer as JSON-ready data: `rag ask --json` prints it, the server's /v1/answer returns it."""
    return asdict(answer)


def to_json(answer: Answer) -> str:
    return json.dumps(answer_dict(answer), ensure_ascii=False, allow_nan=False)


def decoding_name(kind: str, config: DecodingConfig) -> str:
    if kind == "sequence":
        return config.decoding
    return "greedy" if config.num_beams == 1 else "beam"


class Asker:
    """A loaded RAG model and decoding settings; `ask_many` answers a batch of questions at once."""

    def __init__(self, model, config: DecodingConfig) -> None:
        self.model = model  # rag.model.RagModel
        self.config = config

    @classmethod
    def load(cls, rag_config: RagConfig, config: DecodingConfig | None = None, device: str = "cpu") -> Asker:
        """The model `rag_config` names (rag_model_config builds it from the flags or a checkpoint)."""
        from rag.model import RagModel

        if rag_config.k < 1:
            raise ValueError(f"-k must be >= 1, got {rag_config.k}")
        model = RagModel.from_config(rag_config, device)
        if rag_config.k > len(model.retriever.index):
            raise ValueError(f"-k {rag_config.k} exceeds the {len(model.retriever.index)} passages of the knowledge base")
        return cls(model, config or DecodingConfig())

    def with_settings(self, kind: str | None = None, k: int | None = None,
                      config: DecodingConfig | None = None) -> Asker:
        """The same loaded model answering with another kind, k or decoding (nothing is copied but the
        model's Python object; encoders, index and generator are shared)."""
        kind, k = kind or self.model.kind, k or self.model.k
        if kind not in ("token", "sequence"):
            raise ValueError(f"kind must be 'token' or 'sequence', got {kind!r}")
        if not 1 <= k <= len(self.model.retriever.index):
            raise ValueError(f"k must be in 1..{len(self.model.retriever.index)} (the knowledge base's passages), got {k}")
        model = self.model
        if (kind, k) != (model.kind, model.k):
            model = copy.copy(model)  # nn.Module: the copy shares the submodules
            model.kind, model.k = kind, k
        return Asker(model, config or self.config)

    @property
    def streams_tokens(self) -> bool:
        """Whether stream_many hands out tokens while decoding (RAG-Token greedy) or after it."""
        return self.model.kind == "token" and self.config.num_beams == 1 and self.config.num_return_sequences == 1

    def ask(self, question: str) -> Answer:
        return self.ask_many([question])[0]

    def ask_many(self, questions: list[str]) -> list[Answer]:
        """One retrieval and one batched decoding for all `questions`; each answer equals `ask`'s."""
        questions = _checked(questions)
        start = time.perf_counter()
        result = self.model.generate(questions, self.config)
        return self.answers(questions, result, time.perf_counter() - start)

    def stream_many(self, questions: list[str]) -> Stream[StreamEvent, None, list[Answer]]:
        """The Retrieval, then the tokens of each decoding step; returns the answers ask_many gives."""
        questions = _checked(questions)
        start = time.perf_counter()
        if not self.streams_tokens:
            answers = self.ask_many(questions)
            yield Retrieval([[replace(p, posterior=p.prior) for p in a.passages] for a in answers])
            for i in range(max(len(a.token_ids) for a in answers)):
                yield [StreamedToken(b, i, a.token_ids[i], self.token_text(a.token_ids[i]), self.text(a.token_ids[: i + 1]),
                                     a.tokens[i].posterior if a.tokens else None, None)
                       for b, a in enumerate(answers) if i < len(a.token_ids)]  # fmt: skip
            return answers
        retrieved = self.model.retriever.retrieve(questions, self.model.k)
        from rag.marginalize import doc_logprior  # torch: only once there is something to answer

        prior = doc_logprior(retrieved.scores).exp().tolist()  # (B, K), as the decoding computes it
        yield Retrieval([_evidence(retrieved, b, prior[b], prior[b]) for b in range(len(questions))])
        steps = self.model.generate_stream(questions, retrieved, self.config)
        so_far: list[list[int]] = [[] for _ in questions]
        while True:
            try:
                step = next(steps)
            except StopIteration as done:
                return self.answers(questions, done.value, time.perf_counter() - start)
            tokens, per_token = step.tokens.tolist(), step.token_doc_logposterior.exp().tolist()  # (B,), (B, K)
            running = step.doc_logposterior.exp().tolist()  # (B, K)
            generated = step.generated.nonzero().flatten().tolist()
            for b in generated:
                so_far[b].append(tokens[b])
            yield [StreamedToken(b, step.step, tokens[b], self.token_text(tokens[b]), self.text(so_far[b]),
                                 [round(p, 6) for p in per_token[b]], [round(p, 6) for p in running[b]])
                   for b in generated]  # fmt: skip

    def answers(self, questions: list[str], result, seconds: float) -> list[Answer]:
        """The Answer of each question from a batched rag.model.RagAnswer."""
        return [self._answer(questions[b], result, b, seconds) for b in range(len(questions))]

    def _answer(self, question: str, result, b: int, seconds: float) -> Answer:
        gen, retrieved = result.generation, result.retrieved
        prior = gen.doc_logprior[b].exp().tolist()  # (K,)
        has_answer = bool(gen.sequences[b]) and bool(gen.sequences[b][0])
        posterior = gen.doc_logposterior[b, 0].exp().tolist() if has_answer else prior  # (K,)
        passages = _evidence(retrieved, b, prior, posterior)
        log_prob = float(gen.scores[b, 0]) if has_answer else None
        return Answer(
            question=question,
            answer=result.answers[b],
            kind=self.model.kind,
            k=len(prior),
            decoding=decoding_name(self.model.kind, self.config),
            log_prob=log_prob if log_prob is not None and math.isfinite(log_prob) else None,
            token_ids=list(gen.sequences[b][0]) if has_answer else [],
            seconds=seconds,
            passages=passages,
            tokens=self._token_evidence(gen, b) if has_answer else [],
        )

    def _token_evidence(self, gen, b: int) -> list[TokenEvidence]:
        if gen.token_doc_logposterior is None:
            return []
        ids = gen.sequences[b][0]
        per_token = gen.token_doc_logposterior[b, 0, : len(ids)].exp().tolist()  # (T, K)
        return [
            TokenEvidence(self.token_text(token), [round(p, 6) for p in row])
            for token, row in zip(ids, per_token, strict=True)
        ]

    def token_text(self, token: int) -> str:
        return self.model.generator.tokenizer.decode([token])

    def text(self, token_ids: list[int]) -> str:
        return self.model.generator.decode(token_ids)


def _evidence(retrieved, b: int, prior: list[float], posterior: list[float]) -> list[Evidence]:
    """Question b's passages (rag.retriever.Retrieved) with their prior and posterior (K,)."""
    return [
        Evidence(
            rank=z + 1,
            id=retrieved.ids[b][z],
            title=retrieved.titles[b][z],
            text=retrieved.texts[b][z],
            score=float(retrieved.scores[b, z]),
            prior=prior[z],
            posterior=posterior[z],
        )
        for z in range(len(prior))
    ]


def search_hits(retrieved, b: int) -> list[dict[str, Any]]:
    """Query b's passages as `rag search --json` and the server's /v1/search write them; a hybrid's
    also carry the fusion's score that orders them (fused_score), beside the p(z|x) logit."""
    out = []
    for rank in range(retrieved.k):
        hit: dict[str, Any] = {"rank": rank + 1, "score": float(retrieved.scores[b, rank])}  # the logit of p(z|x)
        if retrieved.ranking_scores is not None:
            hit["fused_score"] = float(retrieved.ranking_scores[b, rank])
        hit.update(id=retrieved.ids[b][rank], title=retrieved.titles[b][rank], text=retrieved.texts[b][rank])
        out.append(hit)
    return out


def _checked(questions: list[str]) -> list[str]:
    if isinstance(questions, str) or not questions:
        raise ValueError("ask_many takes a non-empty list of questions")
    stripped = [q.strip() for q in questions]
    if not all(stripped):
        raise ValueError("rag ask: the question is empty")
    return stripped


def rag_model_config(
    kind: str | None = None,
    k: int | None = None,
    index_dir: str = "",
    generator: str = "",
    dtype: str = "auto",
    prompt: str | None = None,
    checkpoint: str = "",
    device: str = "cpu",
    retriever: str | None = None,
    bm25_temperature: float | None = None,
    query_encoder: str = "",
    query_scale: float | None = None,
    reader: str = "default",
    ray: str | None = None,
) -> RagConfig:
    """Default encoders, knowledge base and generator unless paths are given; or a `rag train`
    checkpoint's model (its q(x), generator, knowledge base, retriever, kind and k), which the other
    flags adjust. retriever: dense, bm25 or hybrid (None: the checkpoint's, else dense); ray: the Ray
    cluster whose actors serve the knowledge base's shards ("" none; None: the checkpoint's).
    q(x): rag.knowledge.query_encoder_config (the knowledge base's recorded q(x), or the checkpoint's;
    `query_encoder` / `query_scale` override it).
    reader (rag.reader; not with a checkpoint, which is a trained model itself): "default", the shipped
    trained reader's deltas over the default generator and q(x); "none"; or a reader folder.
    prompt: None is the reader's prompt, or "short-answer" without one (a checkpoint: its own)."""
    from rag.generators.loading import generator_dtype  # torch: only when a model is configured
    from rag.reader import default_reader_applies, load_reader, with_reader

    if checkpoint:
        from rag.train_checkpoint import checkpoint_rag_config

        base = checkpoint_rag_config(checkpoint)
        generator_config = replace(base.generator, dtype=generator_dtype(dtype, device))
        if prompt:
            generator_config = replace(generator_config, prompt=prompt)  # type: ignore[arg-type]
    else:
        base = RagConfig()
        generator_config = GeneratorConfig(dtype=generator_dtype(dtype, device))  # type: ignore[arg-type]
    if generator:
        generator_config = replace(generator_config, path=generator)
    retriever_config = replace(base.retriever, kind=retriever or base.retriever.kind,
                               bm25_temperature=bm25_temperature or base.retriever.bm25_temperature,
                               ray=base.retriever.ray if ray is None else ray)  # type: ignore[arg-type]
    index = index_dir or base.index_dir
    query = base.query_encoder
    trained = None
    if not checkpoint and (reader != "default" or default_reader_applies(generator_config.path)):
        trained = load_reader(reader)
    flags = bool(query_encoder) or query_scale is not None
    if flags or (trained is not None and trained.query_delta is not None):
        from rag.knowledge import default_knowledge_base, query_encoder_config

        resolved = query_encoder_config(index or default_knowledge_base(), query_encoder or query, query_scale)
        # the rule's q(x) is spelled out only where flags change it or the reader's q(x) delta applies to it;
        # otherwise it stays None (the rule, resolved where the model is built)
        if flags or (trained is not None and resolved.path == trained.query_base):
            query = resolved
    if not checkpoint:
        generator_config, query = with_reader(trained, generator_config, query, prompt)
    return replace(base, kind=kind or base.kind, k=base.k if k is None else k, index_dir=index,
                   query_encoder=query, generator=generator_config, retriever=retriever_config)  # type: ignore[arg-type]  # fmt: skip

