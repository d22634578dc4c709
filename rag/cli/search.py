"""`rag search INDEX "query" -k 5`: the top-k passages of a knowledge base for one or more queries."""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import replace

from rag.answering import search_hits
from rag.config import RETRIEVER_KINDS, EncoderConfig, RetrieverConfig
from rag.retriever import open_retriever


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="retrieve the top-k passages for queries")
    parser.add_argument("index", help="a knowledge base folder (rag index build --out)")
    parser.add_argument("queries", nargs="+", help="one or more queries")
    parser.add_argument("-k", type=int, default=5, help="passages per query")
    parser.add_argument("--json", action="store_true", help="JSON Lines output, one object per query")
    parser.add_argument(
        "--query-encoder", default="", help="q(x) directory (default: the index's d(z) encoder)"
    )
    add_retriever_arguments(parser)
    parser.add_argument("--width", type=int, default=100, help="characters of passage text to show")
    parser.set_defaults(func=run)


def add_retriever_arguments(parser: argparse.ArgumentParser, default: str | None = "dense") -> None:
    """--retriever and --bm25-temperature, as search, ask, eval and train take them."""
    parser.add_argument("--retriever", choices=RETRIEVER_KINDS, default=default,
                        help="dense: q(x).d(z) (the paper's); bm25: BM25 scores as fixed logits (its ablation); "
                             "hybrid: both fused as the knowledge base's hybrid.json says (rag index hybrid). "
                             "A missing BM25 index is built once into the knowledge base"
                             + ("" if default else " (default: dense, or the checkpoint's)"))
    parser.add_argument("--bm25-temperature", type=float, default=None,
                        help="p(z|x) logits are BM25 score / this (default 1: the scores themselves, as the paper)")


def retriever_config(args: argparse.Namespace, base: RetrieverConfig | None = None) -> RetrieverConfig:
    """The RetrieverConfig the flags name, over `base` (a checkpoint's) where a flag is not given."""
    base = base or RetrieverConfig()
    return replace(base, kind=args.retriever or base.kind,
                   bm25_temperature=args.bm25_temperature or base.bm25_temperature)  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    encoder = EncoderConfig(path=args.query_encoder) if args.query_encoder else None
    if encoder is not None and args.retriever == "bm25":
        raise ValueError("--query-encoder is for the dense and hybrid retrievers, not bm25")
    retriever = open_retriever(args.index, retriever_config(args), encoder=encoder)
    if args.k > len(retriever.index):
        raise ValueError(f"-k {args.k} exceeds the {len(retriever.index)} passages in {args.index}")
    retrieved = retriever.retrieve(args.queries, args.k)
    for i, query in enumerate(args.queries):
        rows = search_hits(retrieved, i)
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
