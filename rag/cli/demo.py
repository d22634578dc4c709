"""`rag demo`: build the default knowledge base if it is missing, then retrieve for example questions.

Until the generator-based demo replaces it, this shows the retriever half of RAG end to end: the
built-in Wikipedia summaries, the packaged all-MiniLM-L6-v2 encoder and an exact inner-product index.
"""

from __future__ import annotations

import argparse
import textwrap

from rag.cli.numbers import COUNT

QUESTIONS = (
    "What is the capital of Angola?",
    "Who wrote the tragedy Hamlet?",
    "What is the highest mountain on Earth?",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="build the default knowledge base and retrieve for examples")
    parser.add_argument("questions", nargs="*", help="questions to ask instead of the examples")
    parser.add_argument("-k", type=COUNT, default=3, help="passages per question")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rag.knowledge import default_knowledge_base
    from rag.retriever import Retriever

    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    print("default knowledge base: built-in Wikipedia summaries, all-MiniLM-L6-v2, flat index")
    path = default_knowledge_base(progress=True)
    print(f"  {path}\n")
    retriever = Retriever.open(path)
    questions = list(args.questions) or list(QUESTIONS)
    retrieved = retriever.retrieve(questions, args.k)
    for i, question in enumerate(questions):
        print(f"Q: {question}")
        for rank in range(retrieved.k):
            title, text = retrieved.titles[i][rank], retrieved.texts[i][rank]
            score = float(retrieved.scores[i, rank])
            print(f"  {rank + 1}. [{score:.3f}] {title}: {textwrap.shorten(text, 140, placeholder=' ...')}")
        print()
    return 0
