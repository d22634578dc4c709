"""One reader per published task format, each yielding typed `Example`s; `read_task` picks one by name.

One reader per published format: open-domain QA (DPR's `question<TAB>[answers]`, NQ-open JSON Lines,
CuratedTrec's regular expressions), abstractive QA (MS MARCO), Jeopardy question generation, FEVER
(3-way and 2-way through one-token targets), KILT JSON Lines, SQuAD-open, NQ gold passages and the
Red-Trivia YAML lists. The record sources, field helpers and error handling they share live in
`rag.tasks.records`; `rag.tasks` re-exports every public name.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from rag.tasks.examples import (
    CLIMATE_FEVER_3WAY,
    CLIMATE_FEVER_ALL_LABELS,
    FEVER_3WAY,
    FEVER_ALL_LABELS,
    SCIFACT_3WAY,
    Example,
    LabelSet,
    Provenance,
)
from rag.tasks.records import (
    BadField,
    SkipReport,
    TaskFormatError,
    csv_rows,
    fever_evidence,
    first_key,
    json_object,
    kilt_provenance,
    lines,
    open_text,
    qa_example,
    record_id,
    show,
    stream,
    string_field,
    string_list,
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
            raise BadField("row", f"expected 2 tab-separated fields (question, answers), got {len(row)}")
        question = _unquote_twice(row[0]).strip()
        if not question:
            raise BadField("question", "empty")
        try:
            answers = ast.literal_eval(row[1])
        except (ValueError, SyntaxError) as err:
            raise BadField("answers", f"not a Python list literal: {err}") from None
        return qa_example(position, str(position), question, string_list(answers, "answers"), regex)

    return stream(path, csv_rows(path, "\t"), parse, skip_bad, report)


def read_qa_jsonl(
    path: Path | str, *, regex: bool = False, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """Question-answer JSON Lines: NQ-open's `{"question", "answer": [...]}` ("answers" also accepted),
    or training pairs `{"input", "target"}` ("input" stands for "question"; a "target" string is what
    training teaches, the answers list, if any, what the metrics accept)."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example:
        obj = json_object(raw)
        question = string_field(obj, first_key(obj, ("question", "input")))
        target = string_field(obj, "target") if "target" in obj else None
        if target is None or "answer" in obj or "answers" in obj:
            key = first_key(obj, ("answer", "answers") if target is not None else ("answer", "answers", "target"))
            answers = string_list(obj[key], key)
        else:
            answers = (target,)
        example = qa_example(position, record_id(obj, position), question, answers, regex)
        return example if target is None or regex else replace(example, targets=(target,))

    return stream(path, lines(path), parse, skip_bad, report)


