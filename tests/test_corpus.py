"""Corpus readers, the N-word splitter and the passage store.

Expected values are written by hand or computed independently of rag.corpus (word counts with
str.split and math.ceil on the raw packaged JSON).
"""

from __future__ import annotations

import gzip
import json
import math
import random
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rag.config import CorpusConfig
from rag.corpus import (
    CorpusError,
    Passage,
    ReadReport,
    iter_passages,
    resolve_format,
    split_words,
)
from rag.store import BATCH_ROWS, PassageStore, write_passage_store


def words(n: int, prefix: str = "w") -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    data = b"".join((x if isinstance(x, bytes) else x.encode("utf-8")) + b"\n" for x in lines)
    path.write_bytes(data)
    return path


def jrec(**fields) -> str:
    return json.dumps(fields)


def read(path: Path | str, **kwargs) -> list[Passage]:
    return list(iter_passages(CorpusConfig(source=str(path), **kwargs)))


# ---------------------------------------------------------------------------------------- splitting


def test_split_253_words_into_100_100_53():
    doc = words(253)
    passages = split_words("My  Title", " ".join(doc), 100, "d7")
    assert [len(p.text.split()) for p in passages] == [100, 100, 53]
    assert [p.id for p in passages] == ["d7-0", "d7-1", "d7-2"]
    assert all(p.title == "My Title" for p in passages)
    assert " ".join(p.text for p in passages).split() == doc
    assert passages[1].text.split()[0] == "w100" and passages[2].text.split()[-1] == "w252"


def test_split_exact_multiple_has_no_empty_tail():
    passages = split_words("t", " ".join(words(200)), 100, "x")
    assert [len(p.text.split()) for p in passages] == [100, 100]


def test_split_normalises_whitespace():
    (p,) = split_words(" A\tB ", "  one\n\ttwo   three\r\n", 100, "d")
    assert p == Passage("d-0", "A B", "one two three")


@pytest.mark.parametrize("seed", range(5))
def test_split_invariants_on_random_documents(seed):
    rng = random.Random(seed)
    n_words, per = rng.randint(1, 700), rng.randint(1, 130)
    doc = words(n_words)
    text = "".join(w + rng.choice([" ", "  ", "\n", "\t "]) for w in doc)
    passages = split_words("T", text, per, "d")
    counts = [len(p.text.split()) for p in passages]
    assert len(passages) == math.ceil(n_words / per)
    assert all(c == per for c in counts[:-1]) and 1 <= counts[-1] <= per
    assert " ".join(p.text for p in passages).split() == doc
    assert len({p.id for p in passages}) == len(passages)


def test_split_rejects_zero_words():
    with pytest.raises(ValueError):
        split_words("t", "a b", 0, "d")


# -------------------------------------------------------------------------------------------- ids


def test_ids_stable_across_runs_and_independent_of_other_documents(tmp_path):
    docs = [jrec(title=f"T{i}", text=" ".join(words(30 + 90 * i, f"d{i}w"))) for i in range(4)]
    first = read(write_lines(tmp_path / "a.jsonl", docs))
    again = read(tmp_path / "a.jsonl")
    assert [p.id for p in first] == [p.id for p in again]
    assert len({p.id for p in first}) == len(first) == 1 + 2 + 3 + 3  # 30, 120, 210, 300 words
    # A new document in front and the rest reordered: every old passage keeps its id.
    extra = jrec(title="New", text="brand new words")
    changed = read(write_lines(tmp_path / "b.jsonl", [extra, *reversed(docs)]))
    by_content = {(p.title, p.text): p.id for p in changed}
    assert all(by_content[(p.title, p.text)] == p.id for p in first)


def test_given_ids_are_kept_with_chunk_number(tmp_path):
    lines = [jrec(id="doc-a", title="A", text=" ".join(words(150))), jrec(id=7, title="B", text="x y")]
    assert [p.id for p in read(write_lines(tmp_path / "c.jsonl", lines))] == ["doc-a-0", "doc-a-1", "7-0"]


def test_identical_documents_get_distinct_ids(tmp_path):
    line = jrec(title="Same", text="same words")
    ids = [p.id for p in read(write_lines(tmp_path / "d.jsonl", [line, line]))]
    assert len(set(ids)) == 2


# ------------------------------------------------------------------------------------ good input


