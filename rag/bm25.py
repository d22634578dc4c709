"""The BM25 index over a knowledge base's passages: bm25s' sparse score matrix, stored without pickle.

It is a second index inside the knowledge base folder (rag.knowledge), over the same passage store:
row i is passage i, so the same ids, titles and texts come back as from the dense index.

    KB/bm25/  data.csc.index.npy, indices.csc.index.npy, indptr.csc.index.npy
                         bm25s' precomputed per-(term, passage) BM25 scores as a CSC matrix (plain .npy)
              vocab.index.json, params.index.json        bm25s' term ids and parameters (JSON)
              bm25.json  this project's format file, written last: BM25Config, passages, terms, the
                         knowledge base's fingerprint (a rebuilt base makes the index stale), build time

Loading maps the three arrays read-only (np.load with mmap_mode="r" and allow_pickle=False, through
bm25s.BM25.load(mmap=True)); nothing on disk can execute code. The text indexed per passage is the
dense side's "Title. text" (rag.corpus.passage_text); terms are lower-cased words, less bm25s'
English stop words, Snowball-stemmed (PyStemmer): the settings are stored, so queries get the same.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rag.config import BM25Config, from_dict, to_dict
from rag.corpus import passage_text
from rag.io import atomic_dir, atomic_write_text, read_format_json
from rag.knowledge import META_FILE, build_lock, data_version, open_knowledge_base
from rag.manifest import update_manifest
from rag.mips import topk_rows

if TYPE_CHECKING:  # bm25s loads with the first index built or opened (not for `rag index info`)
    import bm25s

FORMAT = "rag-bm25-index"
VERSION = 1
BM25_DIR = "bm25"
BM25_META = "bm25.json"
_BUILD_ROWS = 65536  # passages read from the store (and tokenised) at a time


class BM25QueryError(ValueError):
    """A query BM25 cannot score: empty, only stop words, or no word of it in the knowledge base."""


@dataclass(frozen=True)
class BM25Info:
    path: Path
    passages: int
    terms: int
    seconds: float


def _stemmer(config: BM25Config) -> Any:
    if not config.stemmer:
        return None
    import Stemmer  # PyStemmer

    try:
        return Stemmer.Stemmer(config.stemmer)
    except KeyError:
        raise ValueError(f"BM25Config.stemmer: {config.stemmer!r} is not a PyStemmer language "
                         f"(one of {', '.join(Stemmer.algorithms())})") from None  # fmt: skip


def _terms(texts: list[str], config: BM25Config, stemmer: Any) -> list[list[str]]:
    """Each text's terms: lower-cased words, stop words removed, stemmed."""
    import bm25s

    return bm25s.tokenize(texts, lower=True, stopwords=config.stopwords or None, stemmer=stemmer,
                          return_ids=False, show_progress=False)  # fmt: skip


