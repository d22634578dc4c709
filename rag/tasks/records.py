"""What every task reader shares: record sources with 1-based line numbers, the field helpers that turn
bad input into a `TaskFormatError` naming the file, the line and the field, and `stream`, which runs a
reader's parser over its records (`skip_bad=True` skips bad records and counts them in a `SkipReport`)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import reprlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.tasks.examples import Example, Provenance

csv.field_size_limit(50_000_000)  # TriviaQA alias lists exceed the default 128 KiB; MAX_RECORD_CHARS


class TaskFormatError(ValueError):
    def __init__(self, path: Path | str, line: int | None, field_name: str, reason: str):
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}, field {field_name!r}: {reason}")
        self.path, self.line, self.field, self.reason = str(path), line, field_name, reason


@dataclass
class SkipReport:
    """Counts of what a reader did (mutable: the reader fills it in while streaming)."""

    read: int = 0
    skipped: int = 0  # bad records skipped under skip_bad=True
    filtered: int = 0  # good records left out on purpose (e.g. NOT ENOUGH INFO in 2-way FEVER)
    errors: list[str] = field(default_factory=list)  # the first few skip messages

    MAX_ERRORS = 20


class BadField(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


# ---------------------------------------------------------------------------------------------------
# Record sources: (position, line, raw record) with 1-based physical line numbers.


MAX_RECORD_CHARS = 50_000_000  # a line or CSV field longer than this is bad input, not read into memory


def open_text(path: Path) -> io.TextIOBase:
    """The file as text. Bytes that are not UTF-8 become lone surrogates (surrogateescape), so that the
    record holding them is the one reported (stream checks), with its line, instead of the whole file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file" if not path.exists() else f"{path}: not a file")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="surrogateescape", newline="")
    return open(path, encoding="utf-8", errors="surrogateescape", newline="")


class Oversized(str):
    """Stands for a line over MAX_RECORD_CHARS, which was skipped rather than read (stream reports it)."""


def lines(path: Path) -> Iterator[tuple[int, int, str]]:
    """(position, 1-based line number, line) of every non-blank line; a line over MAX_RECORD_CHARS is
    read in bounded pieces and given as Oversized("")."""
    with open_text(path) as handle:
        position, number = 0, 0
        while True:
            line = handle.readline(MAX_RECORD_CHARS)
            if not line:
                return
            number += 1
            if len(line) == MAX_RECORD_CHARS and not line.endswith("\n"):
                while (rest := handle.readline(MAX_RECORD_CHARS)) and not rest.endswith("\n"):
                    pass
                line = Oversized("")
            elif not line.strip():
                continue
            yield position, number, line
            position += 1


def csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, int, list[str]]]:
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        start, position = 1, 0
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as err:  # e.g. a field over the limit: the reader cannot go on
                raise TaskFormatError(path, reader.line_num, "row", f"not a CSV row: {err}") from None
            yield position, start, row
            position += 1
            start = reader.line_num + 1


def has_surrogates(value: Any) -> bool:
    """Whether a record read with surrogateescape held bytes that are not UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value)
    if isinstance(value, list | tuple):
        return any(has_surrogates(v) for v in value)
    return False


def stream(
    path: Path,
    records: Iterable[tuple[int, int | None, Any]],
    parse: Callable[[int, Any], Example | None],
    skip_bad: bool,
    report: SkipReport | None,
) -> Iterator[Example]:
    """Parse each record; turn failures into TaskFormatError (or count them under skip_bad)."""
    report = report if report is not None else SkipReport()
    try:
        for position, line, raw in records:
            try:
                try:
                    if isinstance(raw, Oversized):
                        raise BadField("line", f"longer than {MAX_RECORD_CHARS:,} characters")
                    if has_surrogates(raw):
                        raise BadField("text", "bytes that are not UTF-8")
                    example = parse(position, raw)
                except RecursionError:  # a value nested too deeply for any check that walks it
                    raise BadField("json", "nested too deeply to be a record") from None
            except BadField as bad:
                error = TaskFormatError(path, line, bad.field, bad.reason)
                if not skip_bad:
                    raise error from None
                report.skipped += 1
                if len(report.errors) < SkipReport.MAX_ERRORS:
                    report.errors.append(str(error))
                continue
            if example is None:
                report.filtered += 1
                continue
            report.read += 1
            yield example
    except (UnicodeDecodeError, csv.Error, gzip.BadGzipFile, EOFError) as err:
        raise TaskFormatError(path, None, "file", f"cannot be read as text: {err}") from err


# ---------------------------------------------------------------------------------------------------
# Field helpers: each raises BadField naming the field.


_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlist, _SHOW.maxdict = 2, 60, 60, 4, 4


def show(value: Any) -> str:
    """A short repr of a bad value for an error message (bounded depth: a deeply nested value is fine)."""
    return _SHOW.repr(value)[:100]


def json_object(raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise BadField("json", f"malformed JSON: {err.msg} at column {err.colno}") from None
    except RecursionError:
        raise BadField("json", "nested too deeply to be a record") from None
    if not isinstance(obj, dict):
        raise BadField("json", f"expected an object, got {type(obj).__name__}")
    return obj


def string_field(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise BadField(key, "missing")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise BadField(key, f"expected a non-empty string, got {show(value)}")
    return value.strip()


def string_list(value: Any, key: str) -> tuple[str, ...]:
    """A non-empty list of answers, none of them blank: an empty answer would match every text (has_answer
    finds the empty token run everywhere), inflating recall and exact match."""
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise BadField(key, f"expected a non-empty list of strings, got {show(value)}")
    blank = [i for i, a in enumerate(value) if not a.strip()]
    if blank:
        raise BadField(key, f"item {blank[0]} is an empty string (an empty answer would match any text)")
    return tuple(value)


def first_key(obj: dict[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        if key in obj:
            return key
    raise BadField(keys[0], "missing" + (f" (also looked for {', '.join(keys[1:])})" if len(keys) > 1 else ""))


def record_id(obj: dict[str, Any], position: int) -> str:
    value = obj.get("id", obj.get("query_id"))
    return str(value) if value is not None else str(position)


def qa_example(position: int, ident: str, question: str, answers: tuple[str, ...], regex: bool) -> Example:
    return Example(
        id=ident,
        input=question,
        targets=() if regex else answers,
        answers=answers,
        position=position,
        answer_is_regex=regex,
    )


def fever_evidence(value: Any) -> tuple[tuple[Provenance, ...], ...] | None:
    """FEVER evidence: a list of evidence sets, each a list of [annotation, evidence, page, sentence]."""
    if not isinstance(value, list):
        raise BadField("evidence", f"expected a list, got {show(value)}")
    sets = []
    for group in value:
        if not isinstance(group, list) or not all(
            isinstance(item, list) and len(item) == 4 for item in group
        ):
            raise BadField("evidence", f"expected lists of 4-item lists, got {show(group)}")
        pages = tuple(dict.fromkeys(Provenance(title=str(item[2])) for item in group if item[2] is not None))
        if pages:
            sets.append(pages)
    return tuple(dict.fromkeys(sets)) or None


def kilt_provenance(items: Any) -> tuple[Provenance, ...]:
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise BadField("output.provenance", f"expected a list of objects, got {show(items)}")
    pages = []
    for item in items:
        if "wikipedia_id" not in item:
            raise BadField("output.provenance.wikipedia_id", "missing")
        title = item.get("title")
        pages.append(
            Provenance(
                title=None if title is None else str(title), wikipedia_id=str(item["wikipedia_id"]).strip()
            )
        )
    return tuple(dict.fromkeys(pages))
