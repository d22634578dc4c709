"""`rag search INDEX "query" -k 5`: the top-k passages of a knowledge base for one or more queries."""

from __future__ import annotations

import argparse
import json
import textwrap
from typing import Any

from rag.config import EncoderConfig
from rag.retriever import Retrieved, Retriever


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="retrieve the top-k passages for queries")
    parser.add_argument("index", help="a knowledge base folder (rag index build --out)")
    parser.add_argument("queries", nargs="+", help="one or more queries")
    parser.add_argument("-k", type=int, default=5, help="passages per query")
    parser.add_argument("--json", action="store_true", help="JSON Lines output, one object per query")
    parser.add_argument(
        "--query-encoder", default="", help="q(x) directory (default: the index's d(z) encoder)"
    )
    parser.add_argument("--width", type=int, default=100, help="characters of passage text to show")
    parser.set_defaults(func=run)


def hits(retrieved: Retrieved, i: int) -> list[dict[str, Any]]:
    return [
        {
            "rank": rank + 1,
            "score": float(retrieved.scores[i, rank]),
            "id": retrieved.ids[i][rank],
            "title": retrieved.titles[i][rank],
            "text": retrieved.texts[i][rank],
        }
        for rank in range(retrieved.k)
    ]


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    encoder = EncoderConfig(path=args.query_encoder) if args.query_encoder else None
    retriever = Retriever.open(args.index, encoder=encoder)
    if args.k > len(retriever.index):
        raise ValueError(f"-k {args.k} exceeds the {len(retriever.index)} passages in {args.index}")
    retrieved = retriever.retrieve(args.queries, args.k)
    for i, query in enumerate(args.queries):
        rows = hits(retrieved, i)
        if args.json:
            print(json.dumps({"query": query, "hits": rows}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for hit in rows:
            snippet = textwrap.shorten(hit["text"], width=max(20, args.width), placeholder=" ...")
            print(f"{hit['rank']:>3}. {hit['score']:.4f}  {hit['title']}  [{hit['id']}]")
            print(f"       {snippet}")
        print()
    return 0
