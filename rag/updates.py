"""Live updates: add, replace and delete passages of a knowledge base by id, without a rebuild.

A knowledge base changes by data versions (meta.json "data_version", 1 when built). Version v+1 is
version v plus, written in this order:
- an update segment `updates/{v+1:06d}/`: a small knowledge base folder with the added passages, their
  d(z) (encoded with the knowledge base's own encoder, or given) and an index of the same kind: an
  IVF index adds them to a copy of the base's trained quantizer and codebooks (no retraining);
- `deleted-{v+1:06d}.npy`: the rows (numbered over all parts, deleted ones included) of every passage
  deleted or replaced so far: tombstones, applied inside every search (rag.index live masks: -inf
  scores for flat, a FAISS IDSelector for IVF and HNSW), so results equal those of an index that
  never held them;
- meta.json, rewritten in one rename: the switch from v to v+1;
- the manifest (rag.manifest), re-hashing only what changed. A reader that opens the folder between
  the switch and the manifest finds them disagreeing (an IntegrityError); rag.hotswap.refresh then
  keeps its current version and tries again at its next call.
Nothing already written changes: a process that opened version v keeps reading it, and picks up v+1
through the hot-swap (rag.hotswap.refresh) without reloading its generator.

Replacing: an added passage whose id exists replaces it. Passages of JSON Lines, folder and built-in
corpora are documents split into `{doc_id}-{n}`: adding a document replaces all the passages it had
(a document that shrank leaves no stale tail); deleting by corpus deletes whole documents. DPR TSV
rows are passages and are matched one by one.

`compact` rewrites the live passages as one part (no segments, no tombstones), re-indexing the stored
d(z) (no re-encoding). HNSW needs it after many deletions (its graph still routes through deleted
nodes); every kind reclaims the space of deleted passages with it.

A sharded knowledge base: deletions and replacements go to the shard that holds the passage, new
passages to the shard with the fewest; each shard changes in one version of its own, and the top
meta.json's data_version goes up last.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag.config import CorpusConfig, GivenEmbeddings, IndexConfig, from_dict
from rag.corpus import Passage, ReadReport, iter_passages
from rag.encoders import load_encoder, passage_text
from rag.index import DenseIndex, link_or_copy, store_dtype
from rag.io import atomic_dir, atomic_path, atomic_write_text
from rag.knowledge import (
    INDEX_DIR,
    META_FILE,
    PASSAGES_FILE,
    KnowledgeBase,
    build_lock,
    data_version,
    encoder_config,
    is_knowledge_base,
    open_knowledge_base,
)
from rag.manifest import MANIFEST_FILE, update_manifest, write_manifest
from rag.npy import write_matrix
from rag.store import PassageStore, write_passage_store
from rag.vectors import IdLookup, align_embeddings, open_embeddings

UPDATES_DIR = "updates"
_CHUNK = 65536
_DOC_SUFFIX = re.compile(r"-\d+$")


@dataclass(frozen=True)
class UpdateInfo:
    path: Path
    version: int  # the data version written
    added: int  # new passages (ids not there before)
    replaced: int  # passages whose id was there: old version deleted, new one added
    deleted: int  # passages deleted (replaced ones not counted)
    passages: int  # live passages now
    tombstones: int  # deleted rows still stored (compact removes them)
    seconds: float


@dataclass(frozen=True)
class Change:
    """What one update does: passages to add (with their vectors, or None to encode) and ids to delete."""

    add: Sequence[Passage] = ()
    vectors: np.ndarray | None = None  # (len(add), D), or None: encode with the knowledge base's d(z)
    delete: Sequence[str] = ()  # passage ids that must exist
    delete_documents: Sequence[str] = ()  # document ids: every passage `{doc}-{n}` goes


def document_id(passage_id: str) -> str | None:
    """The document of a passage id `{doc}-{n}` (JSON Lines, folders, built-in corpus), else None."""
    return _DOC_SUFFIX.sub("", passage_id) if _DOC_SUFFIX.search(passage_id) else None


def read_change(kb_dir: Path, corpus: CorpusConfig, given: GivenEmbeddings | None, delete: bool) -> Change:
    """The corpus's passages as an addition (every document replaced whole), or as a deletion."""
    meta = open_knowledge_base(kb_dir).meta
    words = meta["corpus"]["words_per_passage"]
    if corpus.words_per_passage != words:
        raise ValueError(f"{kb_dir} splits documents into {words}-word passages; the update must too (--words)")
    passages = list(iter_passages(corpus, ReadReport()))
    if not passages:
        raise ValueError(f"{corpus.source}: the corpus has no passages")
    by_document = _format(corpus) != "dpr-tsv"
    docs = sorted({d for p in passages if (d := document_id(p.id)) is not None}) if by_document else []
    if delete:
        return Change(delete=[] if by_document else [p.id for p in passages], delete_documents=docs)
    vectors = None
    if given is not None:
        source = open_embeddings(given.path, given.id_column, given.vector_column)
        with _temporary_store(kb_dir, passages) as store:
            aligned = align_embeddings(source, store, kb_dir / f".{META_FILE}.vectors.npy", np.dtype(np.float32))
            vectors = np.load(aligned.path)
            if not aligned.linked:
                aligned.path.unlink()
    return Change(add=passages, vectors=vectors, delete_documents=docs)


