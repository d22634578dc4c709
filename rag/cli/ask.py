"""`rag ask "question"`: answer over the default knowledge base, with the passages used as evidence.

    rag ask "What is the capital of Angola?"
    rag ask --kind sequence --beams 4 -k 5 "Who wrote Hamlet?"
    rag ask -i < questions.txt            # one question per line until EOF
    rag ask --json "..."                  # one JSON object per question

Defaults: the packaged all-MiniLM-L6-v2 as q(x) and d(z), the built-in Wikipedia summaries in a flat
index, SmolLM2-135M-Instruct as the generator, RAG-Token, k = 5, greedy decoding, and the generator in
bfloat16 where the CPU computes it natively (AMX / AVX512-BF16), float32 elsewhere: the settings that
answer in about a second or two on two cores (bench/bench_generation.py measures it). The first run builds the knowledge base
and converts the generator once (both cached under rag.resources.cache_dir()); later runs load them.
For each question the answer is followed by the k passages with their prior p(z|x) (from the retrieval
scores) and posterior p(z|x,y) (Bayes over the passages given the answer, the paper's eq. 1 summands).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import TextIO

from rag.config import PROMPT_STYLES, DecodingConfig, GeneratorConfig, RagConfig
from rag.generators.loading import generator_dtype


@dataclass(frozen=True)
class Evidence:
    """One retrieved passage z and what the model made of it."""

    rank: int
    id: str
    title: str
    text: str
    score: float  # q(x) . d(z)
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
    log_prob: float  # log p(y|x) under the model's kind (fast: its approximation)
    token_ids: list[int]  # the generated ids of y (eos included when generated)
    seconds: float
    passages: list[Evidence]
    tokens: list[TokenEvidence]  # empty for RAG-Sequence


class Asker:
    """A loaded RAG model and decoding settings; `ask` answers one question at a time."""

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

    def ask(self, question: str) -> Answer:
        question = question.strip()
        if not question:
            raise ValueError("rag ask: the question is empty")
        start = time.perf_counter()
        result = self.model.generate([question], self.config)
        seconds = time.perf_counter() - start
        gen, retrieved = result.generation, result.retrieved
        prior = gen.doc_logprior[0].exp().tolist()  # (K,)
        has_answer = bool(gen.sequences[0])
        posterior = gen.doc_logposterior[0, 0].exp().tolist() if has_answer else prior  # (K,)
        passages = [
            Evidence(
                rank=z + 1,
                id=retrieved.ids[0][z],
                title=retrieved.titles[0][z],
                text=retrieved.texts[0][z],
                score=float(retrieved.scores[0, z]),
                prior=prior[z],
                posterior=posterior[z],
            )
            for z in range(len(prior))
        ]
        return Answer(
            question=question,
            answer=result.answers[0],
            kind=self.model.kind,
            k=len(prior),
            decoding=self._decoding_name(),
            log_prob=float(gen.scores[0, 0]) if has_answer else float("-inf"),
            token_ids=list(gen.sequences[0][0]) if has_answer else [],
            seconds=seconds,
            passages=passages,
            tokens=self._token_evidence(gen) if has_answer else [],
        )

    def _decoding_name(self) -> str:
        if self.model.kind == "sequence":
            return self.config.decoding
        return "greedy" if self.config.num_beams == 1 else "beam"

    def _token_evidence(self, gen) -> list[TokenEvidence]:
        if gen.token_doc_logposterior is None:
            return []
        ids = gen.sequences[0][0]
        per_token = gen.token_doc_logposterior[0, 0, : len(ids)].exp().tolist()  # (T, K)
        tokenizer = self.model.generator.tokenizer
        return [
            TokenEvidence(tokenizer.decode([token]), [round(p, 6) for p in row])
            for token, row in zip(ids, per_token, strict=True)
        ]


def rag_model_config(
    kind: str | None = None,
    k: int | None = None,
    index_dir: str = "",
    generator: str = "",
    dtype: str = "auto",
    prompt: str = "short-answer",
    checkpoint: str = "",
    device: str = "cpu",
) -> RagConfig:
    """Default encoders, knowledge base and generator unless paths are given; or a `rag train`
    checkpoint's model (its q(x), generator, knowledge base, kind and k), which the other flags adjust."""
    if checkpoint:
        from rag.train_checkpoint import checkpoint_rag_config

        base = checkpoint_rag_config(checkpoint)
        generator_config = replace(base.generator, dtype=generator_dtype(dtype, device))
    else:
        base = RagConfig()
        generator_config = GeneratorConfig(dtype=generator_dtype(dtype, device), prompt=prompt)  # type: ignore[arg-type]
    if generator:
        generator_config = replace(generator_config, path=generator)
    return replace(base, kind=kind or base.kind, k=k or base.k, index_dir=index_dir or base.index_dir,
                   generator=generator_config)  # type: ignore[arg-type]  # fmt: skip


