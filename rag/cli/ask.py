"""`rag ask "question"`: answer over the default knowledge base, with the passages used as evidence.

    rag ask "What is the capital of Angola?"
    rag ask --kind sequence --beams 4 -k 5 "Who wrote Hamlet?"
    rag ask -i < questions.txt            # one question per line until EOF
    rag ask --json "..."                  # one JSON object per question
    rag ask --plot fig2.png "..."         # RAG-Token: the per-token posterior heatmap (the paper's Figure 2)

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
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from rag.answering import Answer, to_json
from rag.cli.model_options import add_model_arguments, load_asker
from rag.cli.numbers import integer


def format_answer(answer: Answer, width: int = 100) -> str:
    """The human-readable report: answer, then each passage with prior -> posterior."""
    kind = "RAG-Token" if answer.kind == "token" else "RAG-Sequence"
    log_prob = "n/a" if answer.log_prob is None else f"{answer.log_prob:.3f}"
    lines = [
        f"Q: {answer.question}",
        f"A: {answer.answer}",
        f"   ({kind}, {answer.decoding}, k={answer.k}, log p(y|x) = {log_prob}, {answer.seconds:.2f} s)",
        "",
        "passages        prior p(z|x) -> posterior p(z|x,y)",
    ]
    for p in answer.passages:
        lines.append(f"  {p.rank}. {p.prior:6.3f} -> {p.posterior:6.3f}  {p.title}  [{p.id}]")
        lines.append("       " + textwrap.shorten(p.text, width=max(20, width), placeholder=" ..."))
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ask", help="answer a question over the knowledge base, with its evidence")
    p.add_argument("questions", nargs="*", help="questions (or -i to read them from stdin)")
    p.add_argument("-i", "--interactive", action="store_true", help="read questions from stdin, one per line")
    p.add_argument("--json", action="store_true", help="one JSON object per question (as rag serve's /v1/answer)")
    p.add_argument("--plot", metavar="PNG",
                   help="RAG-Token: draw p(z_i|x,y_<=i) over the answer tokens and the k passages (the paper's "
                        "Figure 2) to this PNG; with several questions PNG-1.png, PNG-2.png, ...")
    add_model_arguments(p)
    p.add_argument("--width", type=integer(min=20), default=100, help="characters of passage text to show")
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
    needs_token = "rag ask --plot draws RAG-Token's per-token posteriors: use --kind token"
    if args.plot and args.kind == "sequence":
        raise ValueError(needs_token)
    asker = load_asker(args)
    if args.plot and asker.model.kind != "token":  # a checkpoint's own kind
        raise ValueError(needs_token)
    several = args.interactive or len(args.questions) > 1
    for number, question in enumerate(_questions(args, sys.stdin), start=1):
        answer = asker.ask(question)
        print(to_json(answer) if args.json else format_answer(answer, args.width) + "\n", flush=True)
        if args.plot:
            from rag.heatmap import plot_token_posteriors

            path = plot_path(args.plot, number if several else None)
            plot_token_posteriors(answer, path)
            print(f"figure: {path}", file=sys.stderr, flush=True)
    return 0


def plot_path(plot: str, number: int | None) -> Path:
    """--plot PNG for one question; PNG-<n>.png for the n-th of several."""
    path = Path(plot)
    return path if number is None else path.with_name(f"{path.stem}-{number}{path.suffix or '.png'}")