def _format(corpus: CorpusConfig) -> str:
    if corpus.format != "auto":
        return corpus.format
    return "dpr-tsv" if corpus.source.endswith(".tsv") else "other"


class _temporary_store:
    """A passage store of the update's passages beside the knowledge base (matching vectors by id)."""

    def __init__(self, kb_dir: Path, passages: list[Passage]) -> None:
        self.path = kb_dir / f".{META_FILE}.update.arrow"
        self.passages = passages

    def __enter__(self) -> PassageStore:
        write_passage_store(self.passages, self.path)
        return PassageStore.open(self.path)

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def update_knowledge_base(kb_dir: Path | str, change: Change, device: str = "cpu") -> UpdateInfo:
    """Apply one change as the next data version of the knowledge base (sharded or not)."""
    kb_dir = Path(kb_dir).resolve()
    with build_lock(kb_dir):
        meta = open_knowledge_base(kb_dir).meta
        if meta.get("shards"):
            return _update_sharded(kb_dir, meta, change, device)
        return _update(kb_dir, change, device)


def _update(kb_dir: Path, change: Change, device: str) -> UpdateInfo:
    start = time.perf_counter()
    kb = open_knowledge_base(kb_dir)
    ids = [p.id for p in change.add]
    if len(set(ids)) != len(ids):
        raise ValueError(f"the update adds passage id {_first_repeat(ids)!r} twice")
    if change.vectors is not None and change.vectors.shape[0] != len(change.add):
        raise ValueError(f"{change.vectors.shape[0]} vectors for {len(change.add)} added passages")
    lookup = IdLookup(kb.passages.ids())
    doomed, replaced = _rows_to_delete(lookup, change, ids)
    version = data_version(kb.meta) + 1
    segments, written = list(kb.meta.get("segments", [])), [META_FILE]
    if change.add:
        name = f"{UPDATES_DIR}/{version:06d}"
        _write_segment(kb, change, kb_dir / name, device)
        segments.append(name)
        written.append(name)
    sizes = _part_sizes(kb)
    deleted = _deleted_rows(kb_dir, kb.meta, kb, doomed, sizes)
    meta = {k: v for k, v in kb.meta.items() if k not in ("segments", "deleted")}
    meta |= {"data_version": version, "passages": len(kb.index) - len(doomed) + len(change.add)}
    if segments:
        meta["segments"] = segments
    if len(deleted):
        meta["deleted"] = f"deleted-{version:06d}.npy"
        with atomic_path(kb_dir / meta["deleted"]) as tmp, open(tmp, "wb") as f:
            np.save(f, deleted)
    atomic_write_text(kb_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))  # the switch
    written += [p.name for p in kb_dir.glob("deleted-*.npy")]  # the new tombstones, and old ones dropped now
    _drop_old_tombstones(kb_dir, version)
    update_manifest(kb_dir, written)  # re-hashes only what this version wrote or dropped
    return UpdateInfo(kb_dir, version, len(change.add) - replaced, replaced, len(doomed) - replaced,
                      meta["passages"], len(deleted), time.perf_counter() - start)  # fmt: skip


def _first_repeat(ids: Sequence[str]) -> str:
    seen: set[str] = set()
    for i in ids:
        if i in seen:
            return i
        seen.add(i)
    return ""