def test_jsonl_reader(tmp_path):
    lines = [jrec(title="Alpha", text="a  b\nc"), "", jrec(title="Beta", text=" ".join(words(101)), extra=1)]
    passages = read(write_lines(tmp_path / "docs.jsonl", lines), words_per_passage=100)
    assert [(p.title, len(p.text.split())) for p in passages] == [("Alpha", 3), ("Beta", 100), ("Beta", 1)]
    assert passages[0].text == "a b c"


def test_gzipped_jsonl_reader(tmp_path):
    path = tmp_path / "docs.jsonl.gz"
    path.write_bytes(gzip.compress((jrec(title="G", text="zipped text") + "\n").encode()))
    assert [(p.title, p.text) for p in read(path)] == [("G", "zipped text")]


def test_dpr_tsv_reader_keeps_ids_and_rows(tmp_path):
    long_text = " ".join(words(150))
    lines = [
        "id\ttext\ttitle",
        '1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron',
        f"2\t{long_text}\tLong row",
        'wiki:3\tplain text\t"Quoted ""Title"""',
    ]
    passages = read(write_lines(tmp_path / "psgs.tsv", lines))
    assert passages == [
        Passage("1", "Aaron", 'Aaron ( or ; "Ahärôn") is a prophet'),
        Passage("2", "Long row", long_text),  # rows are passages already: not re-split
        Passage("wiki:3", 'Quoted "Title"', "plain text"),
    ]


def test_folder_reader_recursive_and_sorted(tmp_path):
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_text("bee text")
    (root / "sub" / "a note.md").write_text("# Heading\n\nmarkdown body")
    (root / "A.md").write_text("capital")
    (root / "skip.csv").write_text("not,a,document")
    passages = read(root)
    assert [(p.id, p.title, p.text) for p in passages] == [
        ("A.md-0", "A", "capital"),
        ("b.txt-0", "b", "bee text"),
        ("sub/a note.md-0", "a note", "# Heading markdown body"),
    ]


def test_format_detection(tmp_path):
    (tmp_path / "f").mkdir()
    cases = {"x.jsonl": "jsonl", "x.jsonl.gz": "jsonl", "x.tsv": "dpr-tsv", "f": "folder"}
    for name, fmt in cases.items():
        assert resolve_format(CorpusConfig(source=str(tmp_path / name))) == fmt
    assert resolve_format(CorpusConfig(source="builtin:wiki-summaries")) == "builtin"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        resolve_format(CorpusConfig(source=str(tmp_path / "nope.bin")))


def test_builtin_wiki_summaries():
    from rag.resources import wiki_summaries_path

    raw = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    report = ReadReport()
    passages = list(iter_passages(CorpusConfig(), report))
    assert len(raw) == 10_033 and report.documents == 10_033 and report.skipped == 0
    assert len(passages) == sum(math.ceil(len(v["extract"].split()) / 100) for v in raw.values())
    assert len({p.id for p in passages}) == len(passages)
    angola = [p for p in passages if p.title == "Angola"]
    assert angola and angola[0].text.startswith("Angola, officially the Republic of Angola")
    assert " ".join(p.text for p in angola).split() == raw["Angola"]["extract"].split()


# ------------------------------------------------------------------------------------- bad input

BIG = "word " * 2_100_000  # 10.5 MB: over the default max_document_bytes


def assert_names(error: pytest.ExceptionInfo, path: Path, line: int | None, field: str) -> None:
    message = str(error.value)
    assert path.name in message and f"'{field}'" in message, message
    if line is not None:
        assert f"{path.name}:{line}:" in message, message
    assert error.value.field == field and error.value.line == line


GOOD = jrec(title="Good", text="fine words")
JSONL_BAD = {
    "malformed json": ('{"title": "T", "text": "unterminated', "(json)"),
    "missing text": (jrec(title="T"), "text"),
    "text not a string": (jrec(title="T", text=5), "text"),
    "missing title": (jrec(text="body"), "title"),
    "not utf-8": (b'{"title": "T", "text": "caf\xe9 au lait"}', "text"),
    "not utf-8 title": (b'{"title": "\xff", "text": "ok"}', "title"),
    "not utf-8 in an unused field": (b'{"title": "T", "text": "ok", "meta": "\xfe"}', "meta"),
    "lone surrogate escape": (jrec(title="T", text="a \ud800 b"), "text"),
    "empty document": (jrec(title="T", text=" \n\t "), "text"),
    "10 MB document": (jrec(title="T", text=BIG), "text"),
    "not an object": ("[1, 2]", "(record)"),
    "bad id type": (jrec(id=[1], title="T", text="x"), "id"),
}


