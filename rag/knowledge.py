"""The knowledge base: corpus -> passage store -> d(z) for every passage -> MIPS index, on disk.

A finished knowledge base is one folder:
    passages.arrow   the passage store (row i = passage i)          rag.store
    index/           the DenseIndex over d(z), row i = passage i    rag.index
    meta.json        configs, counts, dim and fingerprint; written last, so its presence marks the
                     folder complete (the folder itself appears in one rename, rag.io.atomic_dir)

Given embeddings (rag.vectors: `.npy`, Parquet or Arrow with ids) replace the encoding: they are
matched to the passages by id into one (N, D) file in the work folder and indexed from there, by
passes that read the file in chunks (peak memory bounded whatever N is).

Building is resumable. Work happens in `.{out}.build-{fingerprint}` beside the output folder: the
passage store first, then the embeddings in shards of `IndexConfig.shard_size` passages, each shard
saved atomically as soon as it is encoded. A rerun with the same configs and corpus finds the folder
by its fingerprint and encodes only the missing shards; the folder is removed once the knowledge base
is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import resource
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

import numpy as np

from rag.config import CorpusConfig, EncoderConfig, GivenEmbeddings, IndexConfig, from_dict, to_dict
from rag.corpus import BUILTIN_PREFIX, Passage, ReadReport, iter_passages, passage_text
from rag.encoder_layout import default_query_scale, inspect_encoder_dir, passage_dtype
from rag.index import DenseIndex, check_buildable, link_or_copy, store_dtype
from rag.io import (
    atomic_dir,
    atomic_path,
    atomic_write_text,
    check_output_dir,
    output_lock,
    read_format_json,
    remove_stale_temps,
    remove_stale_temps_in,
)
from rag.manifest import read_manifest, verify_folder, write_manifest
from rag.resources import cache_dir, resolve_path, wiki_summaries_path
from rag.shards import PartedIndex, PartedPassages
from rag.store import PassageStore, write_passage_store
from rag.vectors import EmbeddingsError, EmbeddingsFile, align_embeddings, open_embeddings

if TYPE_CHECKING:
    from rag.encoders import Encoder

FORMAT = "rag-knowledge-base"
VERSION = 1
META_FILE = "meta.json"
PASSAGES_FILE = "passages.arrow"
INDEX_DIR = "index"
# Parts added to a finished knowledge base later, rebuilt or defaulted when absent (rag.bm25, rag.fusion):
# the manifest covers them once added, but their absence as a whole is no integrity error.
OPTIONAL_PARTS = ("bm25", "hybrid.json")
# Seconds to sleep after each shard: lets tests interrupt a build part-way deterministically.
PAUSE_ENV = "RAG_BUILD_SHARD_PAUSE_S"


@dataclass(frozen=True)
class KnowledgeBaseInfo:
    path: Path
    passages: int
    documents: int
    skipped_records: int
    dim: int
    shards: int
    shards_reused: int  # shards found finished from an interrupted earlier run
    seconds: float
    fingerprint: str
    peak_rss_bytes: int = 0  # the building process's peak resident memory (ru_maxrss)


class KnowledgeBase(NamedTuple):
    index: DenseIndex
    passages: PassageStore
    meta: dict[str, Any]


def _files_signature(path: Path, what: str) -> list[tuple[str, int, int]]:
    """(relative name, size, mtime) of a file or of every file under a folder."""
    if path.is_file():
        st = path.stat()
        return [(path.name, st.st_size, st.st_mtime_ns)]
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return [
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]


def sources_signature(corpus: CorpusConfig, encoder: EncoderConfig) -> str:
    """A hash of the corpus and encoder files (names, sizes, mtimes)."""
    source = wiki_summaries_path() if corpus.source.startswith(BUILTIN_PREFIX) else Path(corpus.source)
    key = [_files_signature(source, "corpus"), _files_signature(resolve_path(encoder.path), "encoder")]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def fingerprint(corpus: CorpusConfig, encoder: EncoderConfig, index: IndexConfig,
                given: GivenEmbeddings | None = None) -> str:  # fmt: skip
    """A hash of the configs and of the corpus, encoder and given embeddings files (names, sizes, mtimes)."""
    source = wiki_summaries_path() if corpus.source.startswith(BUILTIN_PREFIX) else Path(corpus.source)
    key = {
        "version": VERSION,
        "corpus": to_dict(corpus),
        # scale is q(x)'s temperature: d(z) is built with 1.0 (checked in build_knowledge_base)
        "encoder": {k: v for k, v in to_dict(encoder).items() if k != "scale"},
        "index": to_dict(index),
        "corpus_files": _files_signature(source, "corpus"),
        "encoder_files": _files_signature(resolve_path(encoder.path), "encoder"),
        "passage_text": passage_text("T", "x"),
    }
    if given is not None:
        key["given"] = {**to_dict(given), "files": _files_signature(Path(given.path), "embeddings file")}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def work_dir_for(out_dir: Path, fp: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.build-{fp[:16]}"


@contextlib.contextmanager
def build_lock(out_dir: Path) -> Iterator[None]:
    """One writer per knowledge base folder at a time (another process waits here, then finds the
    folder as the first left it); the lock file is removed on release (rag.io.output_lock)."""
    with output_lock(out_dir, wait=True, what="knowledge base"):
        yield


def is_knowledge_base(path: Path | str) -> bool:
    """Whether `path` is a finished knowledge base folder (its meta.json says so)."""
    try:
        read_knowledge_meta(path)
    except (OSError, ValueError):
        return False
    return True


def build_inputs(corpus: CorpusConfig, encoder: EncoderConfig, given: GivenEmbeddings | None = None,
                 query_encoder: EncoderConfig | str | None = None) -> list[Path]:  # fmt: skip
    """The paths a build reads, which its output must never replace or be inside."""
    paths = [] if corpus.source.startswith(BUILTIN_PREFIX) else [Path(corpus.source)]
    for spec in (encoder.path, query_encoder.path if isinstance(query_encoder, EncoderConfig) else query_encoder):
        if spec:
            paths.append(resolve_path(spec))
    return paths + ([Path(given.path)] if given is not None else [])


def build_knowledge_base(
    corpus: CorpusConfig,
    encoder: EncoderConfig,
    index: IndexConfig,
    out_dir: Path | str,
    progress: bool = True,
    device: str = "cpu",
    given: GivenEmbeddings | None = None,
    query_encoder: EncoderConfig | str | None = None,
    query_scale: float | None = None,
    overwrite: bool = False,
    encode_shards: ShardEncoding | None = None,
) -> KnowledgeBaseInfo:
    """Build (or finish an interrupted build of) the knowledge base in `out_dir`.

    out_dir: a new or empty folder, or (overwrite) a knowledge base to replace; never anything else,
    the current directory, or a folder holding or inside an input (rag.io.check_output_dir).

    given: index these embeddings (matched to the passages by id) instead of encoding the corpus;
    `encoder` then names the d(z) that made them (its dim is checked; q(x) defaults to it).
    query_encoder, query_scale: the q(x) recorded for this d(z) (matching_query_encoder: default d(z)'s
    own folder, scale 20 if it normalises, else 1).
    encode_shards: encodes the missing shards elsewhere (rag.distributed.encoding: a Ray actor pool)
    instead of one after the other in this process; it writes the same files.
    """
    out_dir = Path(out_dir).resolve()
    inputs = build_inputs(corpus, encoder, given, query_encoder)
    check_output_dir(out_dir, what="knowledge base", is_own=is_knowledge_base, overwrite=overwrite, inputs=inputs)
    with build_lock(out_dir):
        # again under the lock: a concurrent build may have finished one here while this one waited
        check_output_dir(out_dir, what="knowledge base", is_own=is_knowledge_base, overwrite=overwrite,
                         inputs=inputs)  # fmt: skip
        return _build(corpus, encoder, index, out_dir, progress, device, given, query_encoder, query_scale,
                      encode_shards)


def _build(
    corpus: CorpusConfig,
    encoder: EncoderConfig,
    index: IndexConfig,
    out_dir: Path,
    progress: bool,
    device: str,
    given: GivenEmbeddings | None = None,
    query_encoder: EncoderConfig | str | None = None,
    query_scale: float | None = None,
    encode_shards: ShardEncoding | None = None,
) -> KnowledgeBaseInfo:
    start = time.perf_counter()
    if encoder.scale != 1.0:
        raise ValueError(
            f"the passage encoder d(z) must have scale 1.0, got {encoder.scale}; scale q(x) instead"
        )
    query = matching_query_encoder(encoder, query_encoder, query_scale)
    remove_stale_temps(out_dir)  # a killed build's full-size temporary copy (we hold the lock)
    if index.kind == "factory" and not index.factory:
        raise ValueError(
            "IndexConfig.kind 'factory' needs IndexConfig.factory (a FAISS index_factory string)"
        )
    source = open_embeddings(given.path, given.id_column, given.vector_column) if given else None
    from rag.encoders import load_encoder  # torch and transformers: only when a build encodes

    d_z = load_encoder(encoder, device)
    # the index settings (a factory string, PQ sizes) against d(z)'s dim before the corpus is read; the
    # passage count is checked once it is known (IVF needs enough rows to train)
    check_buildable(index, 1 << 20, d_z.dim)
    fp = fingerprint(corpus, encoder, index, given)
    work = work_dir_for(out_dir, fp)
    store, counts = _passage_store(corpus, work)
    if len(store) == 0:
        raise ValueError(f"{corpus.source}: the corpus has no passages")
    check_buildable(index, len(store), d_z.dim)
    shards, reused = [], 0
    if source is None:
        shards, reused = _encode_shards(store, d_z, encoder.batch_size, index.shard_size, work, progress,
                                        encode_shards)  # fmt: skip
    else:
        if source.dim != d_z.dim:
            raise EmbeddingsError(f"{source.path}: vectors of dim {source.dim}, the passage encoder {encoder.path} "
                                  f"makes {d_z.dim}; name the encoder that made them (--encoder)")  # fmt: skip
        if source.rows is not None and source.rows != len(store):
            raise EmbeddingsError(f"{source.path}: {source.rows} vectors, the corpus has {len(store)} passages")
    del d_z
    with atomic_dir(out_dir, replaces=is_knowledge_base) as tmp:
        if source is None:
            built = DenseIndex.build_from_shards(shards, index, tmp / INDEX_DIR, progress=progress)
        else:
            aligned = _aligned_embeddings(source, store, index, work, progress)
            built = DenseIndex.build_from_file(aligned, index, tmp / INDEX_DIR, work / "index-stages", progress)
        link_or_copy(work / PASSAGES_FILE, tmp / PASSAGES_FILE)
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "fingerprint": fp,
            "corpus": to_dict(corpus),
            "encoder": to_dict(encoder),
            "index": to_dict(index),
            "passages": len(store),
            "documents": counts["documents"],
            "skipped_records": counts["skipped"],
            "dim": built.dim,
            "passage_text": "title. text (rag.encoders.passage_text)",
            "sources": sources_signature(corpus, encoder),
            "build_seconds": round(time.perf_counter() - start, 3),
        }
        meta["query_encoder"] = to_dict(query) if query is not None else None
        if given is not None:
            meta["given_embeddings"] = to_dict(given)
        del built  # release the memory map before the folder is renamed
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        write_manifest(tmp)  # last: every file's size and hash, checked when the folder is opened
    for stale in out_dir.parent.glob(f".{out_dir.name}.build-*"):  # ours, and older configs' leftovers
        shutil.rmtree(stale, ignore_errors=True)
    return KnowledgeBaseInfo(
        out_dir, len(store), counts["documents"], counts["skipped"], meta["dim"],
        len(shards), reused, time.perf_counter() - start, fp, peak_rss_bytes(),
    )  # fmt: skip


def peak_rss_bytes() -> int:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _aligned_embeddings(source: EmbeddingsFile, store: PassageStore, index: IndexConfig, work: Path,
                        progress: bool) -> Path:  # fmt: skip
    """The given vectors in store order and the index's dtype, written once into the work folder
    (embeddings.json marks it finished); a .npy already in that dtype is used where it is."""
    marker, out = work / "embeddings.json", work / "embeddings.npy"
    if marker.is_file():
        return Path(json.loads(marker.read_text(encoding="utf-8"))["path"])
    aligned = align_embeddings(source, store, out, store_dtype(index), progress)
    atomic_write_text(marker, json.dumps({"path": str(aligned.path), "linked": aligned.linked}))
    return aligned.path


def _passage_store(corpus: CorpusConfig, work: Path) -> tuple[PassageStore, dict[str, int]]:
    """The work folder's passage store, written once; corpus.json marks it finished."""
    marker = work / "corpus.json"
    if not marker.exists():
        report = ReadReport()
        try:
            write_passage_store(iter_passages(corpus, report), work / PASSAGES_FILE)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # nothing worth resuming yet: leave no trace
            raise
        counts = {"documents": report.documents, "skipped": report.skipped, "passages": report.passages}
        atomic_write_text(marker, json.dumps(counts))
    counts = json.loads(marker.read_text(encoding="utf-8"))
    return PassageStore.open(work / PASSAGES_FILE), counts


