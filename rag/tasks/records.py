"""What every task reader shares: record sources with 1-based line numbers, the field helpers that turn
bad input into a `TaskFormatError` naming the file, the line and the field, and `stream`, which runs a
reader's parser over its records (`skip_bad=True` skips bad records and counts them in a `SkipReport`)."""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag.tasks.examples import Example, Provenance

csv.field_size_limit(sys.maxsize)  # TriviaQA alias lists exceed the default 128 KiB


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


def open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def lines(path: Path) -> Iterator[tuple[int, int, str]]:
    with open_text(path) as handle:
        position = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield position, number, line
                position += 1


def csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, int, list[str]]]:
    with open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        start = 1
        for position, row in enumerate(reader):
            yield position, start, row
            start = reader.line_num + 1


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
                example = parse(position, raw)
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


def json_object(raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise BadField("json", f"malformed JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise BadField("json", f"expected an object, got {type(obj).__name__}")
    return obj


def string_field(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise BadField(key, "missing")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise BadField(key, f"expected a non-empty string, got {value!r:.80}")
    return value.strip()


def string_list(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise BadField(key, f"expected a non-empty list of strings, got {value!r:.80}")
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
        raise BadField("evidence", f"expected a list, got {value!r:.80}")
    sets = []
    for group in value:
        if not isinstance(group, list) or not all(
            isinstance(item, list) and len(item) == 4 for item in group
        ):
            raise BadField("evidence", f"expected lists of 4-item lists, got {group!r:.80}")
        pages = tuple(dict.fromkeys(Provenance(title=str(item[2])) for item in group if item[2] is not None))
        if pages:
            sets.append(pages)
    return tuple(dict.fromkeys(sets)) or None


def kilt_provenance(items: Any) -> tuple[Provenance, ...]:
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise BadField("output.provenance", f"expected a list of objects, got {items!r:.80}")
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
