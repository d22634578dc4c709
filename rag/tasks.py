"""Typed examples for the paper's tasks, and `read_task`, the one entry point that reads them.

The formats (open-domain QA, MS MARCO, Jeopardy, FEVER, KILT, SQuAD-open, NQ gold passages, Red-Trivia)
each have a reader in `rag.task_readers`; this module holds what they share: the `Example` record, the
FEVER label sets, the reserved-split rule, and the record sources and field helpers that turn bad input
into a `TaskFormatError` naming the file, the line and the field (`skip_bad=True` skips such records and
counts them in a `SkipReport` instead). The readers are re-exported here, so `from rag.tasks import
read_fever` keeps working.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

csv.field_size_limit(sys.maxsize)  # TriviaQA alias lists exceed the default 128 KiB


@dataclass(frozen=True)
class Provenance:
    """One page (or passage) of evidence; KILT names pages by wikipedia_id, FEVER and NQ by title."""

    title: str | None = None
    wikipedia_id: str | None = None
    passage_id: str | None = None


@dataclass(frozen=True)
class Example:
    id: str
    input: str  # what the retriever and generator see: question, answer entity, claim
    targets: tuple[str, ...]  # what the generator is trained to produce (empty for regex answers)
    answers: tuple[str, ...]  # what the metric compares against (regular expressions if answer_is_regex)
    position: int  # 0-based position of the record in its file (the reserved-split rule uses it)
    label: str | None = None  # the dataset's class label (FEVER)
    provenance: tuple[tuple[Provenance, ...], ...] | None = None  # evidence sets: one per gold output
    answer_is_regex: bool = False
    subset: str | None = None  # Red-Trivia list name


# The Red-Trivia lists of general knowledge. The game, show and flag/map-picture lists are left out of
# the experiments: their answers occur in Wikipedia summaries mostly by accident (a Pokemon named after
# a common word), which makes "the answer is in a passage" a poor test of retrieval.
RED_TRIVIA_GENERAL_LISTS = ("general", "artandliterature", "entertainment", "worldcapitals", "uscapitals",
                            "greekmyth", "elements", "sports", "computers", "2015", "2016")  # fmt: skip


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


class _Bad(Exception):
    def __init__(self, field_name: str, reason: str):
        super().__init__(reason)
        self.field, self.reason = field_name, reason


@dataclass(frozen=True)
class LabelSet:
    """A classification task as generation: each label maps to a one-token target string."""

    labels: tuple[str, ...]
    targets: tuple[str, ...]

    def target(self, label: str) -> str:
        return self.targets[self.labels.index(label)]

    def label_of(self, generated: str) -> str | None:
        """The label whose target the generated text is (case and surrounding space ignored)."""
        text = generated.strip().lower()
        for label, target in zip(self.labels, self.targets, strict=True):
            if text == target.lower():
                return label
        return None

    def token_ids(self, encode: Callable[[str], list[int]]) -> dict[str, int]:
        """Each target's single token id under `encode`; ValueError if a target is not one token."""
        ids = {}
        for target in self.targets:
            pieces = encode(target)
            if len(pieces) != 1:
                raise ValueError(f"label target {target!r} is {len(pieces)} tokens, not one: {pieces}")
            ids[target] = pieces[0]
        return ids


FEVER_3WAY = LabelSet(("SUPPORTS", "REFUTES", "NOT ENOUGH INFO"), ("true", "false", "unknown"))
FEVER_2WAY = LabelSet(("SUPPORTS", "REFUTES"), ("true", "false"))
FEVER_ALL_LABELS = FEVER_3WAY.labels


def is_reserved(position: int) -> bool:
    """../shared/data/README.md: in a "reserved" set, positions with i % 5 == 4 are the held-out test split."""
    return position % 5 == 4


def split_reserved(examples: Iterable[Example], part: Literal["dev", "reserved"]) -> list[Example]:
    """The development four fifths, or the reserved fifth (final figures only), by file position."""
    want = part == "reserved"
    return [ex for ex in examples if is_reserved(ex.position) == want]


# ---------------------------------------------------------------------------------------------------
# Record sources: (position, line, raw record) with 1-based physical line numbers.


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _lines(path: Path) -> Iterator[tuple[int, int, str]]:
    with _open_text(path) as handle:
        position = 0
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield position, number, line
                position += 1


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, int, list[str]]]:
    with _open_text(path) as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        start = 1
        for position, row in enumerate(reader):
            yield position, start, row
            start = reader.line_num + 1


