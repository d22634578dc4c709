"""The knowledge base commands for scale: `rag index shard`, live updates (`add`, `delete`, `compact`).

    rag index shard --index KB --shards 4 --out KB4    # N shards, each with its own index (rag.sharding)
    rag index add --index KB --corpus new.jsonl         # add passages; ids (documents) already there are replaced
    rag index delete --index KB --corpus old.jsonl      # delete those documents' passages (or --ids FILE)
    rag index compact --index KB                        # one part again: no segments, no tombstones
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rag.cli.model_options import add_index_arguments, knowledge_base
from rag.cli.numbers import COUNT, OPTIONAL_COUNT


def register_scale(sub: argparse._SubParsersAction) -> None:
    shard = sub.add_parser("shard", help="split a knowledge base into N shards, each with its own index")
    add_index_arguments(shard, query_encoder=False)
    shard.add_argument("--shards", type=COUNT, required=True)
    shard.add_argument("--out", required=True, help="the sharded knowledge base folder (new or empty)")
    shard.add_argument("--overwrite", action="store_true", help="replace the knowledge base already at --out")
    shard.add_argument("--no-progress", action="store_true")
    shard.set_defaults(func=run_shard)

    for name, text in (("add", "add passages (an id, or a document, already there is replaced) as a new version"),
                       ("delete", "delete passages (by document from a corpus, or by id) as a new version")):  # fmt: skip
        p = sub.add_parser(name, help=text)
        add_index_arguments(p, query_encoder=False)  # required here: the built-in one is a cache
        p.add_argument("--corpus", default="", help="a .jsonl, DPR .tsv or folder of the passages' documents")
        p.add_argument("--format", default="auto", choices=["auto", "jsonl", "dpr-tsv", "folder"])
        p.add_argument("--words", type=OPTIONAL_COUNT, default=0, help="words per passage (default: the knowledge base's)")
        if name == "add":
            p.add_argument("--embeddings", default="", help="their vectors (as rag index build --embeddings); "
                                                            "default: encode with the knowledge base's d(z)")  # fmt: skip
            p.add_argument("--embeddings-id-column", default="id")
            p.add_argument("--embeddings-column", default="")
            p.add_argument("--device", default="cpu")
        else:
            p.add_argument("--ids", default="", help="a file of passage ids to delete, one per line")
        p.set_defaults(func=run_update, delete=name == "delete")

    compact = sub.add_parser("compact", help="rewrite a live-updated knowledge base as one part (re-indexes the "
                                             "stored vectors; no re-encoding)")  # fmt: skip
    add_index_arguments(compact, query_encoder=False)
    compact.add_argument("--no-progress", action="store_true")
    compact.set_defaults(func=run_compact)


def _changed_knowledge_base(args: argparse.Namespace) -> Path:
    if not args.index:
        raise ValueError(f"rag index {args.index_command} changes a knowledge base: name it with --index "
                         "(the built-in one is a cache and is never changed)")  # fmt: skip
    return Path(args.index)


def run_shard(args: argparse.Namespace) -> int:
    from rag.sharding import shard_knowledge_base

    info = shard_knowledge_base(Path(knowledge_base(args)), args.shards, Path(args.out), progress=not args.no_progress,
                                overwrite=args.overwrite)  # fmt: skip
    print(f"sharded {info.path}: {info.shards} shards of {info.rows_per_shard} passages, {info.seconds:.1f} s")
    return 0


def run_update(args: argparse.Namespace) -> int:
    from rag.config import CorpusConfig, GivenEmbeddings
    from rag.knowledge import open_knowledge_base
    from rag.updates import Change, read_change, update_knowledge_base

    kb_dir = _changed_knowledge_base(args)
    meta = open_knowledge_base(kb_dir).meta
    if args.delete and args.ids:
        if args.corpus:
            raise ValueError("rag index delete takes --corpus or --ids, not both")
        ids = [line.strip() for line in Path(args.ids).read_text(encoding="utf-8").splitlines() if line.strip()]
        if not ids:
            raise ValueError(f"{args.ids}: no passage ids")
        change = Change(delete=ids)
    else:
        if not args.corpus:
            raise ValueError(f"rag index {'delete' if args.delete else 'add'} needs --corpus"
                             + (" or --ids" if args.delete else ""))  # fmt: skip
        corpus = CorpusConfig(source=args.corpus, format=args.format,
                              words_per_passage=args.words or meta["corpus"]["words_per_passage"])  # fmt: skip
        given = None
        if not args.delete and args.embeddings:
            given = GivenEmbeddings(args.embeddings, args.embeddings_id_column, args.embeddings_column)
        change = read_change(kb_dir, corpus, given, delete=args.delete)
    info = update_knowledge_base(kb_dir, change, getattr(args, "device", "cpu"))
    print(f"{info.path}: data version {info.version}; {info.added} added, {info.replaced} replaced, "
          f"{info.deleted} deleted; {info.passages} passages, {info.tombstones} tombstones; {info.seconds:.2f} s")
    if info.tombstones > 0.2 * max(1, info.passages):
        print(f"  {info.tombstones} deleted rows are still stored: `rag index compact --index {kb_dir}` reclaims them")
    from rag.bm25 import has_bm25_index

    if has_bm25_index(kb_dir):
        print(f"  its BM25 index is for the previous version: rag index build --retriever bm25 --out {kb_dir}")
    return 0


def run_compact(args: argparse.Namespace) -> int:
    from rag.updates import compact_knowledge_base

    info = compact_knowledge_base(_changed_knowledge_base(args), progress=not args.no_progress)
    print(f"{info.path}: compacted to data version {info.version}, {info.passages} passages, {info.seconds:.1f} s")
    return 0
