"""Readers for the paper's task formats, each yielding typed `Example`s.

One reader per published format: open-domain QA (DPR's `question<TAB>[answers]`, NQ-open JSON Lines,
CuratedTrec's regular expressions), abstractive QA (MS MARCO), Jeopardy question generation, FEVER
(3-way and 2-way through one-token targets), KILT JSON Lines, SQuAD-open, NQ gold passages and the
Red-Trivia YAML lists. Bad input raises `TaskFormatError` naming the file, the line and the field;
`skip_bad=True` skips such records and counts them in a `SkipReport` instead.
"""

from __future__ import annotations

import ast
import csv
import gzip
import io
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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


# ---------------------------------------------------------------------------------------------------
# Open-domain QA.


def _unquote_twice(question: str) -> str:
    """Anserini's TriviaQA files CSV-quote questions that contain quotes a second time: undo that when
    the field is a well-formed quoted field (inner quotes all doubled), so `"A" and "B"` stays as is."""
    inner = question[1:-1]
    if len(question) >= 2 and question[0] == question[-1] == '"' and '"' not in inner.replace('""', ""):
        return inner.replace('""', '"')
    return question


def read_dpr_qa(
    path: Path | str, *, regex: bool = False, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """DPR's `question<TAB>['answer', ...]` files (csv + ast.literal_eval, as DPR reads them)."""
    path = Path(path)

    def parse(position: int, row: list[str]) -> Example:
        if len(row) != 2:
            raise _Bad("row", f"expected 2 tab-separated fields (question, answers), got {len(row)}")
        question = _unquote_twice(row[0]).strip()
        if not question:
            raise _Bad("question", "empty")
        try:
            answers = ast.literal_eval(row[1])
        except (ValueError, SyntaxError) as err:
            raise _Bad("answers", f"not a Python list literal: {err}") from None
        return _qa(position, str(position), question, _texts(answers, "answers"), regex)

    return _stream(path, _csv_rows(path, "\t"), parse, skip_bad, report)


def read_qa_jsonl(
    path: Path | str, *, regex: bool = False, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """NQ-open style JSON Lines `{"question", "answer": [...]}` ("answers" also accepted)."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example:
        obj = _json_object(raw)
        key = _first_key(obj, ("answer", "answers"))
        answers = _texts(obj[key], key)
        return _qa(position, _record_id(obj, position), _text(obj, "question"), answers, regex)

    return _stream(path, _lines(path), parse, skip_bad, report)


def read_open_qa(
    path: Path | str, *, regex: bool = False, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """Either open-QA format, told apart by the file's first character (`{`: JSON Lines)."""
    path = Path(path)
    with _open_text(path) as handle:
        head = handle.read(4096).lstrip()
    reader = read_qa_jsonl if head.startswith("{") else read_dpr_qa
    return reader(path, regex=regex, skip_bad=skip_bad, report=report)


def read_curatedtrec(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """brmson's CuratedTREC TSV: `id<TAB>type<TAB>question<TAB>answer-regex` (one pattern, `|` for or)."""
    path = Path(path)

    def parse(position: int, row: list[str]) -> Example:
        if len(row) != 4:
            raise _Bad(
                "row", f"expected 4 tab-separated fields (id, type, question, pattern), got {len(row)}"
            )
        ident, _, question, pattern = (cell.strip() for cell in row)
        if not question:
            raise _Bad("question", "empty")
        if not pattern:
            raise _Bad("answer", "empty pattern")
        return _qa(position, ident or str(position), question, (pattern,), regex=True)

    # split on tabs, not csv: the questions and patterns contain bare double quotes
    def rows() -> Iterator[tuple[int, int, list[str]]]:
        for position, line, raw in _lines(path):
            yield position, line, raw.rstrip("\r\n").split("\t")

    return _stream(path, rows(), parse, skip_bad, report)


# ---------------------------------------------------------------------------------------------------
# Abstractive QA, question generation, fact verification.


def read_msmarco(
    path: Path | str,
    *,
    skip_no_answer: bool = False,
    skip_bad: bool = False,
    report: SkipReport | None = None,
) -> Iterator[Example]:
    """MS MARCO QA: JSON Lines `{"query", "answers": [...], "query_id"?}`, or the official column layout
    (one JSON object `{"query": {row: text}, "answers": {row: [...]}, ...}`).
    `skip_no_answer` leaves out queries whose only answer is "No Answer Present." (counted as filtered)."""
    path = Path(path)

    def parse(position: int, raw: str | dict[str, Any]) -> Example | None:
        obj = raw if isinstance(raw, dict) else _json_object(raw)
        key = _first_key(obj, ("answers",))
        answers = _texts(obj[key], key)
        if skip_no_answer and all(a.strip() == "No Answer Present." for a in answers):
            return None
        return _qa(position, _record_id(obj, position), _text(obj, "query"), answers, regex=False)

    def rows() -> Iterator[tuple[int, int | None, str | dict[str, Any]]]:
        with _open_text(path) as handle:
            head = handle.readline()
        try:
            table = json.loads(head)
        except json.JSONDecodeError:
            table = None
        if not (isinstance(table, dict) and isinstance(table.get("query"), dict)):
            yield from _lines(path)
            return
        columns = {k: v for k, v in table.items() if isinstance(v, dict)}
        for position, row in enumerate(columns["query"]):
            yield position, None, {k: v.get(row) for k, v in columns.items()}

    return _stream(path, rows(), parse, skip_bad, report)


def read_jeopardy(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """Jeopardy CSV (Show Number, Air Date, Round, Category, Value, Question, Answer; header names may
    carry leading spaces). The paper's task: input the answer entity, target the clue ("question")."""
    path = Path(path)
    header: list[str] = []

    def parse(position: int, row: list[str]) -> Example:
        if len(row) != len(header):
            raise _Bad("row", f"expected {len(header)} comma-separated fields, got {len(row)}")
        record = dict(zip(header, row, strict=True))
        answer, clue = record["Answer"].strip(), record["Question"].strip()
        if not answer:
            raise _Bad("Answer", "empty")
        if not clue:
            raise _Bad("Question", "empty")
        return Example(id=str(position), input=answer, targets=(clue,), answers=(clue,), position=position)

    def rows() -> Iterator[tuple[int, int, list[str]]]:
        records = _csv_rows(path, ",")
        first = next(records, None)
        if first is None:
            raise TaskFormatError(path, 1, "header", "empty file")
        header.extend(name.strip() for name in first[2])
        for name in ("Question", "Answer"):
            if name not in header:
                raise TaskFormatError(path, 1, name, f"missing from the header {header}")
        for position, line, row in records:
            yield position - 1, line, row

    return _stream(path, rows(), parse, skip_bad, report)


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


def read_fever(
    path: Path | str,
    *,
    labels: LabelSet = FEVER_3WAY,
    skip_bad: bool = False,
    report: SkipReport | None = None,
) -> Iterator[Example]:
    """FEVER JSON Lines `{"id", "claim", "label", "evidence"}`. The target is the label's one-token
    string; labels outside `labels` but valid FEVER labels (NEI in 2-way) are filtered, not errors."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example | None:
        obj = _json_object(raw)
        label = _text(obj, "label")
        if label not in FEVER_ALL_LABELS:
            raise _Bad("label", f"{label!r} is not one of {list(FEVER_ALL_LABELS)}")
        if label not in labels.labels:
            return None
        target = labels.target(label)
        provenance = _fever_evidence(obj["evidence"]) if "evidence" in obj else None
        return Example(
            id=_record_id(obj, position),
            input=_text(obj, "claim"),
            targets=(target,),
            answers=(target,),
            position=position,
            label=label,
            provenance=provenance,
        )

    return _stream(path, _lines(path), parse, skip_bad, report)


# ---------------------------------------------------------------------------------------------------
# KILT, SQuAD-open, NQ gold passages, Red-Trivia.


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


def read_kilt(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """KILT JSON Lines `{"id", "input", "output": [{"answer"?, "provenance"?: [{wikipedia_id, title}]}]}`.
    Answers are the distinct output answers; provenance holds one evidence set per output that has one."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example:
        obj = _json_object(raw)
        outputs = obj.get("output")
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise _Bad("output", f"expected a list of objects, got {outputs!r:.80}")
        answers: list[str] = []
        sets: list[tuple[Provenance, ...]] = []
        for output in outputs:
            if "answer" in output:
                if not isinstance(output["answer"], str):
                    raise _Bad("output.answer", f"expected a string, got {output['answer']!r:.80}")
                answers.append(output["answer"])
            if output.get("provenance"):
                sets.append(_kilt_provenance(output["provenance"]))
        unique = tuple(dict.fromkeys(answers))
        return Example(
            id=_record_id(obj, position),
            input=_text(obj, "input"),
            targets=unique,
            answers=unique,
            position=position,
            provenance=tuple(dict.fromkeys(sets)) or None,
        )

    return _stream(path, _lines(path), parse, skip_bad, report)


def read_squad_open(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """SQuAD-open questions (`questions.jsonl` `{id, question, answers, pid}`, or its folder). Reserved set."""
    path = Path(path)
    path = path / "questions.jsonl" if path.is_dir() else path

    def parse(position: int, raw: str) -> Example:
        obj = _json_object(raw)
        answers = _texts(obj.get("answers"), "answers")
        pid = obj.get("pid")
        if not isinstance(pid, int | str):
            raise _Bad("pid", f"expected a paragraph id, got {pid!r:.80}")
        return Example(
            id=_record_id(obj, position),
            input=_text(obj, "question"),
            targets=answers,
            answers=answers,
            position=position,
            provenance=((Provenance(passage_id=str(pid)),),),
        )

    return _stream(path, _lines(path), parse, skip_bad, report)


def read_nq_gold(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """NQ-open with gold passages (`{question, answers, ctxs: [{title, text, isgold}]}`, gzip allowed).
    Provenance is the gold passage's title. Reserved set."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example:
        obj = _json_object(raw)
        answers = _texts(obj.get("answers"), "answers")
        ctxs = obj.get("ctxs")
        if not isinstance(ctxs, list) or not all(isinstance(c, dict) and "title" in c for c in ctxs):
            raise _Bad("ctxs", f"expected a list of objects with a title, got {ctxs!r:.80}")
        gold = tuple(dict.fromkeys(Provenance(title=str(c["title"])) for c in ctxs if c.get("isgold")))
        return Example(
            id=_record_id(obj, position),
            input=_text(obj, "question"),
            targets=answers,
            answers=answers,
            position=position,
            provenance=(gold,) if gold else None,
        )

    return _stream(path, _lines(path), parse, skip_bad, report)


def _red_trivia_file(path: Path) -> Iterator[tuple[int, int, tuple[str, Any]]]:
    """(position, line, (question, answers node)) from one YAML list, read as raw scalars (no 1.1 typing:
    an alias `yes` or `1.0` stays a string)."""
    try:
        root = yaml.compose(
            path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        )
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise TaskFormatError(
            path, mark.line + 1 if mark else None, "yaml", str(err).splitlines()[0]
        ) from None
    if not isinstance(root, yaml.MappingNode):
        raise TaskFormatError(path, 1, "yaml", "expected a mapping of question -> list of answers")
    position = 0
    for key, value in root.value:
        if key.value in ("AUTHOR", "CONFIG", "DESCRIPTION"):
            continue
        yield position, key.start_mark.line + 1, (key.value, value)
        position += 1


def read_red_trivia(
    path: Path | str,
    *,
    subsets: Sequence[str] | None = None,
    skip_bad: bool = False,
    report: SkipReport | None = None,
) -> Iterator[Example]:
    """Red-Trivia YAML lists (`rag.resources.red_trivia_dir()` or one file): question -> answer aliases.
    Each example keeps its list name in `subset`; `subsets` picks lists by name."""
    path = Path(path)
    files = sorted(path.glob("*.yaml")) if path.is_dir() else [path]
    if subsets is not None:
        missing = set(subsets) - {f.stem for f in files}
        if missing:
            raise FileNotFoundError(f"{path}: no Red-Trivia list named {sorted(missing)}")
        files = [f for f in files if f.stem in set(subsets)]
    for file in files:

        def parse(position: int, item: tuple[str, Any], subset: str = file.stem) -> Example | None:
            question, node = item
            if not question.strip():
                raise _Bad("question", "empty")
            if not isinstance(node, yaml.SequenceNode) or not node.value:
                raise _Bad(question, "expected a non-empty list of answers")
            if not all(isinstance(a, yaml.ScalarNode) for a in node.value):
                raise _Bad(question, "expected each answer to be a scalar")
            # empty aliases ("") occur in the published lists: they name no answer, so they are dropped,
            # and a question left without answers is filtered out (counted in the report)
            answers = tuple(a.value.strip() for a in node.value if a.value.strip())
            if not answers:
                return None
            return Example(
                f"{subset}-{position}", question.strip(), answers, answers, position, subset=subset
            )

        yield from _stream(file, _red_trivia_file(file), parse, skip_bad, report)


# ---------------------------------------------------------------------------------------------------

READERS: dict[str, Callable[..., Iterator[Example]]] = {
    "open-qa": read_open_qa,
    "dpr-qa": read_dpr_qa,
    "nq-open": read_qa_jsonl,
    "curatedtrec": read_curatedtrec,
    "msmarco": read_msmarco,
    "jeopardy": read_jeopardy,
    "fever": read_fever,
    "kilt": read_kilt,
    "squad-open": read_squad_open,
    "nq-gold": read_nq_gold,
    "red-trivia": read_red_trivia,
}


def read_task(fmt: str, path: Path | str, **options: Any) -> list[Example]:
    """All examples of `path` read with the reader named `fmt` (a key of READERS)."""
    if fmt not in READERS:
        raise ValueError(f"unknown task format {fmt!r}; known: {', '.join(READERS)}")
    return list(READERS[fmt](path, **options))