def format_answer(answer: Answer, width: int = 100) -> str:
    """The human-readable report: answer, then each passage with prior -> posterior."""
    kind = "RAG-Token" if answer.kind == "token" else "RAG-Sequence"
    lines = [
        f"Q: {answer.question}",
        f"A: {answer.answer}",
        f"   ({kind}, {answer.decoding}, k={answer.k}, log p(y|x) = {answer.log_prob:.3f}, {answer.seconds:.2f} s)",
        "",
        "passages        prior p(z|x) -> posterior p(z|x,y)",
    ]
    for p in answer.passages:
        lines.append(f"  {p.rank}. {p.prior:6.3f} -> {p.posterior:6.3f}  {p.title}  [{p.id}]")
        lines.append("       " + textwrap.shorten(p.text, width=max(20, width), placeholder=" ..."))
    return "\n".join(lines)


def to_json(answer: Answer) -> str:
    return json.dumps(asdict(answer), ensure_ascii=False)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ask", help="answer a question over the knowledge base, with its evidence")
    p.add_argument("questions", nargs="*", help="questions (or -i to read them from stdin)")
    p.add_argument("-i", "--interactive", action="store_true", help="read questions from stdin, one per line")
    p.add_argument("--json", action="store_true", help="one JSON object per question")
    p.add_argument("--kind", choices=["token", "sequence"], default=None, help="default: token (or the checkpoint's)")
    p.add_argument("-k", type=int, default=None, help="passages retrieved and marginalised (default: 5, or the checkpoint's)")
    p.add_argument("--checkpoint", default="", help="a `rag train` checkpoint folder (RUN/checkpoint): its trained model")
    p.add_argument("--beams", type=int, default=1, help="beam size (1 = greedy)")
    p.add_argument(
        "--decoding", choices=["thorough", "fast"], default="thorough", help="RAG-Sequence decoding"
    )
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--min-new-tokens", type=int, default=1)
    p.add_argument("--index", default="", help="knowledge base folder (default: the built-in one)")
    p.add_argument("--generator", default="", help="generator path (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16"],
        default="auto",
        help="generator weights (auto: bfloat16 where the hardware computes it natively)",
    )
    p.add_argument("--prompt", choices=PROMPT_STYLES, default="short-answer", help="causal generators: short-answer (demonstrations, answer ends at a newline), chat, plain")
    p.add_argument("--width", type=int, default=100, help="characters of passage text to show")
    p.set_defaults(func=run)


def _questions(args: argparse.Namespace, stdin: TextIO) -> Iterator[str]:
    yield from args.questions
    if args.interactive:
        prompt = stdin.isatty() and not args.json
        while True:
            if prompt:
                print("question> ", end="", flush=True)
            line = stdin.readline()
            if not line:
                return
            if line.strip():
                yield line


def run(args: argparse.Namespace) -> int:
    if not args.questions and not args.interactive:
        raise ValueError("rag ask: give a question, or -i to read questions from stdin")
    if args.beams < 1 or args.max_new_tokens < 1:
        raise ValueError("--beams and --max-new-tokens must be >= 1")
    config = DecodingConfig(
        num_beams=args.beams,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        decoding=args.decoding,
    )
    rag_config = rag_model_config(args.kind, args.k, args.index, args.generator, args.dtype, args.prompt,
                                  args.checkpoint, args.device)  # fmt: skip
    asker = Asker.load(rag_config, config, args.device)
    for question in _questions(args, sys.stdin):
        answer = asker.ask(question)
        print(to_json(answer) if args.json else format_answer(answer, args.width) + "\n", flush=True)
    return 0