def _stream(
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
            except _Bad as bad:
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
# Field helpers: each raises _Bad naming the field.


def _json_object(raw: str) -> dict[str, Any]:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        raise _Bad("json", f"malformed JSON: {err.msg} at column {err.colno}") from None
    if not isinstance(obj, dict):
        raise _Bad("json", f"expected an object, got {type(obj).__name__}")
    return obj


def _text(obj: dict[str, Any], key: str) -> str:
    if key not in obj:
        raise _Bad(key, "missing")
    value = obj[key]
    if not isinstance(value, str) or not value.strip():
        raise _Bad(key, f"expected a non-empty string, got {value!r:.80}")
    return value.strip()


def _texts(value: Any, key: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(a, str) for a in value):
        raise _Bad(key, f"expected a non-empty list of strings, got {value!r:.80}")
    return tuple(value)


def _first_key(obj: dict[str, Any], keys: Sequence[str]) -> str:
    for key in keys:
        if key in obj:
            return key
    raise _Bad(keys[0], "missing" + (f" (also looked for {', '.join(keys[1:])})" if len(keys) > 1 else ""))


def _record_id(obj: dict[str, Any], position: int) -> str:
    value = obj.get("id", obj.get("query_id"))
    return str(value) if value is not None else str(position)


def _qa(position: int, ident: str, question: str, answers: tuple[str, ...], regex: bool) -> Example:
    return Example(
        id=ident,
        input=question,
        targets=() if regex else answers,
        answers=answers,
        position=position,
        answer_is_regex=regex,
    )


def _fever_evidence(value: Any) -> tuple[tuple[Provenance, ...], ...] | None:
    """FEVER evidence: a list of evidence sets, each a list of [annotation, evidence, page, sentence]."""
    if not isinstance(value, list):
        raise _Bad("evidence", f"expected a list, got {value!r:.80}")
    sets = []
    for group in value:
        if not isinstance(group, list) or not all(
            isinstance(item, list) and len(item) == 4 for item in group
        ):
            raise _Bad("evidence", f"expected lists of 4-item lists, got {group!r:.80}")
        pages = tuple(dict.fromkeys(Provenance(title=str(item[2])) for item in group if item[2] is not None))
        if pages:
            sets.append(pages)
    return tuple(dict.fromkeys(sets)) or None


def _kilt_provenance(items: Any) -> tuple[Provenance, ...]:
    if not isinstance(items, list) or not all(isinstance(p, dict) for p in items):
        raise _Bad("output.provenance", f"expected a list of objects, got {items!r:.80}")
    pages = []
    for item in items:
        if "wikipedia_id" not in item:
            raise _Bad("output.provenance.wikipedia_id", "missing")
        title = item.get("title")
        pages.append(
            Provenance(
                title=None if title is None else str(title), wikipedia_id=str(item["wikipedia_id"]).strip()
            )
        )
    return tuple(dict.fromkeys(pages))


# ---------------------------------------------------------------------------------------------------
# The readers import the machinery above, so they are loaded on first use rather than at import time:
# that keeps `import rag.task_readers` and `import rag.tasks` working in either order.

__all__ = [
    "FEVER_2WAY",
    "FEVER_3WAY",
    "FEVER_ALL_LABELS",
    "READERS",
    "Example",
    "LabelSet",
    "Provenance",
    "SkipReport",
    "TaskFormatError",
    "is_reserved",
    "read_curatedtrec",
    "read_dpr_qa",
    "read_fever",
    "read_jeopardy",
    "read_kilt",
    "read_msmarco",
    "read_nq_gold",
    "read_open_qa",
    "read_qa_jsonl",
    "read_red_trivia",
    "read_squad_open",
    "read_task",
    "split_reserved",
]

if TYPE_CHECKING:
    from rag.task_readers import (
        READERS,
        read_curatedtrec,
        read_dpr_qa,
        read_fever,
        read_jeopardy,
        read_kilt,
        read_msmarco,
        read_nq_gold,
        read_open_qa,
        read_qa_jsonl,
        read_red_trivia,
        read_squad_open,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:  # only names not defined above reach here: the readers
        from rag import task_readers

        return getattr(task_readers, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def read_task(fmt: str, path: Path | str, **options: Any) -> list[Example]:
    """All examples of `path` read with the reader named `fmt` (a key of READERS)."""
    from rag.task_readers import READERS

    if fmt not in READERS:
        raise ValueError(f"unknown task format {fmt!r}; known: {', '.join(READERS)}")
    return list(READERS[fmt](path, **options))
