"""The shipped reader's training questions (recipes/reader-training-ids.txt) are disjoint from every
question an evaluation reports: results/evaluation.md's samples, results/reader.md's development cells,
the reserved fifths and the hot-swap questions."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "recipes")]

from reader import IDS_FILE  # noqa: E402
from reader_data import norm, sources  # noqa: E402
from run_results import sample  # noqa: E402

from rag.hotswap import hotswap_facts  # noqa: E402
from rag.tasks import read_task, split_reserved  # noqa: E402


@pytest.fixture(scope="module")
def trained(shared_data):
    """source -> {id: normalised question} of every example the recipe's mix takes."""
    ids: dict[str, set[str]] = {}
    for line in IDS_FILE.read_text(encoding="utf-8").split():
        source, _, key = line.partition(":")
        ids.setdefault(source, set()).add(key)
    out: dict[str, dict[str, str]] = {}
    for name, examples in sources(shared_data).items():
        out[name] = {e.id: norm(e.input) for e in examples if e.id in ids.get(name, ())}
        assert len(out[name]) == len(ids.get(name, ())), f"{name}: an id of {IDS_FILE.name} is not in the data"
    return out


def test_training_ids_file_is_the_mix(trained):
    from reader import MIX

    assert {name: len(v) for name, v in trained.items()} == MIX


def test_no_training_question_is_reserved_or_evaluated(trained, shared_data):
    questions = {q for by_id in trained.values() for q in by_id.values()}
    nq = read_task("nq-gold", shared_data / "nq_open_gold_passages" / "nq-open-oracle.jsonl.gz")
    squad = read_task("squad-open", shared_data / "squad_v1.1_dev")
    for examples in (nq, squad):
        reserved = {norm(e.input) for e in split_reserved(examples, "reserved")}
        assert not questions & reserved
        dev = split_reserved(examples, "dev")
        evaluated = {norm(e.input) for e in sample(dev, 100) + sample(dev, 1000)}  # both results files' samples
        assert not questions & evaluated
    hotswap = {norm(f.question) for relation in ("capitals", "city-country") for f in hotswap_facts(relation)}
    assert not questions & hotswap
    # the reserved positions themselves, by id, for the two reserved sets the mix draws on
    reserved_ids = {e.id for e in split_reserved(nq, "reserved")}
    assert not set(trained["nq-gold"]) & reserved_ids
    assert not set(trained["squad"]) & {e.id for e in split_reserved(squad, "reserved")}


@pytest.mark.slow
def test_no_training_question_is_in_the_wiki_cells(trained, shared_data):
    from run_results import question_sets

    from rag.knowledge import default_knowledge_base

    wiki = question_sets(shared_data, default_knowledge_base())["wiki"]
    evaluated = {norm(e.input) for e in sample(wiki, 100) + sample(wiki, 1000) + sample(wiki, 1000, seed=1)}
    questions = {q for by_id in trained.values() for q in by_id.values()}
    assert not questions & evaluated