class BM25Index:
    """bm25s.BM25 over N passages (row i = passage i) with the tokenisation its terms were made with."""

    def __init__(self, model: bm25s.BM25, config: BM25Config) -> None:
        self.model = model
        self.config = config
        self._stemmer = _stemmer(config)

    @classmethod
    def build(cls, texts: list[str], config: BM25Config | None = None) -> BM25Index:
        """Index `texts` (row i = text i)."""
        config = config or BM25Config()
        if not texts:
            raise ValueError("BM25Index.build: no texts to index")
        stemmer = _stemmer(config)
        tokens = _terms(texts, config, stemmer)
        import bm25s

        model = bm25s.BM25(k1=config.k1, b=config.b, method=config.method)
        model.index(tokens, show_progress=False)  # adds the empty term "" (what an empty passage has)
        return cls(model, config)

    def __len__(self) -> int:
        return int(self.model.scores["num_docs"])

    @property
    def terms(self) -> int:
        return len(self.model.vocab_dict)

    @property
    def nbytes(self) -> int:
        return sum(int(self.model.scores[name].nbytes) for name in ("data", "indices", "indptr"))

    def term_ids(self, queries: list[str]) -> tuple[list[list[int]], list[str]]:
        """Each query's term ids in this index, and why a query has none ("" when it has some)."""
        ids, reasons = [], []
        for query, terms in zip(queries, _terms(list(queries), self.config, self._stemmer), strict=True):
            known = self.model.get_tokens_ids(terms)
            ids.append(known)
            if not query.strip():
                reasons.append("the query is empty")
            elif not terms:
                reasons.append("it has only stop words (or no words)")
            elif not known:
                reasons.append("none of its words occurs in the knowledge base")
            else:
                reasons.append("")
        return ids, reasons

    def score_matrix(self, term_ids: list[list[int]]) -> np.ndarray:
        """BM25 score of every passage for each query: B lists of term ids -> (B, N) float32 (bm25s'
        get_scores_from_ids; a query without terms scores 0 everywhere)."""
        out = np.zeros((len(term_ids), len(self)), dtype=np.float32)
        for b, ids in enumerate(term_ids):
            if ids:
                out[b] = self.model.get_scores_from_ids(ids)
        return out

    def search(self, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows (B, K) int64 and BM25 scores (B, K) float32, best first; BM25QueryError for a
        query without a term of the index (it would rank the passages arbitrarily)."""
        if not 1 <= k <= len(self):
            raise ValueError(f"k must be in 1..{len(self)} (the passages indexed), got {k}")
        ids, reasons = self.term_ids(queries)
        bad = [(i, q, r) for i, (q, r) in enumerate(zip(queries, reasons, strict=True)) if r]
        if bad:
            i, query, reason = bad[0]
            raise BM25QueryError(f"BM25 cannot rank passages for query {i} ({query!r}): {reason}")
        return topk_rows(self.score_matrix(ids), k)

    def save(self, path: Path | str, extra: dict[str, Any] | None = None) -> None:
        """bm25s' own files (plain .npy arrays and JSON), then bm25.json (with `extra`); atomic."""
        with atomic_dir(path, replaces=_is_bm25_index) as tmp:
            self.model.save(str(tmp), allow_pickle=False, show_progress=False)
            meta = {**(extra or {}), "format": FORMAT, "version": VERSION, "config": to_dict(self.config),
                    "passages": len(self), "terms": self.terms}  # fmt: skip
            atomic_write_text(tmp / BM25_META, json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path | str) -> BM25Index:
        """Memory-map a saved index (no pickle); refuses a folder without bm25.json or with other counts."""
        path = Path(path)
        meta = read_format_json(path, BM25_META, FORMAT, "BM25 index (rag index build --retriever bm25)")
        config = from_dict(BM25Config, meta["config"])
        import bm25s

        model = bm25s.BM25.load(str(path), mmap=True, allow_pickle=False, load_corpus=False)
        index = cls(model, config)
        if len(index) != meta["passages"] or index.terms != meta["terms"]:
            raise ValueError(f"{path}: bm25s' files hold {len(index)} passages and {index.terms} terms, "
                             f"{BM25_META} says {meta['passages']} and {meta['terms']}")  # fmt: skip
        return index


def _is_bm25_index(path: Path) -> bool:
    try:
        read_format_json(path, BM25_META, FORMAT, "BM25 index")
    except (OSError, ValueError):
        return False
    return True


# ------------------------------------------------------------------- inside a knowledge base folder


def _kb_fingerprint(kb_dir: Path) -> str:
    meta = json.loads((kb_dir / META_FILE).read_text(encoding="utf-8"))
    return str(meta.get("fingerprint", ""))


def _kb_version(kb_dir: Path) -> tuple[int, int]:
    """(data version, live passages) of the knowledge base: live updates (rag.updates) change both."""
    meta = json.loads((kb_dir / META_FILE).read_text(encoding="utf-8"))
    return data_version(meta), int(meta["passages"])


def build_bm25_index(kb_dir: Path | str, config: BM25Config | None = None,
                     progress: bool = False) -> BM25Info:
    """Index a finished knowledge base's passages into KB/bm25 (replacing an older BM25 index)."""
    config = config or BM25Config()
    kb_dir = Path(kb_dir)
    if not (kb_dir / META_FILE).is_file():
        raise FileNotFoundError(f"{kb_dir}: not a knowledge base folder (no {META_FILE}; rag index build)")
    start = time.perf_counter()
    with build_lock(kb_dir):
        store = open_knowledge_base(kb_dir).passages  # live passages, live updates included
        texts: list[str] = []
        for lo in range(0, len(store), _BUILD_ROWS):
            rows = np.arange(lo, min(len(store), lo + _BUILD_ROWS))
            texts += [passage_text(p.title, p.text) for p in store.get(rows)]
        if progress:
            print(f"indexing {len(texts)} passages with BM25 (bm25s) into {kb_dir / BM25_DIR}", flush=True)
        index = BM25Index.build(texts, config)
        seconds = time.perf_counter() - start
        index.save(kb_dir / BM25_DIR, {"knowledge_base_fingerprint": _kb_fingerprint(kb_dir),
                                       "knowledge_base_data_version": _kb_version(kb_dir)[0],
                                       "build_seconds": round(seconds, 3)})  # fmt: skip
        update_manifest(kb_dir, [BM25_DIR])  # the knowledge base's manifest covers its BM25 index too
    return BM25Info(kb_dir / BM25_DIR, len(index), index.terms, seconds)


def has_bm25_index(kb_dir: Path | str) -> bool:
    return (Path(kb_dir) / BM25_DIR / BM25_META).is_file()


def open_bm25_index(kb_dir: Path | str, build: bool = False, progress: bool = True) -> BM25Index:
    """The knowledge base's BM25 index; with build, indexed first if it has none (once, like the dense one)."""
    kb_dir = Path(kb_dir)
    if not has_bm25_index(kb_dir):
        if not build:
            raise FileNotFoundError(f"{kb_dir}: no BM25 index (add one with: rag index build --retriever bm25 "
                                    f"--out {kb_dir})")  # fmt: skip
        build_bm25_index(kb_dir, progress=progress)
    index = BM25Index.load(kb_dir / BM25_DIR)
    meta = json.loads((kb_dir / BM25_DIR / BM25_META).read_text(encoding="utf-8"))
    if meta.get("knowledge_base_fingerprint") != _kb_fingerprint(kb_dir):
        raise ValueError(f"{kb_dir / BM25_DIR}: made for another build of this knowledge base; rebuild it "
                         f"with: rag index build --retriever bm25 --out {kb_dir}")  # fmt: skip
    version, store_rows = _kb_version(kb_dir)
    if meta.get("knowledge_base_data_version", 1) != version:
        raise ValueError(f"{kb_dir / BM25_DIR}: made for data version {meta.get('knowledge_base_data_version', 1)} "
                         f"of this knowledge base, which is at version {version} now (rag index add/delete); "
                         f"rebuild it with: rag index build --retriever bm25 --out {kb_dir}")  # fmt: skip
    if len(index) != store_rows:
        raise ValueError(f"{kb_dir}: BM25 index has {len(index)} rows, the passage store {store_rows}")
    return index


def bm25_meta(kb_dir: Path | str) -> dict[str, Any]:
    return json.loads((Path(kb_dir) / BM25_DIR / BM25_META).read_text(encoding="utf-8"))