@pytest.mark.parametrize("case", sorted(JSONL_BAD))
def test_jsonl_bad_record_names_file_line_field(tmp_path, case):
    bad, field = JSONL_BAD[case]
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(CorpusError) as error:
        read(path)
    assert_names(error, path, 3, field)
    report = ReadReport()
    kept = list(iter_passages(CorpusConfig(source=str(path), skip_bad_records=True), report))
    assert report.skipped == 1 and len(kept) == 3 and "bad.jsonl:3:" in report.examples[0]


def test_jsonl_duplicate_id(tmp_path):
    path = write_lines(
        tmp_path / "dup.jsonl", [jrec(id="a", title="T", text="x"), "", jrec(id="a", title="U", text="y")]
    )
    with pytest.raises(CorpusError) as error:
        read(path)
    assert_names(error, path, 3, "id")


def test_skip_mode_counts_every_bad_record(tmp_path):
    bads = [JSONL_BAD[k][0] for k in ("malformed json", "missing text", "not utf-8", "empty document")]
    lines = [GOOD, bads[0], GOOD, bads[1], bads[2], GOOD, bads[3]]
    path = write_lines(tmp_path / "mixed.jsonl", lines)
    report = ReadReport()
    kept = list(iter_passages(CorpusConfig(source=str(path), skip_bad_records=True), report))
    assert len(kept) == 3 and report.skipped == 4 and report.documents == 3
    assert [e.split(": field")[0].rsplit(":", 1)[1] for e in report.examples] == ["2", "4", "5", "7"]
    assert "4 bad records skipped" in report.summary()


TSV_BAD = {
    "two columns": ("5\tonly text", "(row)"),
    "four columns": ("5\ttext\ttitle\textra", "(row)"),
    "not utf-8": (b"5\tna\xefve text\tTitle", "text"),
    "empty text": ("5\t \tTitle", "text"),
    "empty id": ("\tsome text\tTitle", "id"),
    "10 MB row": (f"5\t{BIG}\tTitle", "text"),
}


@pytest.mark.parametrize("case", sorted(TSV_BAD))
def test_dpr_tsv_bad_row_names_file_line_field(tmp_path, case):
    bad, field = TSV_BAD[case]
    path = write_lines(tmp_path / "bad.tsv", ["id\ttext\ttitle", "1\tgood text\tT", bad, "2\tmore\tU"])
    with pytest.raises(CorpusError) as error:
        read(path)
    assert_names(error, path, 3, field)
    report = ReadReport()
    kept = list(iter_passages(CorpusConfig(source=str(path), skip_bad_records=True), report))
    assert report.skipped == 1 and [p.id for p in kept] == ["1", "2"]


FOLDER_BAD = {
    "not utf-8 on line 3": (b"line one\nline two\nbad \x80 byte\n", 3),
    "empty document": (b"  \n\n ", 1),
    "10 MB document": (b"x " * 5_000_001, 1),
}


@pytest.mark.parametrize("case", sorted(FOLDER_BAD))
def test_folder_bad_file_names_file_line_field(tmp_path, case):
    content, line = FOLDER_BAD[case]
    root = tmp_path / "docs"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("good one")
    (root / "sub" / "bad.md").write_bytes(content)
    (root / "z.md").write_text("good two")
    with pytest.raises(CorpusError) as error:
        read(root)
    assert_names(error, root / "sub" / "bad.md", line, "text")
    report = ReadReport()
    kept = list(iter_passages(CorpusConfig(source=str(root), skip_bad_records=True), report))
    assert [p.title for p in kept] == ["a", "z"] and report.skipped == 1


def test_builtin_bad_entries_name_entry_and_field(tmp_path, monkeypatch):
    import rag.resources

    path = tmp_path / "summaries.json"
    entries = {
        "Good": {"title": "Good", "extract": "fine words"},
        "NoExtract": {"title": "NoExtract", "description": "d"},
        "Empty": {"title": "Empty", "extract": "   "},
        "Also good": {"title": "Also good", "extract": "more words"},
    }
    path.write_text(json.dumps(entries), encoding="utf-8")
    monkeypatch.setattr(rag.resources, "wiki_summaries_path", lambda: path)
    with pytest.raises(CorpusError, match=r"summaries.json \[entry 'NoExtract'\]: field 'extract'"):
        list(iter_passages(CorpusConfig()))
    report = ReadReport()
    kept = list(iter_passages(CorpusConfig(skip_bad_records=True), report))
    assert [p.title for p in kept] == ["Good", "Also good"] and report.skipped == 2
    assert "'Empty'" in report.examples[1] and "empty document" in report.examples[1]


