"""`rag index build`, `rag index hybrid` and `rag index info`: make a knowledge base from a corpus (its
dense index, and with --retriever bm25 its BM25 index too), choose its hybrid fusion on development
questions, and describe one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from rag.cli.index_scale import register_scale
from rag.cli.model_options import add_index_arguments, knowledge_base, query_encoder
from rag.cli.numbers import COUNT, OPTIONAL_COUNT, POSITIVE
from rag.config import (
    DEFAULT_CORPUS,
    DEFAULT_ENCODER,
    CorpusConfig,
    EncoderConfig,
    GivenEmbeddings,
    IndexConfig,
)
from rag.encoder_layout import passage_dtype


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build or describe a knowledge base (passages + index)")
    sub = parser.add_subparsers(dest="index_command", required=True)

    build = sub.add_parser("build", help="corpus -> passages -> d(z) embeddings -> MIPS index")
    build.add_argument(
        "--corpus", default=DEFAULT_CORPUS, help="a .jsonl, DPR .tsv, folder, or builtin:wiki-summaries"
    )
    build.add_argument("--format", default="auto", choices=["auto", "jsonl", "dpr-tsv", "folder", "builtin"])
    build.add_argument("--words", type=COUNT, default=100, help="words per passage (the paper: 100)")
    build.add_argument(
        "--skip-bad-records", action="store_true", help="count bad records instead of stopping"
    )
    build.add_argument("--encoder", default=DEFAULT_ENCODER, help="passage encoder d(z) directory")
    build.add_argument(
        "--encoder-kind", default="auto",
        choices=["auto", "sentence-transformers", "transformers", "dpr-question", "dpr-context"],
    )  # fmt: skip
    build.add_argument("--pooling", default="auto", choices=["auto", "cls", "mean"])
    build.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                       help="d(z)'s precision (auto: bfloat16 where the CPU computes it natively, else float32; "
                            "the knowledge base records which)")
    build.add_argument("--max-length", type=COUNT, default=EncoderConfig.max_length, help="tokens per passage")
    build.add_argument("--batch-size", type=COUNT, default=EncoderConfig.batch_size)
    build.add_argument("--index-type", default="flat", choices=["flat", "hnsw", "ivfpq", "factory"],
                       help="the MIPS index over d(z) (--index names a knowledge base, on every command)")
    build.add_argument("--factory", default="", help="FAISS index_factory string (with --index-type factory)")
    build.add_argument("--query-encoder", default="",
                       help="the q(x) to record for this d(z) (default: d(z)'s own folder; a DPR context "
                            "encoder needs its question encoder here)")
    build.add_argument("--query-scale", type=POSITIVE, default=None,
                       help="q(x)'s scale to record (default: 20 for a normalised encoder, 1 otherwise)")
    build.add_argument("--ivf-lists", type=OPTIONAL_COUNT, default=0, help="ivfpq: inverted lists (0: about 4 sqrt(N))")
    build.add_argument("--pq", type=OPTIONAL_COUNT, default=0, help="ivfpq: PQ sub-quantizers, bytes per code (0: D / 4)")
    build.add_argument("--ondisk-lists", action="store_true",
                       help="IVF kinds: inverted lists memory-mapped from disk instead of held in RAM")
    build.add_argument("--embeddings", default="",
                       help="index these passage vectors instead of encoding: .npy (row i = passage i), or "
                            "Parquet/Arrow with an id and a vector column (HF wiki_dpr layout)")
    build.add_argument("--embeddings-id-column", default="id", help="id column of a Parquet/Arrow --embeddings")
    build.add_argument("--embeddings-column", default="",
                       help="vector column of a Parquet/Arrow --embeddings (default: embeddings, embedding, vector)")
    build.add_argument(
        "--shard-size", type=COUNT, default=IndexConfig.shard_size, help="passages per resumable shard"
    )
    build.add_argument("--ray", default="", metavar="ADDRESS",
                       help="encode the passages with Ray Data on this cluster (auto, local, host:port)")
    build.add_argument("--ray-workers", type=COUNT, default=2, help="with --ray: encoder actors")
    build.add_argument("--shards", type=COUNT, default=1,
                       help="split the knowledge base into N shards (rag index shard), each with its own index")
    build.add_argument("--out", required=True,
                       help="output folder: new or empty (it appears only when complete); never the current "
                            "directory, the corpus or a folder holding or inside it")
    build.add_argument("--overwrite", action="store_true", help="replace the knowledge base already at --out")
    build.add_argument("--retriever", choices=["dense", "bm25"], default="dense",
                       help="bm25: also index the passages with BM25 (bm25s), a second index in the same "
                            "folder; on an existing knowledge base only that is done (no re-encoding)")
    build.add_argument("--no-progress", action="store_true")
    build.set_defaults(func=run_build)
    register_scale(sub)

    hybrid = sub.add_parser("hybrid", help="choose the hybrid retriever's fusion on development questions "
                                           "and store it in the knowledge base (hybrid.json)")
    add_index_arguments(hybrid)
    hybrid.add_argument("--task", required=True, help="task format of the questions (rag.tasks: squad-open, nq-open, ...)")
    hybrid.add_argument("--data", required=True, help="the questions' file or folder")
    hybrid.add_argument("--subset", action="append", help="red-trivia: a list name (repeatable)")
    hybrid.add_argument("--part", choices=["all", "dev"], default="dev",
                        help="dev: positions i %% 5 != 4 only (reserved sets); never tune on a reserved fifth")
    hybrid.add_argument("--limit", type=OPTIONAL_COUNT, default=1000, help="the first N questions (0: all)")
    hybrid.add_argument("-k", type=COUNT, default=5, help="the fusion with the best recall@k is chosen")
    hybrid.set_defaults(func=run_hybrid)

    verify = sub.add_parser("verify", help="check every file of a knowledge base against its manifest "
                                           "(sizes and SHA-256) and its parts against each other")
    add_index_arguments(verify, query_encoder=False)
    verify.add_argument("--write-manifest", action="store_true",
                        help="a knowledge base built before manifests: record its files as they are now")
    verify.set_defaults(func=run_verify)

    info = sub.add_parser("info", help="describe a knowledge base folder")
    add_index_arguments(info, query_encoder=False)
    info.add_argument("--json", action="store_true")
    info.set_defaults(func=run_info)


def configs_from_args(args: argparse.Namespace) -> tuple[CorpusConfig, EncoderConfig, IndexConfig]:
    if args.words < 1:
        raise ValueError(f"--words must be >= 1, got {args.words}")
    if args.index_type == "factory" and not args.factory:
        raise ValueError("--index-type factory needs --factory STRING (a FAISS index_factory string)")
    if args.factory and args.index_type != "factory":
        raise ValueError("--factory is only used with --index-type factory")
    corpus = CorpusConfig(
        source=args.corpus,
        format=args.format,
        words_per_passage=args.words,
        skip_bad_records=args.skip_bad_records,
    )
    encoder = EncoderConfig(
        path=args.encoder, kind=args.encoder_kind, pooling=args.pooling, max_length=args.max_length,
        batch_size=args.batch_size, dtype=passage_dtype(args.dtype),
    )  # fmt: skip
    for name in ("ivf_lists", "pq"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    index = IndexConfig(kind=args.index_type, factory=args.factory, shard_size=args.shard_size,
                        ivf_lists=args.ivf_lists, pq_subquantizers=args.pq, ondisk_lists=args.ondisk_lists)  # fmt: skip
    return corpus, encoder, index


def given_from_args(args: argparse.Namespace) -> GivenEmbeddings | None:
    if not args.embeddings:
        return None
    return GivenEmbeddings(args.embeddings, args.embeddings_id_column, args.embeddings_column)


def run_build(args: argparse.Namespace) -> int:
    from rag.knowledge import META_FILE, build_knowledge_base
    from rag.sharding import build_sharded

    corpus, encoder, index = configs_from_args(args)
    out = Path(args.out)
    if args.retriever == "bm25" and not args.overwrite and (out / META_FILE).is_file():
        return _add_bm25(out, corpus, not args.no_progress)
    given = given_from_args(args)
    if args.shards < 1:
        raise ValueError(f"--shards must be >= 1, got {args.shards}")
    if args.shards > 1 and args.retriever == "bm25":
        raise ValueError("--retriever bm25 indexes one passage store; it does not combine with --shards")

    if args.ray_workers < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {args.ray_workers}")
    if args.ray and given is not None:
        raise ValueError("--ray encodes the corpus; with --embeddings nothing is encoded")
    encode = None
    if args.ray:
        from rag.distributed.encoding import encode_shards_on_ray

        def encode(store_path: Path, jobs: list, progress: bool) -> None:
            encode_shards_on_ray(store_path, encoder, jobs, args.ray_workers, args.ray, progress=progress)

    def build(folder: Path, overwrite: bool) -> Any:
        return build_knowledge_base(corpus, encoder, index, folder, progress=not args.no_progress, given=given,
                                    query_encoder=args.query_encoder or None, query_scale=args.query_scale,
                                    overwrite=overwrite, encode_shards=encode)  # fmt: skip

    if args.shards > 1:
        info, sharded = build_sharded(build, args.shards, out, not args.no_progress, args.overwrite)
        print(f"sharded {sharded.path}: {sharded.shards} shards of {sharded.rows_per_shard} passages")
    else:
        info = build(out, args.overwrite)
    rate = info.passages / info.seconds if info.seconds > 0 else float("inf")
    print(f"built {info.path}: {info.passages} passages from {info.documents} documents, dim {info.dim}, "
          f"{index.kind} index")  # fmt: skip
    if given is not None:
        print(f"  {info.seconds:.1f} s ({rate:.0f} passages/s), vectors given by {given.path}")
    else:
        print(f"  {info.seconds:.1f} s ({rate:.0f} passages/s); shards {info.shards}, "
              f"{info.shards_reused} reused from an interrupted build")  # fmt: skip
    print(f"  peak RSS {info.peak_rss_bytes / 2**30:.2f} GiB")
    if info.skipped_records:
        print(f"  {info.skipped_records} bad records skipped (--skip-bad-records)")
    return _add_bm25(out, corpus, not args.no_progress) if args.retriever == "bm25" else 0


def _add_bm25(out: Path, corpus: CorpusConfig, progress: bool) -> int:
    """Index a finished knowledge base's passages with BM25 (a corpus flag must name its corpus)."""
    from rag.bm25 import build_bm25_index
    from rag.knowledge import open_knowledge_base

    built_from = open_knowledge_base(out).meta["corpus"]["source"]
    if corpus.source != DEFAULT_CORPUS and corpus.source != built_from:
        raise ValueError(f"{out} holds the passages of {built_from}, not of --corpus {corpus.source}; "
                         "give another --out for a new knowledge base")  # fmt: skip
    info = build_bm25_index(out, progress=progress)
    print(f"BM25 index of {out}: {info.passages} passages, {info.terms} terms, {info.seconds:.1f} s")
    return 0


