"""`rag index build` and `rag index info`: make a knowledge base from a corpus, and describe one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rag.config import DEFAULT_CORPUS, DEFAULT_ENCODER, CorpusConfig, EncoderConfig, IndexConfig
from rag.knowledge import META_FILE, build_knowledge_base, open_knowledge_base


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build or describe a knowledge base (passages + index)")
    sub = parser.add_subparsers(dest="index_command", required=True)

    build = sub.add_parser("build", help="corpus -> passages -> d(z) embeddings -> MIPS index")
    build.add_argument(
        "--corpus", default=DEFAULT_CORPUS, help="a .jsonl, DPR .tsv, folder, or builtin:wiki-summaries"
    )
    build.add_argument("--format", default="auto", choices=["auto", "jsonl", "dpr-tsv", "folder", "builtin"])
    build.add_argument("--words", type=int, default=100, help="words per passage (the paper: 100)")
    build.add_argument(
        "--skip-bad-records", action="store_true", help="count bad records instead of stopping"
    )
    build.add_argument("--encoder", default=DEFAULT_ENCODER, help="passage encoder d(z) directory")
    build.add_argument(
        "--encoder-kind", default="auto",
        choices=["auto", "sentence-transformers", "transformers", "dpr-question", "dpr-context"],
    )  # fmt: skip
    build.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"])
    build.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    build.add_argument("--max-length", type=int, default=EncoderConfig.max_length, help="tokens per passage")
    build.add_argument("--batch-size", type=int, default=EncoderConfig.batch_size)
    build.add_argument("--index", default="flat", choices=["flat", "hnsw", "ivfpq", "factory"])
    build.add_argument("--factory", default="", help="FAISS index_factory string (with --index factory)")
    build.add_argument(
        "--shard-size", type=int, default=IndexConfig.shard_size, help="passages per resumable shard"
    )
    build.add_argument("--out", required=True, help="output folder (appears only when complete)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=run_build)

    info = sub.add_parser("info", help="describe a knowledge base folder")
    info.add_argument("dir")
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)


def configs_from_args(args: argparse.Namespace) -> tuple[CorpusConfig, EncoderConfig, IndexConfig]:
    if args.words < 1:
        raise ValueError(f"--words must be >= 1, got {args.words}")
    if args.index == "factory" and not args.factory:
        raise ValueError("--index factory needs --factory STRING (a FAISS index_factory string)")
    if args.factory and args.index != "factory":
        raise ValueError("--factory is only used with --index factory")
    corpus = CorpusConfig(
        source=args.corpus,
        format=args.format,
        words_per_passage=args.words,
        skip_bad_records=args.skip_bad_records,
    )
    encoder = EncoderConfig(
        path=args.encoder, kind=args.encoder_kind, pooling=args.pooling, max_length=args.max_length,
        batch_size=args.batch_size, dtype=args.dtype,
    )  # fmt: skip
    index = IndexConfig(kind=args.index, factory=args.factory, shard_size=args.shard_size)
    return corpus, encoder, index


def run_build(args: argparse.Namespace) -> int:
    corpus, encoder, index = configs_from_args(args)
    info = build_knowledge_base(corpus, encoder, index, Path(args.out), progress=not args.no_progress)
    rate = info.passages / info.seconds if info.seconds > 0 else float("inf")
    print(f"built {info.path}: {info.passages} passages from {info.documents} documents, dim {info.dim}, "
          f"{index.kind} index")  # fmt: skip
    print(f"  {info.seconds:.1f} s ({rate:.0f} passages/s); shards {info.shards}, "
          f"{info.shards_reused} reused from an interrupted build")  # fmt: skip
    if info.skipped_records:
        print(f"  {info.skipped_records} bad records skipped (--skip-bad-records)")
    return 0


def describe(path: Path) -> dict[str, Any]:
    kb = open_knowledge_base(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "path": str(path),
        "passages": kb.meta["passages"],
        "documents": kb.meta["documents"],
        "skipped_records": kb.meta["skipped_records"],
        "dim": kb.meta["dim"],
        "corpus": kb.meta["corpus"]["source"],
        "words_per_passage": kb.meta["corpus"]["words_per_passage"],
        "encoder": kb.meta["encoder"]["path"],
        "index": kb.meta["index"]["kind"]
        + (f" ({kb.meta['index']['factory']})" if kb.meta["index"]["factory"] else ""),
        "index_bytes": kb.index.nbytes,
        "bytes_on_disk": size,
        "build_seconds": kb.meta["build_seconds"],
        "fingerprint": kb.meta["fingerprint"],
    }


def run_info(args: argparse.Namespace) -> int:
    path = Path(args.dir)
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a knowledge base folder (no {META_FILE})")
    facts = describe(path)
    if args.json:
        print(json.dumps(facts, indent=2))
    else:
        width = max(len(k) for k in facts)
        for key, value in facts.items():
            print(f"{key:<{width}}  {value}")
    return 0
