"""The knowledge base commands for scale: `rag index shard`, live updates (`add`, `delete`, `compact`).

    rag index shard --index KB --shards 4 --out KB4    # N shards, each with its own index (rag.sharding)
    rag index add --index KB --corpus new.jsonl         # add passages; ids (documents) already there are replaced
    rag index delete --index KB --corpus old.jsonl      # delete those documents' passages (or --ids FILE)
    rag index compact --index KB                        # one part again: no segments, no tombstones
    rag index plan --passages 21000000 --dim 768 --ram 24GiB --recall 0.95   # machines, index, q/s
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rag.cli.model_options import add_index_arguments, knowledge_base
from rag.cli.numbers import COUNT, OPTIONAL_COUNT, number


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

    plan = sub.add_parser("plan", help="the index, machines and memory that N passages need (from measurements)")
    plan.add_argument("--passages", type=COUNT, required=True)
    plan.add_argument("--dim", type=COUNT, default=768)
    plan.add_argument("--ram", default="24GiB", help="RAM per machine (24GiB, 64G, ...)")
    plan.add_argument("--recall", type=number(gt=0, max=1), default=0.95, help="recall@10 against exact search to reach")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(func=run_plan)


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


def run_plan(args: argparse.Namespace) -> int:
    import json

    from rag.plan import load_measurements, parse_bytes, plan_table

    table = plan_table(args.passages, args.dim, parse_bytes(args.ram), args.recall, load_measurements())
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    print(f"{args.passages:,} passages x {args.dim} dims on machines of {table['ram_gib']:.0f} GiB, "
          f"recall@10 >= {args.recall}:")
    header = ("index", "setting", "machines", "RAM/machine GiB", "disk/machine GiB", "recall@10", "q/s b1",
              "q/s b64", "build CPU h")  # fmt: skip
    rows = [(r["kind"], r["setting"], r["machines"], f"{r['ram_per_machine_gib']:.1f}",
             f"{r['disk_per_machine_gib']:.1f}", f"{r['recall_at_10']:.3f}" + ("*" if r["recall_extrapolated"] else ""),
             f"{r['qps_b1']:.1f}", f"{r['qps_b64']:.1f}", f"{r['build_cpu_hours']:.1f}") for r in table["options"]]  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    for line in (header, *rows):
        print("  " + "  ".join(str(x).ljust(w) for x, w in zip(line, widths, strict=True)))
    best = table["recommended"]
    if best is None:
        print(f"no measured setting reaches recall@10 {args.recall}")
        return 1
    print(f"recommended: {best['kind']} ({best['setting']}) in {best['machines']} shard(s), one per machine: "
          f"{best['passages_per_shard']:,} passages and {best['ram_per_machine_gib']:.1f} GiB RAM each, "
          f"recall@10 {best['recall_at_10']:.3f}, {best['qps_b1']:.1f} q/s per core at batch 1 "
          f"({best['latency_ms']:.0f} ms), {best['qps_b64']:.1f} at batch 64")
    print("  figures: measured at n0 passages (rag/scale_measurements.py: 1M by bench/bench_scale.py, 21M by "
          f"bench/bench_21m.py), scaled to {args.passages:,} by rag/plan.py's rules where that differs; "
          "* recall measured at fewer passages than a shard holds; q/s per core, measured on one core")  # fmt: skip
    return 0
