"""Documents -> passages -> an on-disk passage store.

Readers turn a source (JSON Lines, DPR's Wikipedia TSV, a folder of .txt/.md files, or the built-in
Wikipedia summaries) into documents; `split_words` cuts each document into disjoint N-word passages
that keep the document's title (the paper: 100 words). `write_passage_store` streams passages into an
Arrow IPC file in bounded batches, atomically; `PassageStore` memory-maps it for O(1) access by row.

Passage ids are stable across runs and do not depend on other documents: `{doc_id}-{chunk}` where
doc_id is the record's own `id` (JSON Lines), the file's path relative to the folder (folders), or a
64-bit content hash of title and text (JSON Lines without ids, built-in corpus). DPR TSV rows are
already passages and keep their own ids.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from rag.config import CorpusConfig

log = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_CORPORA = ("wiki-summaries",)
FOLDER_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


def passage_text(title: str, text: str) -> str:
    """How d(z) sees a passage: "Title. text".

    DPR feeds `title [SEP] text` as a segment pair, but sentence-transformers models such as
    all-MiniLM-L6-v2 were trained on single segments with token type 0 only, so a plain sentence
    with the title first keeps the input in the distribution the model knows (and the title still
    marks later chunks of a long document, whose text no longer names its subject).
    """
    title, text = title.strip(), text.strip()
    if not title:
        return text
    if not text:
        return title
    return f"{title}. {text}"


class CorpusError(ValueError):
    """Bad input; the message names the file, the 1-based line (where lines exist) and the field."""

    def __init__(self, path: Path | str, line: int | None, field: str, problem: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: field {field!r}: {problem}")
        self.path = str(path)
        self.line = line
        self.field = field
        self.problem = problem


@dataclass
class ReadReport:
    """Filled in while reading with `skip_bad_records=True`: what was skipped, with a few examples."""

    skipped: int = 0
    examples: list[str] = field(default_factory=list)
    documents: int = 0
    passages: int = 0
    max_examples: int = 10

    def add(self, error: CorpusError) -> None:
        self.skipped += 1
        if len(self.examples) < self.max_examples:
            self.examples.append(str(error))

    def summary(self) -> str:
        head = f"{self.documents} documents, {self.passages} passages, {self.skipped} bad records skipped"
        return "\n".join([head, *(f"  {e}" for e in self.examples)])


@dataclass(frozen=True)
class _Document:
    doc_id: str | None  # None: derive a content hash
    title: str
    text: str


# ----------------------------------------------------------------------------------------- splitting


def normalize_whitespace(text: str) -> str:
    return " ".join(text.split())


def content_id(title: str, text: str) -> str:
    """A 64-bit hash of the whitespace-normalised title and text (16 hex digits)."""
    key = f"{normalize_whitespace(title)}\x00{normalize_whitespace(text)}".encode()
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def split_words(title: str, text: str, words_per_passage: int, doc_id: str) -> list[Passage]:
    """Disjoint chunks of `words_per_passage` words (the last may be shorter), each with the title."""
    if words_per_passage < 1:
        raise ValueError(f"words_per_passage must be >= 1, got {words_per_passage}")
    words = text.split()
    title = normalize_whitespace(title)
    return [
        Passage(f"{doc_id}-{i // words_per_passage}", title, " ".join(words[i : i + words_per_passage]))
        for i in range(0, len(words), words_per_passage)
    ]


# ------------------------------------------------------------------------------------------ reading


def iter_passages(config: CorpusConfig, report: ReadReport | None = None) -> Iterator[Passage]:
    """Stream the passages of `config.source`. Bad input raises CorpusError, or is counted in
    `report` when `config.skip_bad_records` is set."""
    report = report if report is not None else ReadReport()
    fmt = resolve_format(config)
    if fmt == "dpr-tsv":
        for passage in _read_dpr_tsv(Path(config.source), config, report):
            report.documents += 1
            report.passages += 1
            yield passage
    else:
        seen: dict[str, int] = {}
        for doc in _read_documents(fmt, config, report):
            report.documents += 1
            doc_id = doc.doc_id if doc.doc_id is not None else _unique(content_id(doc.title, doc.text), seen)
            passages = split_words(doc.title, doc.text, config.words_per_passage, doc_id)
            report.passages += len(passages)
            yield from passages
    if report.skipped:
        log.warning("%s: %s", config.source, report.summary())


def _unique(doc_id: str, seen: dict[str, int]) -> str:
    # Identical documents share a content hash; later copies get ~2, ~3, ... so ids stay unique.
    count = seen.get(doc_id, 0) + 1
    seen[doc_id] = count
    return doc_id if count == 1 else f"{doc_id}~{count}"


def resolve_format(config: CorpusConfig) -> str:
    if config.format != "auto":
        return config.format
    source = config.source
    if source.startswith(BUILTIN_PREFIX):
        return "builtin"
    path = Path(source)
    if path.is_dir():
        return "folder"
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffixes and suffixes[-1] == ".tsv":
        return "dpr-tsv"
    if not path.exists():
        raise FileNotFoundError(f"corpus source {source} does not exist")
    raise ValueError(
        f"corpus source {source}: cannot tell its format (use .jsonl, .tsv, a folder or builtin:)"
    )


def _read_documents(fmt: str, config: CorpusConfig, report: ReadReport) -> Iterator[_Document]:
    if fmt == "jsonl":
        return _read_jsonl(Path(config.source), config, report)
    if fmt == "folder":
        return _read_folder(Path(config.source), config, report)
    if fmt == "builtin":
        return _read_builtin(config, report)
    raise ValueError(f"unknown corpus format {fmt!r}")


def _reject(error: CorpusError, config: CorpusConfig, report: ReadReport) -> None:
    if not config.skip_bad_records:
        raise error
    report.add(error)


def _open_binary(path: Path) -> IO[bytes]:
    if not path.is_file():
        raise FileNotFoundError(f"corpus file {path} does not exist")
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115


def _decode_line(raw: bytes) -> tuple[str, bool]:
    """The line as text; bad UTF-8 bytes become lone surrogates (flag False) so the field can be named."""
    try:
        return raw.decode("utf-8"), True
    except UnicodeDecodeError:
        return raw.decode("utf-8", errors="surrogateescape"), False


def _check_text(value: str, max_bytes: int | None) -> str | None:
    """None if `value` is good, else the problem. With `max_bytes` it is a document's body: it must
    also have words and fit the limit."""
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError as e:
        return f"not valid UTF-8: undecodable bytes or a lone surrogate escape at character {e.start}"
    if max_bytes is not None and size > max_bytes:
        return f"document is {size:,} bytes, over max_document_bytes={max_bytes:,}"
    if max_bytes is not None and (not value or value.isspace()):
        return "empty document (no words)"
    return None


def _has_surrogates(value: Any) -> bool:
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, dict):
        return any(_has_surrogates(k) or _has_surrogates(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_surrogates(v) for v in value)
    return False


def _parse_jsonl_record(obj: Any, path: Path, line: int, config: CorpusConfig) -> _Document:
    if not isinstance(obj, dict):
        raise CorpusError(path, line, "(record)", f"expected a JSON object, got {type(obj).__name__}")
    for name in ("text", "title"):
        if name not in obj:
            raise CorpusError(path, line, name, "missing")
        if not isinstance(obj[name], str):
            raise CorpusError(path, line, name, f"expected a string, got {type(obj[name]).__name__}")
    doc_id = obj.get("id")
    if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, str | int)):
        raise CorpusError(path, line, "id", f"expected a string or integer, got {type(doc_id).__name__}")
    if doc_id is not None and not str(doc_id).strip():
        raise CorpusError(path, line, "id", "empty id")
    for name, limit in (("title", None), ("text", config.max_document_bytes)):
        problem = _check_text(obj[name], limit)
        if problem:
            raise CorpusError(path, line, name, problem)
    if doc_id is not None and _has_surrogates(str(doc_id)):
        raise CorpusError(path, line, "id", "bytes are not valid UTF-8")
    return _Document(None if doc_id is None else str(doc_id), obj["title"], obj["text"])


class SeenIds:
    """The ids read so far, for duplicate checks over tens of millions of passages: each id's 128-bit
    BLAKE2b digest in an open-addressing table of two uint64 arrays (16 bytes a slot, at most 70% full),
    where a Python set of the strings would take gigabytes (DPR's Wikipedia: 21M ids)."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._hi = np.zeros(capacity, np.uint64)  # 0 marks an empty slot; stored digests are never 0 there
        self._lo = np.zeros(capacity, np.uint64)
        self._used = 0

    def __len__(self) -> int:
        return self._used

    def add(self, key: str) -> bool:
        """Record `key`; False if it was recorded before."""
        digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        hi, lo = int.from_bytes(digest[:8], "little") | 1, int.from_bytes(digest[8:], "little")
        if not self._insert(hi, lo):
            return False
        self._used += 1
        if self._used * 10 > len(self._hi) * 7:
            self._grow()
        return True

    def _insert(self, hi: int, lo: int) -> bool:
        mask = len(self._hi) - 1
        slot = lo & mask
        while True:
            here = int(self._hi[slot])
            if here == 0:
                self._hi[slot], self._lo[slot] = hi, lo
                return True
            if here == hi and int(self._lo[slot]) == lo:
                return False
            slot = (slot + 1) & mask

    def _grow(self) -> None:
        filled = self._hi != 0
        his, los = self._hi[filled].tolist(), self._lo[filled].tolist()
        self._hi = np.zeros(2 * len(self._hi), np.uint64)
        self._lo = np.zeros(len(self._hi), np.uint64)
        for hi, lo in zip(his, los, strict=True):
            self._insert(hi, lo)


def _record_lines(f: IO[bytes], limit: int) -> Iterator[tuple[int, bytes | None]]:
    """(1-based line number, line without its end) of a binary file; None for a line over `limit` bytes,
    which is read in bounded pieces and dropped instead of held in memory."""
    number = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        number += 1
        if len(raw) > limit and not raw.endswith(b"\n"):
            while (rest := f.readline(limit + 1)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, raw.rstrip(b"\r\n")


def _line_limit(config: CorpusConfig) -> int:
    # a record holds its text (at most max_document_bytes) and a title, an id, JSON escapes
    return 2 * config.max_document_bytes + (1 << 20)


def _read_jsonl(path: Path, config: CorpusConfig, report: ReadReport) -> Iterator[_Document]:
    ids = SeenIds()
    with _open_binary(path) as f:
        for line, raw in _record_lines(f, _line_limit(config)):
            if raw is None:
                _reject(CorpusError(path, line, "(line)", f"record is over {_line_limit(config):,} bytes"), config, report)
                continue
            text, valid_utf8 = _decode_line(raw)
            if not text.strip():
                continue
            try:
                try:
                    obj = json.loads(text)
                except json.JSONDecodeError as e:
                    raise CorpusError(
                        path, line, "(json)", f"malformed JSON: {e.msg} at column {e.colno}"
                    ) from None
                doc = _parse_jsonl_record(obj, path, line, config)
                if not valid_utf8:  # bad bytes in a field we do not use still make the record bad
                    bad = [k for k, v in obj.items() if _has_surrogates(k) or _has_surrogates(v)]
                    raise CorpusError(path, line, bad[0] if bad else "(line)", "bytes are not valid UTF-8")
                if doc.doc_id is not None and not ids.add(doc.doc_id):
                    raise CorpusError(path, line, "id", f"duplicate id {doc.doc_id!r}")
            except RecursionError:
                _reject(CorpusError(path, line, "(json)", "nested too deeply to be a record"), config, report)
                continue
            except CorpusError as error:
                _reject(error, config, report)
                continue
            yield doc


def _unquote(value: str) -> str:
    # DPR's psgs_w100.tsv is CSV-quoted: a field wrapped in quotes, with inner quotes doubled.
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value[1:-1].replace('""', '"')
    return value


def _parse_tsv_row(text: str, path: Path, line: int, config: CorpusConfig, checked: bool) -> Passage:
    """A TSV row is already a passage: its id and text are kept as they are (text only stripped).
    `checked`: the raw line decoded as UTF-8 and fits max_document_bytes, so only emptiness is left."""
    columns = text.split("\t")
    if len(columns) != 3:
        raise CorpusError(
            path, line, "(row)", f"expected 3 tab-separated columns id, text, title; got {len(columns)}"
        )
    pid, body, title = _unquote(columns[0]).strip(), _unquote(columns[1]).strip(), _unquote(columns[2])
    if not checked:
        for name, value, limit in (
            ("id", pid, None),
            ("title", title, None),
            ("text", body, config.max_document_bytes),
        ):
            problem = _check_text(value, limit)
            if problem:
                raise CorpusError(path, line, name, problem)
    if not pid:
        raise CorpusError(path, line, "id", "empty id")
    if not body:
        raise CorpusError(path, line, "text", "empty document (no words)")
    return Passage(pid, normalize_whitespace(title), body)


def _read_dpr_tsv(path: Path, config: CorpusConfig, report: ReadReport) -> Iterator[Passage]:
    ids = SeenIds()  # rows are passages: their ids must be unique, as JSON Lines documents' are
    with _open_binary(path) as f:
        for line, raw in _record_lines(f, _line_limit(config)):
            if raw is None:
                _reject(CorpusError(path, line, "(row)", f"row is over {_line_limit(config):,} bytes"), config, report)
                continue
            text, valid_utf8 = _decode_line(raw)
            if line == 1 and text.split("\t", 1)[0].strip().lower() == "id":
                continue  # the header line
            if not text or text.isspace():
                continue
            checked = valid_utf8 and len(raw) <= config.max_document_bytes
            try:
                passage = _parse_tsv_row(text, path, line, config, checked)
                if not ids.add(passage.id):
                    raise CorpusError(path, line, "id", f"duplicate id {passage.id!r}")
            except CorpusError as error:
                _reject(error, config, report)
                continue
            yield passage


def _read_folder(root: Path, config: CorpusConfig, report: ReadReport) -> Iterator[_Document]:
    if not root.is_dir():
        raise FileNotFoundError(f"corpus folder {root} does not exist")
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in FOLDER_SUFFIXES),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    for path in files:
        try:
            doc = _read_text_file(path, root, config)
        except CorpusError as error:
            _reject(error, config, report)
            continue
        yield doc


def _read_text_file(path: Path, root: Path, config: CorpusConfig) -> _Document:
    size = path.stat().st_size
    if size > config.max_document_bytes:  # checked before reading, so a huge file is never loaded
        raise CorpusError(
            path,
            1,
            "text",
            f"document is {size:,} bytes, over max_document_bytes={config.max_document_bytes:,}",
        )
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise CorpusError(
            path, line, "text", f"bytes are not valid UTF-8 (byte {e.start} of the file)"
        ) from None
    if not text.strip():
        raise CorpusError(path, 1, "text", "empty document (no words)")
    return _Document(path.relative_to(root).as_posix(), path.stem, text)


def _read_builtin(config: CorpusConfig, report: ReadReport) -> Iterator[_Document]:
    from rag.resources import wiki_summaries_path

    name = config.source.removeprefix(BUILTIN_PREFIX)
    if name != "wiki-summaries":
        raise ValueError(f"unknown built-in corpus {config.source!r}; known: {list(BUILTIN_CORPORA)}")
    path = wiki_summaries_path()
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for key, entry in data.items():
        try:
            doc = _parse_builtin_entry(key, entry, path, config)
        except CorpusError as error:
            _reject(error, config, report)
            continue
        yield doc


def _parse_builtin_entry(key: str, entry: Any, path: Path, config: CorpusConfig) -> _Document:
    # A single JSON object: there are no record lines, so the entry's key stands in for the line.
    where = f"{path} [entry {key!r}]"
    if not isinstance(entry, dict):
        raise CorpusError(where, None, "(entry)", "expected an object")
    title = entry.get("title", key)
    extract = entry.get("extract")
    if not isinstance(title, str):
        raise CorpusError(where, None, "title", "expected a string")
    if not isinstance(extract, str):
        raise CorpusError(where, None, "extract", "missing or not a string")
    problem = _check_text(extract, config.max_document_bytes)
    if problem:
        raise CorpusError(where, None, "extract", problem)
    return _Document(None, title, extract)
