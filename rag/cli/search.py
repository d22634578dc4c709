"""`rag search "query" -k 5 [--index KB]`: the top-k passages of a knowledge base for one or more queries.

The dense retriever's q(x) runs in numpy where rag.numpy_encoder covers the encoder (the packaged one):
such a call never imports torch or transformers, whose import is most of a call's cost.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path
from typing import Any

from rag.answering import search_hits
from rag.cli.model_options import (
    add_index_arguments,
    add_retriever_arguments,
    knowledge_base,
    query_encoder,
    retriever_config,
)
from rag.cli.numbers import COUNT, integer
from rag.config import EncoderConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("search", help="retrieve the top-k passages for queries")
    parser.add_argument("queries", nargs="+", help="one or more queries")
    add_index_arguments(parser)
    parser.add_argument("-k", type=COUNT, default=5, help="passages per query")
    parser.add_argument("--json", action="store_true", help="JSON Lines output, one object per query")
    add_retriever_arguments(parser)
    parser.add_argument("--reader", default="default",
                        help="the q(x) of this reader (rag ask's default: the shipped trained reader's q(x) delta "
                             "where q(x) is the packaged encoder); none: q(x) as the knowledge base records it")
    parser.add_argument("--width", type=integer(min=20), default=100, help="characters of passage text to show")
    parser.set_defaults(func=run)


def numpy_hits(index: str, encoder: EncoderConfig, args: argparse.Namespace) -> list[list[dict[str, Any]]] | None:
    """The dense retriever's hits with q(x) in numpy (rag.numpy_encoder), or None where that forward does
    not apply (then the torch retriever runs). Scores are q(x) . d(z) of the stored d(z), as Retriever's.
    --ray: the shards' actors search (rag.distributed.shards), with the same q(x) as a local search."""
    from rag.knowledge import KnowledgeBase, open_knowledge_base
    from rag.numpy_encoder import load_numpy_encoder

    fast = load_numpy_encoder(encoder)
    if fast is None:
        return None
    if args.ray:
        from rag.distributed.shards import open_on_ray

        kb = KnowledgeBase(*open_on_ray(index, args.ray))
    else:
        kb = open_knowledge_base(index)
    if fast.dim != kb.index.dim:
        return None
    if args.k > len(kb.index):
        raise ValueError(f"-k {args.k} exceeds the {len(kb.index)} passages in {index}")
    found = kb.index.search(fast.encode(list(args.queries)), args.k)  # (B, K)
    passages = kb.passages.get(found.rows.reshape(-1))
    return [
        [{"rank": rank + 1, "score": float(found.scores[i, rank]), "id": p.id, "title": p.title, "text": p.text}
         for rank, p in enumerate(passages[i * args.k : (i + 1) * args.k])]
        for i in range(len(args.queries))
    ]  # fmt: skip


def run(args: argparse.Namespace) -> int:
    if args.k < 1:
        raise ValueError(f"-k must be >= 1, got {args.k}")
    empty = [i + 1 for i, q in enumerate(args.queries) if not q.strip()]
    if empty:
        raise ValueError(f"query {empty[0]} is empty")
    first = Path(args.queries[0])
    if not args.index and len(args.queries) > 1 and (first / "meta.json").is_file():
        raise ValueError(f"{first} is a knowledge base, not a query: give it as --index {first}")
    if (args.query_encoder or args.query_scale is not None) and args.retriever == "bm25":
        raise ValueError("--query-encoder and --query-scale are for the dense and hybrid retrievers, not bm25")
    index = knowledge_base(args)
    encoder = query_encoder(args, index) if args.retriever != "bm25" else None
    if encoder is not None:
        from rag.reader import reader_query_encoder

        encoder = reader_query_encoder(args.reader, encoder)
    per_query = numpy_hits(index, encoder, args) if encoder is not None and args.retriever == "dense" else None
    if per_query is None:
        from rag.retriever import open_retriever

        retriever = open_retriever(index, retriever_config(args), encoder=encoder)
        if args.k > len(retriever.index):
            raise ValueError(f"-k {args.k} exceeds the {len(retriever.index)} passages in {index}")
        retrieved = retriever.retrieve(args.queries, args.k)
        per_query = [search_hits(retrieved, i) for i in range(len(args.queries))]
    for i, query in enumerate(args.queries):
        rows = per_query[i]
        if args.json:
            print(json.dumps({"query": query, "hits": rows}, ensure_ascii=False))
            continue
        print(f"query: {query}")
        for hit in rows:
            snippet = textwrap.shorten(hit["text"], width=max(20, args.width), placeholder=" ...")
            fused = f" (fused {hit['fused_score']:.4f})" if "fused_score" in hit else ""
            print(f"{hit['rank']:>3}. {hit['score']:.4f}{fused}  {hit['title']}  [{hit['id']}]")
            print(f"       {snippet}")
        print()
    return 0