class ShardEncoding(Protocol):
    """Encodes rows [lo, hi) of the passage store into each job's .npy (as `_encode_shards` does)."""

    def __call__(self, store_path: Path, jobs: list[tuple[int, int, Path]], progress: bool) -> None: ...


def _encode_shards(
    store: PassageStore, d_z: Encoder, batch_size: int, shard_size: int, work: Path, progress: bool,
    elsewhere: ShardEncoding | None = None,
) -> tuple[list[Path], int]:
    """Encode the store shard by shard into work/shards/NNNNNN.npy; reuse finished shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    n = len(store)
    bounds = [(s, min(n, s + shard_size)) for s in range(0, n, shard_size)]
    paths = [work / "shards" / f"{i:06d}.npy" for i in range(len(bounds))]
    remove_stale_temps_in(work / "shards")  # a killed build's half-written shards (we hold the lock)
    done = [_shard_ok(p, hi - lo, d_z.dim) for p, (lo, hi) in zip(paths, bounds, strict=True)]
    if elsewhere is not None:
        (work / "shards").mkdir(parents=True, exist_ok=True)
        jobs = [(lo, hi, p) for p, (lo, hi), ok in zip(paths, bounds, done, strict=True) if not ok]
        elsewhere(store.path, jobs, progress)
        missing = [p for p, (lo, hi) in zip(paths, bounds, strict=True) if not _shard_ok(p, hi - lo, d_z.dim)]
        if missing:
            raise RuntimeError(f"{len(missing)} shards were not encoded, e.g. {missing[0]}")
        return paths, sum(done)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        reused_rows = sum(hi - lo for ok, (lo, hi) in zip(done, bounds, strict=True) if ok)
        bar = tqdm(total=n, initial=reused_rows, desc="encoding passages", unit="passage")
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    todo = [(path, lo, hi) for path, (lo, hi), ok in zip(paths, bounds, done, strict=True) if not ok]

    def token_ids(lo: int, hi: int) -> list[list[int]]:
        return d_z.token_ids([passage_text(p.title, p.text) for p in store.get(np.arange(lo, hi))])

    # One worker reads and tokenises shard i + 1 while shard i encodes (the fast tokenizer and the
    # matrix products both release the GIL), so tokenisation costs no wall time.
    with ThreadPoolExecutor(max_workers=1) as worker:
        try:
            pending = worker.submit(token_ids, *todo[0][1:]) if todo else None
            for i, (path, _, _) in enumerate(todo):
                ids = pending.result()
                pending = worker.submit(token_ids, *todo[i + 1][1:]) if i + 1 < len(todo) else None
                vectors = d_z.encode_ids(ids, batch_size=batch_size, progress=bar if bar is not None else False)
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, vectors)
                if pause > 0:
                    time.sleep(pause)
        finally:
            if bar is not None:
                bar.close()
    return paths, sum(done)


def _shard_ok(path: Path, rows: int, dim: int) -> bool:
    if not path.exists():
        return False
    try:
        return np.load(path, mmap_mode="r").shape == (rows, dim)
    except (ValueError, OSError):
        return False


def open_knowledge_base(path: Path | str) -> KnowledgeBase:
    """Open a finished knowledge base folder: refuses one without meta.json (an unfinished build), one
    whose files differ from its manifest (rag.manifest: sizes always, hashes on first open), and one
    whose parts disagree (rows, dim); every error names the file.

    A sharded knowledge base (rag.sharding) or one with live updates (rag.updates) opens as one
    PartedIndex and PartedPassages over its parts (rag.shards), with the interface of one index.
    """
    path = Path(path)
    meta = read_knowledge_meta(path)
    verify_folder(path, optional=OPTIONAL_PARTS)
    _check_meta(path, meta)
    if meta.get("shards"):
        shards = [open_knowledge_base(path / name) for name in meta["shards"]]
        index: Any = PartedIndex([s.index for s in shards])
        passages: Any = PartedPassages([s.passages for s in shards], index.space, path)
    else:
        index = DenseIndex.load(path / INDEX_DIR)
        passages = PassageStore.open(path / PASSAGES_FILE)
        segments = [path / name for name in meta.get("segments", [])]
        if segments or meta.get("deleted"):
            parts = [(index, passages)] + [(DenseIndex.load(s / INDEX_DIR), PassageStore.open(s / PASSAGES_FILE))
                                           for s in segments]  # fmt: skip
            live = live_masks(path, meta, [len(i) for i, _ in parts])
            index = PartedIndex([i for i, _ in parts], live)
            passages = PartedPassages([p for _, p in parts], index.space, path)
    if not len(index) == len(passages) == meta["passages"]:
        raise ValueError(
            f"{path}: {len(index)} index rows, {len(passages)} stored passages, meta.json says {meta['passages']}"
        )
    if index.dim != meta["dim"]:
        raise ValueError(f"{path / META_FILE}: field 'dim': {meta['dim']}, but the index holds vectors of dim {index.dim}")
    return KnowledgeBase(index, passages, meta)


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """The fields every reader of a knowledge base relies on, present and of the right type."""
    for key, kind in (("passages", int), ("dim", int), ("encoder", dict), ("index", dict)):
        if key not in meta:
            raise ValueError(f"{path / META_FILE}: field {key!r}: missing")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise ValueError(f"{path / META_FILE}: field {key!r}: expected {kind.__name__}, got {type(meta[key]).__name__}")


def live_masks(path: Path, meta: Mapping[str, Any], sizes: Sequence[int]) -> list[np.ndarray | None]:
    """Per part (base, then update segments), which rows are live: meta["deleted"] names an .npy of
    deleted rows numbered over all parts' rows (deleted ones included)."""
    if not meta.get("deleted"):
        return [None] * len(sizes)
    deleted = np.load(path / meta["deleted"], allow_pickle=False)
    total = int(sum(sizes))
    if deleted.ndim != 1 or deleted.dtype.kind not in "iu" or (deleted.size and not 0 <= deleted.min() <= deleted.max() < total):
        raise ValueError(f"{path / meta['deleted']}: expected deleted rows in [0, {total}), got {deleted.dtype} "
                         f"{deleted.shape}")  # fmt: skip
    alive = np.ones(total, dtype=bool)
    alive[deleted] = False
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return [None if alive[a:b].all() else alive[a:b].copy() for a, b in zip(starts[:-1], starts[1:], strict=True)]