def _rows_to_delete(lookup: IdLookup, change: Change, added: list[str]) -> tuple[np.ndarray, int]:
    """Live rows that go (explicit ids, documents, and ids the update adds again) and how many of
    them are replaced by an added passage of the same id."""
    doomed: list[np.ndarray] = []
    if change.delete:
        rows, found = lookup.rows(list(change.delete))
        if not found.all():
            raise ValueError(f"passage id {change.delete[int(np.flatnonzero(~found)[0])]!r} is not in the knowledge base")
        doomed.append(rows)
    for doc in change.delete_documents:
        rows, ids = lookup.with_prefix(doc + "-")
        keep = [document_id(i) == doc for i in ids]
        if not any(keep) and not change.add:
            raise ValueError(f"document {doc!r} has no passages in the knowledge base")
        doomed.append(rows[np.array(keep, dtype=bool)])
    replaced = 0
    if added:
        rows, found = lookup.rows(added)
        doomed.append(rows[found])
        replaced = int(found.sum())
    unique = np.unique(np.concatenate(doomed)) if doomed else np.zeros(0, np.int64)
    return unique, replaced


def _part_sizes(kb: KnowledgeBase) -> list[int]:
    """Stored rows (deleted ones included) of each part: the base, then the update segments."""
    space = getattr(kb.index, "space", None)
    return list(space.sizes) if space is not None else [len(kb.index)]


def _deleted_rows(kb_dir: Path, meta: dict[str, Any], kb: KnowledgeBase, doomed: np.ndarray,
                  sizes: list[int]) -> np.ndarray:  # fmt: skip
    """All tombstones after this update, as rows over all parts' stored rows."""
    old = np.load(kb_dir / meta["deleted"]) if meta.get("deleted") else np.zeros(0, np.int64)
    if doomed.size == 0:
        return old.astype(np.int64)
    space = getattr(kb.index, "space", None)
    if space is None:  # one part, nothing deleted yet: live rows are stored rows
        stored = doomed
    else:
        part, local = space.to_local(doomed)
        stored = np.concatenate([[0], np.cumsum(sizes)])[part] + local
    return np.union1d(old, stored).astype(np.int64)


def _write_segment(kb: KnowledgeBase, change: Change, out: Path, device: str) -> None:
    """The added passages as a knowledge base folder indexed like the base."""
    vectors = change.vectors
    if vectors is None:
        d_z = load_encoder(encoder_config(kb.meta), device)
        vectors = d_z.encode([passage_text(p.title, p.text) for p in change.add],
                             batch_size=kb.meta["encoder"].get("batch_size", 64))  # fmt: skip
    base = _base_index(kb)
    with atomic_dir(out, replaces=is_knowledge_base) as tmp:  # an update that died before its switch
        write_passage_store(change.add, tmp / PASSAGES_FILE)
        base.build_segment(np.asarray(vectors, dtype=np.float32), tmp / INDEX_DIR)
        meta = {k: v for k, v in kb.meta.items() if k not in ("segments", "deleted", "data_version")}
        meta |= {"passages": len(change.add), "segment": True}
        atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))


def _base_index(kb: KnowledgeBase) -> DenseIndex:
    index = kb.index
    while not isinstance(index, DenseIndex):  # a PartedIndex: its first part is the base
        index = index.parts[0]
    return index


def _drop_old_tombstones(kb_dir: Path, version: int) -> None:
    """Remove tombstone files older than the previous version's (a reader that read the previous
    meta.json a moment ago may still be about to open that one)."""
    for path in kb_dir.glob("deleted-*.npy"):
        try:
            if int(path.stem.split("-")[1]) < version - 1:
                path.unlink()
        except (ValueError, IndexError):
            continue


# ---------------------------------------------------------------- sharded knowledge bases