def run_hybrid(args: argparse.Namespace) -> int:
    from rag.hybrid import choose_hybrid_fusion
    from rag.retriever import HybridRetriever
    from rag.tasks import read_task, split_reserved

    options = {"subsets": args.subset} if args.subset else {}
    examples = read_task(args.task, Path(args.data), **options)
    examples = split_reserved(examples, "dev") if args.part == "dev" else examples
    examples = examples[: args.limit] if args.limit else examples
    if not examples:
        raise ValueError(f"{args.data}: no questions to choose the fusion on")
    index = knowledge_base(args)
    retriever = HybridRetriever.open(index, encoder=query_encoder(args, index))
    provenance = {"task": args.task, "data": str(Path(args.data).resolve()), "part": args.part,
                  "limit": args.limit, "subset": args.subset}  # fmt: skip
    choice = choose_hybrid_fusion(retriever, examples, k=args.k, kb_dir=index, provenance=provenance)
    for method in ("rrf", "interpolation"):
        best = max((t for t in choice.tried if t["method"] == method), key=lambda t: t[f"recall_at_{args.k}"])
        print(f"{method:>13}: best weight {best['weight']:.2f}, recall@{args.k} {100 * best[f'recall_at_{args.k}']:.1f}")
    print(f"chosen on {choice.questions} questions: {choice.config.method}, dense weight {choice.config.weight:.2f} "
          f"-> {choice.path}")  # fmt: skip
    return 0