def data_version(meta: Mapping[str, Any]) -> int:
    """The knowledge base's data version: 1 when built, +1 for every live update (rag.updates)."""
    return int(meta.get("data_version", 1))


def write_knowledge_base(passages: Sequence[Passage], vectors: np.ndarray, meta: Mapping[str, Any],
                         out_dir: Path | str) -> Path:
    """A knowledge base folder (rag.knowledge's layout) from passages and their d(z) vectors (N, D),
    written atomically; `meta` is a base's meta.json with what changed (its "index" config is used)."""
    if len(passages) != vectors.shape[0]:
        raise ValueError(f"{len(passages)} passages but {vectors.shape[0]} vectors")
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, replaces=is_knowledge_base) as tmp:
        DenseIndex.build(vectors, from_dict(IndexConfig, meta["index"])).save(tmp / INDEX_DIR)
        write_passage_store(passages, tmp / PASSAGES_FILE)
        meta = dict(meta, passages=len(passages), dim=int(vectors.shape[1]))
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
        write_manifest(tmp)  # last: every file's size and hash, checked when the folder is opened
    return out_dir


def save_knowledge_base(index: DenseIndex, passages: PassageStore, encoder: EncoderConfig, out_dir: Path | str,
                        fingerprint: str) -> Path:  # fmt: skip
    """A knowledge base folder holding `passages` and the index's stored d(z) as they are now (e.g. a
    trained d(z)'s, rag.passage_training), with `encoder` recorded as its passage encoder."""
    rows = np.arange(len(passages))
    vectors = index.embeddings(rows).astype(np.float32)  # (N, D)
    meta = {"format": FORMAT, "version": VERSION, "fingerprint": fingerprint, "index": to_dict(index.config),
            "encoder": to_dict(encoder)}  # fmt: skip
    return write_knowledge_base(list(passages.get(rows)), vectors, meta, out_dir)


