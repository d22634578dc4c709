"""Every reader turns any input into examples (or passages) or a clear error naming the file, the line and
the field: property tests (hypothesis) over arbitrary bytes, JSON records of the readers' own field names
with arbitrary values, delimited rows, YAML, encodings and nesting depth.

Defects this pins (abb17d6): a deeply nested JSON line raised RecursionError in every reader, even with
--skip-bad-records; an empty gold answer ("answer": [""]) made every passage a hit; DPR TSV kept
duplicate ids although JSON Lines rejected them.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rag.config import CorpusConfig
from rag.corpus import CorpusError, Passage, SeenIds, iter_passages
from rag.metrics import exact_match, has_answer
from rag.tasks import READERS, Example, SkipReport, TaskFormatError, read_task
from rag.tasks import records as R

FIELDS = ["question", "answer", "answers", "input", "target", "id", "query", "query_id", "claim", "label",
          "evidence", "output", "provenance", "wikipedia_id", "title", "text", "pid", "ctxs", "isgold"]  # fmt: skip
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=12),
                     st.sampled_from(["", " ", "SUPPORTS", "REFUTES", "Luanda", "\udcff"]))  # fmt: skip
_values = st.recursive(_scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                         st.dictionaries(st.sampled_from(FIELDS), inner, max_size=3)),
                       max_leaves=8)  # fmt: skip
_records = st.dictionaries(st.sampled_from(FIELDS), _values, max_size=6)


def _json_line(record) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8", "surrogateescape")


_contents = st.one_of(
    st.binary(max_size=200),
    st.lists(_records.map(_json_line), min_size=1, max_size=4).map(lambda ls: b"\n".join(ls) + b"\n"),
    st.integers(1, 3000).map(lambda n: b'{"question": "q", "answer": ' + b"[" * n + b"]" * n + b"}\n"),
    st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=5).map(lambda cells: "\t".join(cells)),
             min_size=1, max_size=4).map(lambda rows: ("\n".join(rows) + "\n").encode("utf-8", "surrogateescape")),
    st.lists(st.lists(st.text(max_size=8), min_size=1, max_size=8).map(lambda cells: ",".join(cells)),
             min_size=1, max_size=4).map(lambda rows: ("Show Number, Air Date, Round, Category, Value, Question, Answer\n"
                                                     + "\n".join(rows) + "\n").encode("utf-8", "surrogateescape")),
    st.dictionaries(st.text(max_size=8), st.one_of(st.lists(st.text(max_size=6), max_size=3), st.text(max_size=6)),
                    max_size=3).map(lambda d: "\n".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in d.items())
                                    .encode("utf-8", "surrogateescape")),
)  # fmt: skip
SUFFIX = {"dpr-qa": ".csv", "curatedtrec": ".tsv", "jeopardy": ".csv", "red-trivia": ".yaml", "open-qa": ".csv"}
FILE_LEVEL = {"file", "yaml", "header", "Question", "Answer", "row"}  # errors about the file, not one record


def _check_example(example: Example) -> None:
    assert isinstance(example, Example) and example.input.strip()
    assert example.answers and all(isinstance(a, str) and a.strip() for a in example.answers)
    assert all(t.strip() for t in example.targets)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(sorted(READERS)), content=_contents, skip=st.booleans())
def test_every_task_reader_gives_examples_or_an_error_naming_file_line_and_field(fmt, content, skip):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"data{SUFFIX.get(fmt, '.jsonl')}"
        path.write_bytes(content)
        report = SkipReport()
        try:
            examples = read_task(fmt, path, skip_bad=skip, report=report)
        except TaskFormatError as error:
            assert error.path == str(path) and error.field and str(path) in str(error)
            assert not skip or error.field in FILE_LEVEL, (fmt, str(error))  # records are skipped, counted
            return
        for example in examples:
            _check_example(example)
        assert report.read == len(examples)


_corpus_contents = st.one_of(
    st.binary(max_size=200),
    st.lists(_records.map(_json_line), min_size=1, max_size=4).map(lambda ls: b"\n".join(ls) + b"\n"),
    st.integers(1, 3000).map(lambda n: b'{"title": "t", "text": "w", "x": ' + b"[" * n + b"]" * n + b"}\n"),
    st.lists(st.lists(st.sampled_from(["1", "2", "", " ", "text here", '"q"', "Title", "\udcff"]), min_size=1,
                      max_size=4).map(lambda cells: "\t".join(cells)), min_size=1, max_size=5)
    .map(lambda rows: ("\n".join(rows) + "\n").encode("utf-8", "surrogateescape")),
)  # fmt: skip


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fmt=st.sampled_from(["jsonl", "dpr-tsv", "folder"]), content=_corpus_contents, skip=st.booleans())
def test_every_corpus_reader_gives_passages_or_an_error_naming_file_line_and_field(fmt, content, skip):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / {"jsonl": "c.jsonl", "dpr-tsv": "c.tsv", "folder": "docs/a.txt"}[fmt]
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        source = path.parent if fmt == "folder" else path
        config = CorpusConfig(source=str(source), format=fmt, words_per_passage=5, skip_bad_records=skip)
        try:
            passages = list(iter_passages(config))
        except CorpusError as error:
            assert not skip and str(path) in str(error) and error.field, str(error)
            return
        ids = [p.id for p in passages]
        assert len(set(ids)) == len(ids)  # unique, whatever the format
        assert all(isinstance(p, Passage) and p.text.strip() for p in passages)


def test_deep_nesting_is_a_bad_record_not_a_recursion_error(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    path = tmp_path / "qa.jsonl"
    path.write_text(f'{{"question": "q", "answer": {deep}}}\n{{"question": "q2", "answer": ["a"]}}\n')
    for fmt in ("nq-open", "open-qa", "fever", "kilt", "msmarco", "squad-open", "nq-gold"):
        with pytest.raises(TaskFormatError, match=r"line 1, field 'json': nested too deeply"):
            read_task(fmt, path)
    report = SkipReport()
    assert [e.input for e in read_task("nq-open", path, skip_bad=True, report=report)] == ["q2"]
    assert report.skipped == 1
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(f'{{"title": "t", "text": "w", "x": {deep}}}\n{{"title": "u", "text": "v"}}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: field '\(json\)': nested too deeply"):
        list(iter_passages(CorpusConfig(source=str(corpus))))
    assert [p.title for p in iter_passages(CorpusConfig(source=str(corpus), skip_bad_records=True))] == ["u"]


def test_an_empty_gold_answer_is_refused_and_never_a_hit(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "what?", "answer": [""]}\n')
    with pytest.raises(TaskFormatError, match=r"line 1, field 'answer': item 0 is an empty string"):
        read_task("nq-open", path)
    # and the metrics never count one, whoever made the example
    assert not has_answer([""], "any passage at all") and not has_answer(["", " "], "x")
    assert has_answer(["", "Luanda"], "Luanda is the capital")
    assert exact_match("", [""]) == 0.0 and exact_match("paris", ["", "Paris"]) == 1.0


def test_dpr_tsv_duplicate_ids_are_refused_as_jsonl_ones_are(tmp_path):
    path = tmp_path / "psgs.tsv"
    path.write_text("id\ttext\ttitle\n1\tLuanda is a city\tLuanda\n2\tParis too\tParis\n1\tanother text\tOther\n")
    with pytest.raises(CorpusError, match=r"psgs\.tsv:4: field 'id': duplicate id '1'"):
        list(iter_passages(CorpusConfig(source=str(path))))
    kept = list(iter_passages(CorpusConfig(source=str(path), skip_bad_records=True)))
    assert [p.id for p in kept] == ["1", "2"]


def test_seen_ids_is_a_set():
    seen, reference = SeenIds(capacity=8), set()
    for i in range(5000):
        key = f"id-{i % 3001}"
        assert seen.add(key) == (key not in reference)
        reference.add(key)
    assert len(seen) == len(reference) == 3001


def test_an_oversized_line_is_a_bad_record_read_in_bounded_pieces(tmp_path, monkeypatch):
    monkeypatch.setattr(R, "MAX_RECORD_CHARS", 64)
    path = tmp_path / "qa.jsonl"
    path.write_text('{"question": "q", "answer": ["' + "a" * 500 + '"]}\n{"question": "q2", "answer": ["b"]}\n')
    with pytest.raises(TaskFormatError, match=r"line 1, field 'line': longer than 64 characters"):
        read_task("nq-open", path)
    assert [e.input for e in read_task("nq-open", path, skip_bad=True)] == ["q2"]