def describe(path: Path) -> dict[str, Any]:
    from rag.knowledge import data_version, open_knowledge_base

    kb = open_knowledge_base(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {
        "path": str(path),
        "passages": len(kb.passages),
        "documents": kb.meta.get("documents"),
        "skipped_records": kb.meta.get("skipped_records"),
        "dim": kb.index.dim,  # the index's own, not what meta.json says (open_knowledge_base checks they agree)
        "corpus": (kb.meta.get("corpus") or {}).get("source"),
        "words_per_passage": (kb.meta.get("corpus") or {}).get("words_per_passage"),
        "encoder": kb.meta["encoder"]["path"],
        "query_encoder": _query_encoder_fact(kb.meta),
        "index": kb.index.config.kind + (f" ({kb.index.config.factory})" if kb.index.config.factory else ""),
        "index_bytes": kb.index.nbytes,
        "bytes_on_disk": size,
        "build_seconds": kb.meta.get("build_seconds"),
        "fingerprint": kb.meta.get("fingerprint"),
        "data_version": data_version(kb.meta),
        "shards": len(kb.meta.get("shards", [])) or 1,
        "update_segments": len(kb.meta.get("segments", [])),
        "tombstones": _tombstones(path, kb.meta),
        **_bm25_facts(path),
    }


def _query_encoder_fact(meta: dict[str, Any]) -> str:
    from rag.knowledge import query_encoder_config

    try:
        q = query_encoder_config(meta)
    except ValueError as error:
        return f"none ({error})"
    recorded = "" if meta.get("query_encoder") else " (not recorded: built before q(x) was recorded; this rule's)"
    return f"{q.path}, scale {q.scale:g}{recorded}"


def _tombstones(path: Path, meta: dict[str, Any]) -> int:
    """Deleted rows still stored (rag index compact removes them), over every shard."""
    import numpy as np

    from rag.knowledge import open_knowledge_base

    if meta.get("shards"):
        return sum(_tombstones(path / s, open_knowledge_base(path / s).meta) for s in meta["shards"])
    return len(np.load(path / meta["deleted"])) if meta.get("deleted") else 0


def _bm25_facts(path: Path) -> dict[str, Any]:
    from rag.bm25 import BM25_DIR, bm25_meta, has_bm25_index
    from rag.fusion import load_fusion

    if not has_bm25_index(path):
        return {"bm25": "none (rag index build --retriever bm25)"}
    meta = bm25_meta(path)
    fusion, chosen_on = load_fusion(path)
    size = sum(f.stat().st_size for f in (path / BM25_DIR).rglob("*") if f.is_file())
    hybrid = f"{fusion.method}, dense weight {fusion.weight:.2f}" + (
        f" (chosen on {chosen_on.get('questions')} questions of {chosen_on.get('task') or chosen_on.get('set')})"
        if chosen_on
        else " (defaults: rag index hybrid chooses on development questions)")  # fmt: skip
    return {"bm25": f"{meta['terms']} terms, {size} bytes, built in {meta.get('build_seconds', '?')} s",
            "hybrid": hybrid}  # fmt: skip


def run_verify(args: argparse.Namespace) -> int:
    from rag.knowledge import META_FILE, OPTIONAL_PARTS, build_lock, open_knowledge_base
    from rag.manifest import read_manifest, verify_folder, write_manifest

    path = Path(knowledge_base(args))
    if not (path / META_FILE).is_file():
        raise FileNotFoundError(f"{path}: not a knowledge base folder (no {META_FILE})")
    if read_manifest(path) is None:
        if not args.write_manifest:
            raise ValueError(f"{path}: no manifest.json (built before manifests): its files cannot be checked; "
                             "--write-manifest records them as they are now")  # fmt: skip
        with build_lock(path):
            kb = open_knowledge_base(path)  # its parts agree (rows, dim) before they are recorded
            manifest = write_manifest(path)
        print(f"{path}: manifest written: {len(manifest['files'])} files ({len(kb.passages)} passages)")
        return 0
    checked = verify_folder(path, full=True, optional=OPTIONAL_PARTS)
    kb = open_knowledge_base(path)
    print(f"{path}: ok: {checked.files} files, {checked.bytes:,} bytes, every size and SHA-256 as recorded; "
          f"{len(kb.passages)} passages, {len(kb.index)} index rows of dim {kb.index.dim}")  # fmt: skip
    return 0


def run_info(args: argparse.Namespace) -> int:
    from rag.knowledge import META_FILE

    path = Path(knowledge_base(args))
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