def encoder_config(meta: dict[str, Any]) -> EncoderConfig:
    """The passage encoder's config recorded in a knowledge base's meta.json."""
    return _meta_config(meta, "encoder")


def _meta_config(meta: Mapping[str, Any], key: str) -> EncoderConfig:
    try:
        return from_dict(EncoderConfig, meta[key])
    except KeyError:
        raise ValueError(f"knowledge base meta.json: field {key!r}: missing") from None
    except (TypeError, ValueError) as error:
        raise ValueError(f"knowledge base meta.json: field {key!r}: {error}") from None


def matching_query_encoder(d_z: EncoderConfig, query: EncoderConfig | str | None = None,
                           scale: float | None = None) -> EncoderConfig | None:  # fmt: skip
    """The q(x) a knowledge base records for its d(z): `query` if given (its own scale if a config),
    else d(z)'s own folder; the scale `scale`, else rag.encoders.default_query_scale. None when d(z) is a
    DPR context encoder and no q(x) is given: its question encoder is another model."""
    if isinstance(query, EncoderConfig):
        return query if scale is None else dataclasses.replace(query, scale=scale)
    if query:
        config = EncoderConfig(path=str(query))
    elif inspect_encoder_dir(d_z).kind == "dpr-context":
        return None
    else:
        config = dataclasses.replace(d_z, scale=1.0, dtype="float32", batch_size=EncoderConfig.batch_size)
    return dataclasses.replace(config, scale=default_query_scale(config) if scale is None else scale)