def _update_sharded(kb_dir: Path, meta: dict[str, Any], change: Change, device: str) -> UpdateInfo:
    start = time.perf_counter()
    shard_dirs = [kb_dir / name for name in meta["shards"]]
    lookups = [IdLookup(open_knowledge_base(d).passages.ids()) for d in shard_dirs]
    sizes = [len(open_knowledge_base(d).index) for d in shard_dirs]

    def owner(passage_id: str) -> int | None:
        for i, lookup in enumerate(lookups):
            if lookup.rows([passage_id])[1][0]:
                return i
        return None

    def owners_of_document(doc: str) -> list[int]:
        return [i for i, lookup in enumerate(lookups)
                if any(document_id(x) == doc for x in lookup.with_prefix(doc + "-")[1])]  # fmt: skip

    plan: list[dict[str, list]] = [{"add": [], "rows": [], "delete": [], "docs": []} for _ in shard_dirs]
    for pid in change.delete:
        i = owner(pid)
        if i is None:
            raise ValueError(f"passage id {pid!r} is not in the knowledge base")
        plan[i]["delete"].append(pid)
    for doc in change.delete_documents:
        holders = owners_of_document(doc)
        if not holders and not change.add:
            raise ValueError(f"document {doc!r} has no passages in the knowledge base")
        for i in holders:
            plan[i]["docs"].append(doc)
    smallest = int(np.argmin(sizes))
    for row, passage in enumerate(change.add):  # replaced where it is, new ones where there is room
        doc = document_id(passage.id)
        i = owner(passage.id)
        holders = owners_of_document(doc) if i is None and doc is not None else []
        target = i if i is not None else (holders[0] if holders else smallest)
        plan[target]["add"].append(passage)
        plan[target]["rows"].append(row)
    infos = []
    for shard, part in zip(shard_dirs, plan, strict=True):
        if part["add"] or part["delete"] or part["docs"]:
            vectors = None if change.vectors is None else change.vectors[np.array(part["rows"], dtype=np.int64)]
            infos.append(_update(shard, Change(part["add"], vectors, part["delete"], part["docs"]), device))
    total = sum(len(open_knowledge_base(d).index) for d in shard_dirs)
    version = data_version(meta) + 1
    atomic_write_text(kb_dir / META_FILE, json.dumps(meta | {"data_version": version, "passages": total},
                                                     indent=2, sort_keys=True))  # fmt: skip
    update_manifest(kb_dir, [META_FILE, *(f"{name}/{MANIFEST_FILE}" for name in meta["shards"])])
    return UpdateInfo(kb_dir, version, sum(i.added for i in infos), sum(i.replaced for i in infos),
                      sum(i.deleted for i in infos), total, sum(i.tombstones for i in infos),
                      time.perf_counter() - start)  # fmt: skip


# ---------------------------------------------------------------- compaction


def compact_knowledge_base(kb_dir: Path | str, progress: bool = False) -> UpdateInfo:
    """Rewrite the live passages as one part: no segments, no tombstones (each shard, if sharded)."""
    kb_dir = Path(kb_dir).resolve()
    with build_lock(kb_dir):
        start = time.perf_counter()
        kb = open_knowledge_base(kb_dir)
        version = data_version(kb.meta) + 1
        if kb.meta.get("shards"):
            for name in kb.meta["shards"]:
                _compact(kb_dir / name, open_knowledge_base(kb_dir / name), progress)
            meta = kb.meta | {"data_version": version}
            atomic_write_text(kb_dir / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
            update_manifest(kb_dir, [META_FILE, *(f"{name}/{MANIFEST_FILE}" for name in kb.meta["shards"])])
        else:
            _compact(kb_dir, kb, progress, version)
        return UpdateInfo(kb_dir, version, 0, 0, 0, len(kb.index), 0, time.perf_counter() - start)


def _compact(kb_dir: Path, kb: KnowledgeBase, progress: bool, version: int | None = None) -> None:
    config = from_dict(IndexConfig, kb.meta["index"])
    n = len(kb.index)
    stage = kb_dir.parent / f".{kb_dir.name}.compact.npy"
    chunks = (kb.index.embeddings(np.arange(a, min(n, a + _CHUNK))) for a in range(0, n, _CHUNK))
    write_matrix(stage, chunks, n, kb.index.dim, store_dtype(config))
    try:
        with atomic_dir(kb_dir, replaces=is_knowledge_base) as tmp:
            passages = (p for a in range(0, n, _CHUNK) for p in kb.passages.get(np.arange(a, min(n, a + _CHUNK))))
            write_passage_store(passages, tmp / PASSAGES_FILE)
            DenseIndex.build_from_file(stage, config, tmp / INDEX_DIR, progress=progress)
            for extra in ("hybrid.json",):  # settings that do not depend on the rows
                if (kb_dir / extra).is_file():
                    link_or_copy(kb_dir / extra, tmp / extra)
            meta = {k: v for k, v in kb.meta.items() if k not in ("segments", "deleted")}
            meta |= {"passages": n, "data_version": version or data_version(kb.meta) + 1}
            atomic_write_text(tmp / META_FILE, json.dumps(meta, indent=2, sort_keys=True))
            write_manifest(tmp)  # last, as a build's
    finally:
        stage.unlink(missing_ok=True)