def read_open_qa(
    path: Path | str, *, regex: bool = False, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """Either open-QA format, told apart by the file's first character (`{`: JSON Lines)."""
    path = Path(path)
    with open_text(path) as handle:
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
            raise BadField(
                "row", f"expected 4 tab-separated fields (id, type, question, pattern), got {len(row)}"
            )
        ident, _, question, pattern = (cell.strip() for cell in row)
        if not question:
            raise BadField("question", "empty")
        if not pattern:
            raise BadField("answer", "empty pattern")
        return qa_example(position, ident or str(position), question, (pattern,), regex=True)

    # split on tabs, not csv: the questions and patterns contain bare double quotes
    def rows() -> Iterator[tuple[int, int, list[str]]]:
        for position, line, raw in lines(path):
            yield position, line, raw.rstrip("\r\n").split("\t")

    return stream(path, rows(), parse, skip_bad, report)


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
        obj = raw if isinstance(raw, dict) else json_object(raw)
        key = first_key(obj, ("answers",))
        answers = string_list(obj[key], key)
        if skip_no_answer and all(a.strip() == "No Answer Present." for a in answers):
            return None
        return qa_example(position, record_id(obj, position), string_field(obj, "query"), answers, regex=False)

    def rows() -> Iterator[tuple[int, int | None, str | dict[str, Any]]]:
        with open_text(path) as handle:
            head = handle.readline()
        try:
            table = json.loads(head)
        except (json.JSONDecodeError, RecursionError):
            table = None
        if not (isinstance(table, dict) and isinstance(table.get("query"), dict)):
            yield from lines(path)
            return
        columns = {k: v for k, v in table.items() if isinstance(v, dict)}
        for position, row in enumerate(columns["query"]):
            yield position, None, {k: v.get(row) for k, v in columns.items()}

    return stream(path, rows(), parse, skip_bad, report)


def read_jeopardy(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """Jeopardy CSV (Show Number, Air Date, Round, Category, Value, Question, Answer; header names may
    carry leading spaces). The paper's task: input the answer entity, target the clue ("question")."""
    path = Path(path)
    header: list[str] = []

    def parse(position: int, row: list[str]) -> Example:
        if len(row) != len(header):
            raise BadField("row", f"expected {len(header)} comma-separated fields, got {len(row)}")
        record = dict(zip(header, row, strict=True))
        answer, clue = record["Answer"].strip(), record["Question"].strip()
        if not answer:
            raise BadField("Answer", "empty")
        if not clue:
            raise BadField("Question", "empty")
        return Example(id=str(position), input=answer, targets=(clue,), answers=(clue,), position=position)

    def rows() -> Iterator[tuple[int, int, list[str]]]:
        records = csv_rows(path, ",")
        first = next(records, None)
        if first is None:
            raise TaskFormatError(path, 1, "header", "empty file")
        header.extend(name.strip() for name in first[2])
        for name in ("Question", "Answer"):
            if name not in header:
                raise TaskFormatError(path, 1, name, f"missing from the header {header}")
        for position, line, row in records:
            yield position - 1, line, row

    return stream(path, rows(), parse, skip_bad, report)


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
        obj = json_object(raw)
        label = string_field(obj, "label")
        if label not in FEVER_ALL_LABELS:
            raise BadField("label", f"{label!r} is not one of {list(FEVER_ALL_LABELS)}")
        if label not in labels.labels:
            return None
        target = labels.target(label)
        provenance = fever_evidence(obj["evidence"]) if "evidence" in obj else None
        return Example(
            id=record_id(obj, position),
            input=string_field(obj, "claim"),
            targets=(target,),
            answers=(target,),
            position=position,
            label=label,
            provenance=provenance,
        )

    return stream(path, lines(path), parse, skip_bad, report)


SCIFACT_LABELS = ("SUPPORT", "CONTRADICT")  # a claim without either has no evidence: NOT ENOUGH INFO


def _scifact_claims_file(path: Path, split: str) -> tuple[Path, Callable[[], io.TextIOBase]]:
    """(name for messages, opener) of the claims CSV: the file itself, claims_{split}.csv in a folder, or
    that member of the Hugging Face CSV export's zip (read in place, never extracted)."""
    if path.suffix == ".zip":
        member = f"claims_{split}.csv"
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.rsplit("/", 1)[-1] == member]
        if not names:
            raise TaskFormatError(path, None, "file", f"the zip holds no {member}")

        def opener() -> io.TextIOBase:
            archive = zipfile.ZipFile(path)
            return io.TextIOWrapper(archive.open(names[0]), encoding="utf-8", newline="")

        return path / names[0], opener
    file = path / f"claims_{split}.csv" if path.is_dir() else path
    return file, lambda: open_text(file)


def read_scifact(
    path: Path | str,
    *,
    split: str = "train",
    labels: LabelSet = SCIFACT_3WAY,
    skip_bad: bool = False,
    report: SkipReport | None = None,
) -> Iterator[Example]:
    """SciFact claims (the Hugging Face CSV export: id, claim, evidence_doc_id, evidence_label,
    evidence_sentences, cited_doc_ids; one row per evidence set, a claim's rows adjacent). `path` is a
    claims CSV, a folder holding claims_{split}.csv, or the export's zip. One example per claim: its label
    is the rows' evidence label (SUPPORT / CONTRADICT), NOT ENOUGH INFO where no row has one; its
    provenance is one evidence set per gold abstract (Provenance.passage_id = the abstract's doc_id).
    Positions count claims, not rows. The export's test split has no labels (every claim would read as
    NOT ENOUGH INFO): it is refused."""
    path = Path(path)
    if path.suffix != ".csv" and split == "test":
        raise TaskFormatError(path, None, "split", "SciFact's test claims are unlabelled; use train or validation")
    file, opener = _scifact_claims_file(path, split)

    def groups() -> Iterator[tuple[int, int, list[dict[str, str]]]]:
        with opener() as handle:
            reader = csv.reader(handle)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise TaskFormatError(file, 1, "header", "empty file")
            for name in ("id", "claim", "evidence_doc_id", "evidence_label"):
                if name not in header:
                    raise TaskFormatError(file, 1, "header", f"column {name!r} missing from {header}")
            group: list[dict[str, str]] = []
            position, start, line = 0, 2, 2
            for row in reader:
                record = dict(zip(header, row, strict=False)) if len(row) == len(header) else {"_width": str(len(row))}
                if group and record.get("id") != group[0].get("id"):
                    yield position, start, group
                    position, start, group = position + 1, line, []
                group.append(record)
                line = reader.line_num + 1
            if group:
                yield position, start, group

    def parse(position: int, group: list[dict[str, str]]) -> Example | None:
        for record in group:
            if "_width" in record:
                raise BadField("row", f"expected the header's number of comma-separated fields, got {record['_width']}")
        claim = group[0]["claim"].strip()
        if not claim:
            raise BadField("claim", "empty")
        found = {r["evidence_label"].strip() for r in group if r["evidence_label"].strip()}
        if found - set(SCIFACT_LABELS):
            raise BadField("evidence_label", f"{sorted(found - set(SCIFACT_LABELS))} not one of {list(SCIFACT_LABELS)}")
        if len(found) > 1:
            raise BadField("evidence_label", f"claim {group[0]['id']!r} has conflicting labels {sorted(found)}")
        label = found.pop() if found else "NOT ENOUGH INFO"
        if label not in labels.labels:
            return None
        docs = dict.fromkeys(r["evidence_doc_id"].strip() for r in group if r["evidence_label"].strip())
        if "" in docs:
            raise BadField("evidence_doc_id", "empty for a row with an evidence label")
        target = labels.target(label)
        return Example(id=group[0]["id"].strip() or str(position), input=claim, targets=(target,),
                       answers=(target,), position=position, label=label,
                       provenance=tuple((Provenance(passage_id=d),) for d in docs) or None)  # fmt: skip

    return stream(file, groups(), parse, skip_bad, report)


def read_climate_fever(
    path: Path | str,
    *,
    labels: LabelSet = CLIMATE_FEVER_3WAY,
    skip_bad: bool = False,
    report: SkipReport | None = None,
) -> Iterator[Example]:
    """Climate-FEVER JSON Lines `{claim_id, claim, claim_label, evidences: [{article, evidence_label, ...}]}`.
    Claims whose label is outside `labels` (DISPUTED; NOT_ENOUGH_INFO in 2-way) are filtered; provenance
    is one evidence set per article of a SUPPORTS / REFUTES evidence sentence (Provenance.title)."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example | None:
        obj = json_object(raw)
        label = string_field(obj, "claim_label")
        if label not in CLIMATE_FEVER_ALL_LABELS:
            raise BadField("claim_label", f"{label!r} is not one of {list(CLIMATE_FEVER_ALL_LABELS)}")
        evidences = obj.get("evidences", [])
        if not isinstance(evidences, list) or not all(isinstance(e, dict) and "article" in e for e in evidences):
            raise BadField("evidences", f"expected a list of objects with an article, got {evidences!r:.80}")
        if label not in labels.labels:
            return None
        pages = dict.fromkeys(str(e["article"]) for e in evidences if e.get("evidence_label") in ("SUPPORTS", "REFUTES"))
        target = labels.target(label)
        ident = obj.get("claim_id")
        return Example(id=str(ident) if ident is not None else str(position), input=string_field(obj, "claim"),
                       targets=(target,), answers=(target,), position=position, label=label,
                       provenance=tuple((Provenance(title=p),) for p in pages) or None)  # fmt: skip

    return stream(path, lines(path), parse, skip_bad, report)


# ---------------------------------------------------------------------------------------------------
# KILT, SQuAD-open, NQ gold passages, Red-Trivia.


def read_kilt(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """KILT JSON Lines `{"id", "input", "output": [{"answer"?, "provenance"?: [{wikipedia_id, title}]}]}`.
    Answers are the distinct output answers; provenance holds one evidence set per output that has one."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example:
        obj = json_object(raw)
        outputs = obj.get("output")
        if not isinstance(outputs, list) or not all(isinstance(o, dict) for o in outputs):
            raise BadField("output", f"expected a list of objects, got {show(outputs)}")
        answers: list[str] = []
        sets: list[tuple[Provenance, ...]] = []
        for output in outputs:
            if "answer" in output:
                if not isinstance(output["answer"], str):
                    raise BadField("output.answer", f"expected a string, got {show(output['answer'])}")
                answers.append(output["answer"])
            if output.get("provenance"):
                sets.append(kilt_provenance(output["provenance"]))
        unique = tuple(dict.fromkeys(answers))
        return Example(
            id=record_id(obj, position),
            input=string_field(obj, "input"),
            targets=unique,
            answers=unique,
            position=position,
            provenance=tuple(dict.fromkeys(sets)) or None,
        )

    return stream(path, lines(path), parse, skip_bad, report)


def read_squad_open(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """SQuAD-open questions (`questions.jsonl` `{id, question, answers, pid}`, or its folder). Reserved set."""
    path = Path(path)
    path = path / "questions.jsonl" if path.is_dir() else path

    def parse(position: int, raw: str) -> Example:
        obj = json_object(raw)
        answers = string_list(obj.get("answers"), "answers")
        pid = obj.get("pid")
        if not isinstance(pid, int | str):
            raise BadField("pid", f"expected a paragraph id, got {show(pid)}")
        return Example(
            id=record_id(obj, position),
            input=string_field(obj, "question"),
            targets=answers,
            answers=answers,
            position=position,
            provenance=((Provenance(passage_id=str(pid)),),),
        )

    return stream(path, lines(path), parse, skip_bad, report)


def read_nq_gold(
    path: Path | str, *, skip_bad: bool = False, report: SkipReport | None = None
) -> Iterator[Example]:
    """NQ-open with gold passages (`{question, answers, ctxs: [{title, text, isgold}]}`, gzip allowed).
    Provenance is the gold passage's title. Reserved set."""
    path = Path(path)

    def parse(position: int, raw: str) -> Example:
        obj = json_object(raw)
        answers = string_list(obj.get("answers"), "answers")
        ctxs = obj.get("ctxs")
        if not isinstance(ctxs, list) or not all(isinstance(c, dict) and "title" in c for c in ctxs):
            raise BadField("ctxs", f"expected a list of objects with a title, got {show(ctxs)}")
        gold = tuple(dict.fromkeys(Provenance(title=str(c["title"])) for c in ctxs if c.get("isgold")))
        return Example(
            id=record_id(obj, position),
            input=string_field(obj, "question"),
            targets=answers,
            answers=answers,
            position=position,
            provenance=(gold,) if gold else None,
        )

    return stream(path, lines(path), parse, skip_bad, report)


def _red_trivia_file(path: Path) -> Iterator[tuple[int, int, tuple[str, Any]]]:
    """(position, line, (question, answers node)) from one YAML list, read as raw scalars (no 1.1 typing:
    an alias `yes` or `1.0` stays a string)."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise TaskFormatError(path, line, "yaml", f"bytes that are not UTF-8 (byte {err.start} of the file)") from None
    try:
        root = yaml.compose(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except RecursionError:
        raise TaskFormatError(path, None, "yaml", "nested too deeply") from None
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
                raise BadField("question", "empty")
            if not isinstance(node, yaml.SequenceNode) or not node.value:
                raise BadField(question, "expected a non-empty list of answers")
            if not all(isinstance(a, yaml.ScalarNode) for a in node.value):
                raise BadField(question, "expected each answer to be a scalar")
            # empty aliases ("") occur in the published lists: they name no answer, so they are dropped,
            # and a question left without answers is filtered out (counted in the report)
            answers = tuple(a.value.strip() for a in node.value if a.value.strip())
            if not answers:
                return None
            return Example(
                f"{subset}-{position}", question.strip(), answers, answers, position, subset=subset
            )

        yield from stream(file, _red_trivia_file(file), parse, skip_bad, report)


READERS: dict[str, Callable[..., Iterator[Example]]] = {
    "open-qa": read_open_qa,
    "dpr-qa": read_dpr_qa,
    "nq-open": read_qa_jsonl,
    "curatedtrec": read_curatedtrec,
    "msmarco": read_msmarco,
    "jeopardy": read_jeopardy,
    "fever": read_fever,
    "scifact": read_scifact,
    "climate-fever": read_climate_fever,
    "kilt": read_kilt,
    "squad-open": read_squad_open,
    "nq-gold": read_nq_gold,
    "red-trivia": read_red_trivia,
}


# The classification tasks (one-token labels, rag.evaluation's classification metric) and the label set
# each reader uses by default: `rag eval` and `rag train` score and train them with it.
CLASSIFICATION_LABELS: dict[str, LabelSet] = {"fever": FEVER_3WAY, "scifact": SCIFACT_3WAY,
                                              "climate-fever": CLIMATE_FEVER_3WAY}  # fmt: skip


def read_task(fmt: str, path: Path | str, **options: Any) -> list[Example]:
    """All examples of `path` read with the reader named `fmt` (a key of READERS)."""
    if fmt not in READERS:
        raise ValueError(f"unknown task format {fmt!r}; known: {', '.join(READERS)}")
    return list(READERS[fmt](path, **options))