def query_encoder_config(knowledge_base: Path | str | Mapping[str, Any], query: EncoderConfig | str | None = None,
                         scale: float | None = None) -> EncoderConfig:  # fmt: skip
    """THE rule for q(x) over a knowledge base (a folder, or its meta.json): `rag ask`, `search`, `eval`,
    `train`, the server and RagModel.from_config all call this.

    - `query` (a checkpoint's trained q(x), or --query-encoder) when given;
    - else the q(x) the knowledge base records (meta.json "query_encoder", set by rag index build);
    - else (a knowledge base built before it recorded one) the rule that build applies now: d(z)'s
      own folder, unless d(z) is a DPR context encoder (then q(x) must be given).
    The scale: `scale` if given, else the recorded one, else 20 for a normalised encoder, 1 otherwise."""
    meta = knowledge_base if isinstance(knowledge_base, Mapping) else read_knowledge_meta(knowledge_base)
    where = "" if isinstance(knowledge_base, Mapping) else f"{knowledge_base}: "
    if query is None and meta.get("query_encoder") is not None:
        recorded = _meta_config(meta, "query_encoder")
        return recorded if scale is None else dataclasses.replace(recorded, scale=scale)
    config = matching_query_encoder(encoder_config(meta), query, scale)
    if config is None:
        raise ValueError(f"{where}its d(z) is a DPR context encoder ({meta['encoder'].get('path')}) and it records "
                         "no q(x): give the matching DPR question encoder (--query-encoder), or rebuild with "
                         "rag index build --query-encoder")  # fmt: skip
    return config