def test_missing_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.jsonl"):
        read(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="builtin:nothing"):
        list(iter_passages(CorpusConfig(source="builtin:nothing")))


# ---------------------------------------------------------------------------------------- store


def random_passages(n: int, seed: int = 0) -> list[Passage]:
    rng = random.Random(seed)
    alphabet = ["alpha", "béta", "γάμμα", "数据", "d", "\U0001f600"]
    return [
        Passage(f"p{i}", f"Title {rng.randint(0, 50)}", " ".join(rng.choices(alphabet, k=rng.randint(1, 12))))
        for i in range(n)
    ]


def test_store_round_trip_and_random_access(tmp_path):
    passages = random_passages(2 * BATCH_ROWS + 5)  # spans three record batches
    path = tmp_path / "store.arrow"
    assert write_passage_store(iter(passages), path) == len(passages)
    store = PassageStore.open(path)
    assert len(store) == len(passages)
    rng = np.random.default_rng(1)
    for row in [0, BATCH_ROWS - 1, BATCH_ROWS, 2 * BATCH_ROWS + 4, *rng.integers(0, len(passages), 50)]:
        assert store[int(row)] == passages[row]
    rows = np.array([len(passages) - 1, 3, BATCH_ROWS + 2, 3])
    assert store.get(rows) == [passages[r] for r in rows]
    assert store.get([]) == []
    assert store.ids()[BATCH_ROWS].as_py() == f"p{BATCH_ROWS}"
    assert store.row_of(f"p{BATCH_ROWS + 7}") == BATCH_ROWS + 7
    with pytest.raises(KeyError):
        store.row_of("nope")
    for bad in (len(passages), -1):
        with pytest.raises(IndexError):
            store[bad]
        with pytest.raises(IndexError):
            store.get([0, bad])


def test_store_is_memory_mapped(tmp_path):
    path = tmp_path / "big.arrow"
    write_passage_store((Passage(str(i), "T", "x" * 1000) for i in range(20_000)), path)  # 20 MB
    before = pa.total_allocated_bytes()
    store = PassageStore.open(path)
    assert store[19_999].id == "19999"
    assert pa.total_allocated_bytes() - before < 1_000_000  # nothing copied into Arrow's heap


def test_empty_store(tmp_path):
    assert write_passage_store([], tmp_path / "e.arrow") == 0
    assert len(PassageStore.open(tmp_path / "e.arrow")) == 0


def test_store_open_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.arrow"):
        PassageStore.open(tmp_path / "missing.arrow")
    (tmp_path / "junk.arrow").write_bytes(b"this is not arrow" * 10)
    with pytest.raises(CorpusError, match="junk.arrow"):
        PassageStore.open(tmp_path / "junk.arrow")


def test_bad_record_mid_stream_leaves_nothing_half_written(tmp_path):
    good = [
        jrec(title=f"T{i}", text=f"words {i}") for i in range(BATCH_ROWS + 100)
    ]  # a batch is flushed first
    source = write_lines(tmp_path / "docs.jsonl", [*good, '{"title": "broken"', *good[:10]])
    path = tmp_path / "out" / "passages.arrow"
    with pytest.raises(CorpusError, match=f"docs.jsonl:{len(good) + 1}:"):
        write_passage_store(iter_passages(CorpusConfig(source=str(source))), path)
    assert not path.parent.exists() or list(path.parent.iterdir()) == []
    # An older store at the same path survives a failed rewrite.
    write_passage_store(random_passages(3), path)
    with pytest.raises(CorpusError):
        write_passage_store(iter_passages(CorpusConfig(source=str(source))), path)
    assert PassageStore.open(path).get([0, 1, 2]) == random_passages(3)
    assert [p.name for p in path.parent.iterdir()] == ["passages.arrow"]


def test_builtin_corpus_store_round_trip(tmp_path):
    passages = list(iter_passages(CorpusConfig()))
    write_passage_store(passages, tmp_path / "wiki.arrow")
    store = PassageStore.open(tmp_path / "wiki.arrow")
    assert len(store) == len(passages)
    row = store.row_of(next(p.id for p in passages if p.title == "Angola"))
    assert store[row].title == "Angola" and store.get([row])[0] == passages[row]