def read_knowledge_meta(path: Path | str) -> dict[str, Any]:
    """A finished knowledge base's meta.json (checked for its format), without opening the index."""
    return read_format_json(path, META_FILE, FORMAT, "knowledge base (rag index build)")


def default_knowledge_base(progress: bool = True) -> Path:
    """The default knowledge base (built-in corpus, default encoder, flat index), built once.

    d(z) is encoded in bfloat16 where the CPU computes it natively (rag.encoder_layout.passage_dtype), else in
    float32. The two builds live in separate cache folders, `kb/default` (float32, the folder earlier
    versions built) and `kb/default-bfloat16`: neither is ever taken for the other, and switching never
    deletes one (same_build checks the recorded configs too).
    """
    encoder = EncoderConfig(dtype=passage_dtype("auto"))  # type: ignore[arg-type]
    name = "default" if encoder.dtype == "float32" else f"default-{encoder.dtype}"
    out = (cache_dir() / "kb" / name).resolve()
    corpus, index = CorpusConfig(), IndexConfig()
    with build_lock(out):  # several processes may ask at once: one builds, the others wait
        if is_knowledge_base(out) and same_build(read_knowledge_meta(out), corpus, encoder, index):
            if read_manifest(out) is None:  # the cache's own, built before manifests: record it once
                open_knowledge_base(out)  # consistent as it is (rows, dim)
                write_manifest(out)
            return out
        _build(corpus, encoder, index, out, progress, "cpu")
    return out


def same_build(
    meta: dict[str, Any], corpus: CorpusConfig, encoder: EncoderConfig, index: IndexConfig
) -> bool:
    """Whether a knowledge base's meta.json describes this build: same fingerprint, or the same configs
    up to fields that do not change d(z) or the index (so a config field added later, at its default,
    does not force a rebuild) and the same corpus and encoder files."""
    if meta.get("fingerprint") == fingerprint(corpus, encoder, index):
        return True
    try:
        built = (from_dict(CorpusConfig, meta["corpus"]), from_dict(EncoderConfig, meta["encoder"]),
                 from_dict(IndexConfig, meta["index"]))  # fmt: skip
    except (KeyError, TypeError, ValueError):
        return False

    def build_fields(config: Any, ignored: tuple[str, ...]) -> dict[str, Any]:
        return {k: v for k, v in to_dict(config).items() if k not in ignored}

    search_time = ("hnsw_ef_search", "nprobe", "rerank_factor", "shard_size")
    return (
        built[0] == corpus
        and build_fields(built[1], ("scale", "batch_size")) == build_fields(encoder, ("scale", "batch_size"))
        and build_fields(built[2], search_time) == build_fields(index, search_time)
        and meta.get("sources", sources_signature(corpus, encoder)) == sources_signature(corpus, encoder)
    )
