"""Knowledge hot-swap: the fact selection and rewrite, the derived knowledge base (checked against a full
rebuild of the rewritten corpus), swap_index (shared modules, other passages), the 2x2 table, and
(slow) the built-in experiment with the default models on the packaged data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_evaluation import DOCS, _encoder_dir
from tiny_generators import tiny_bart

from rag.config import CorpusConfig, DecodingConfig, EncoderConfig, IndexConfig
from rag.hotswap import (
    ChangedFact,
    capital_facts,
    city_country_facts,
    derive_knowledge_base,
    hotswap_markdown,
    rewrite_summaries,
    rewrite_text,
    run_hotswap,
    swap_index,
)
from rag.knowledge import build_knowledge_base, open_knowledge_base
from rag.metrics import has_answer
from rag.model import RagModel
from rag.retriever import Retriever
from rag.tasks import Example

FACTS = [
    ChangedFact("angola", "what is the capital of angola ?", "luanda", "paris"),
    ChangedFact("france", "what is the capital of france ?", "paris", "luanda"),
]


def test_rewrite_permutes_names_in_one_pass_on_word_boundaries():
    facts = [ChangedFact("Kuwait", "q", "Kuwait City", "Doha"), ChangedFact("Qatar", "q", "Doha", "Kuwait City"),
             ChangedFact("Angola", "q", "Luanda", "Nairobi")]
    text = "Kuwait City is in Kuwait; Doha faces Kuwait City. Luandan is not Luanda."
    assert rewrite_text(text, facts) == "Doha is in Kuwait; Kuwait City faces Doha. Luandan is not Nairobi."


def test_city_country_facts_are_scoped_to_the_city_article():
    summaries = {
        "Adana": {"title": "Adana", "extract": "Adana is a major city in southern Turkey. It lies on the Seyhan."},
        "Aleppo": {"title": "Aleppo", "extract": "Aleppo is a city in Syria, far from Peru."},  # names its B already
        "Cusco": {"title": "Cusco", "extract": "Cusco is a city in southeastern Peru."},
        "Turkey": {"title": "Turkey", "extract": "Turkey is a country. Adana is in Turkey."},
        "Lyon": {"title": "Lyon", "extract": "Lyon is a city in France."},  # France is not a known country here
        "Cairo, Georgia": {"title": "Cairo, Georgia", "extract": "Cairo, Georgia is a city in Peru."},  # comma
    }
    facts = city_country_facts(summaries, ["Turkey", "Syria", "Peru"])
    assert [(f.subject, f.fact_a, f.fact_b, f.scope) for f in facts] == [("Adana", "Turkey", "Syria", "Adana"),
                                                                         ("Cusco", "Peru", "Turkey", "Cusco")]
    assert facts[0].question == "In which country is Adana?"


def test_derived_base_rewrites_a_scoped_fact_only_in_its_article(tmp_path):
    docs = [{"title": "Adana", "text": "Adana is a major city in southern Turkey."},
            {"title": "Turkey", "text": "Turkey is a country; Adana is one of its cities."}]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    encoder = EncoderConfig(path=str(_encoder_dir(tmp_path / "enc")))
    build_knowledge_base(CorpusConfig(source=str(corpus)), encoder, IndexConfig(), tmp_path / "a", progress=False)
    fact = ChangedFact("Adana", "In which country is Adana?", "Turkey", "Syria", scope="Adana")
    derived = open_knowledge_base(derive_knowledge_base(tmp_path / "a", [fact], tmp_path / "b"))
    texts = [p.text for p in derived.passages.get(np.arange(2))]
    assert texts == ["Adana is a major city in southern Syria.", "Turkey is a country; Adana is one of its cities."]


def test_capital_facts_pick_countries_whose_summary_names_the_capital():
    summaries = {
        "Angola": {"title": "Angola", "extract": "Angola is a country. The capital is Luanda."},
        "Luanda": {"title": "Luanda", "extract": "Luanda is the capital of Angola."},
        "Chad": {"title": "Chad", "extract": "Chad is a country. Its capital is N'Djamena."},
        "Peru": {"title": "Peru", "extract": "Peru is a country in South America."},  # capital not named
        "Mali": {"title": "Mali", "extract": "The capital of Mali is Bamako."},
        "Bamako": {"title": "Bamako", "extract": "Bamako is a city."},
        "Niger": {"title": "Niger", "extract": "Bamako trade reaches Niger."},  # a 2nd other mention of Bamako
    }
    questions = [Example(f"q{i}", f"What is the capital of {c}?", (a,), (a,), i)
                 for i, (c, a) in enumerate([("Angola", "Luanda"), ("Peru", "Lima"), ("Chad", "N'Djamena"),
                                             ("Mali", "Bamako"), ("Atlantis", "Poseidonia")])]
    facts = capital_facts(summaries, questions)
    assert [(f.subject, f.fact_a, f.fact_b) for f in facts] == [("Angola", "Luanda", "N'Djamena"),
                                                                  ("Chad", "N'Djamena", "Luanda")]
    changed = rewrite_summaries(summaries, facts)
    assert changed["Angola"]["extract"] == "Angola is a country. The capital is N'Djamena."
    assert changed["Luanda"] == {"title": "N'Djamena", "extract": "N'Djamena is the capital of Angola."}
    assert changed["Mali"] == summaries["Mali"]
    with pytest.raises(ValueError, match="at least 2"):
        capital_facts(summaries, questions[:1])


@pytest.fixture(scope="module")
def kbs(tmp_path_factory):
    """(index A, index B derived from A, index B rebuilt from scratch from the rewritten corpus)."""
    root = tmp_path_factory.mktemp("swap")
    encoder = EncoderConfig(path=str(_encoder_dir(root / "encoder")))
    for name, docs in (("a", DOCS), ("b-corpus", [(t, rewrite_text(x, FACTS)) for t, x in DOCS])):
        corpus = root / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps({"title": t, "text": x}) + "\n" for t, x in docs), encoding="utf-8")
        build_knowledge_base(CorpusConfig(source=str(corpus), format="jsonl"), encoder, IndexConfig(),
                             root / name, progress=False)
    derive_knowledge_base(root / "a", FACTS, root / "b")
    return root / "a", root / "b", root / "b-corpus"


def test_derived_knowledge_base_equals_a_rebuild_of_the_rewritten_passages(kbs):
    a, b, rebuilt = (open_knowledge_base(p) for p in kbs)
    rows = np.arange(len(a.passages))
    old, new, ref = a.passages.get(rows), b.passages.get(rows), rebuilt.passages.get(rows)
    assert [p.text for p in new] == [p.text for p in ref]
    assert [p.text for p in new][:2] == ["paris is the capital city of angola in africa",
                                         "luanda is the capital city of france in europe"]
    for before, after in zip(old, new, strict=True):
        assert after.id == (before.id if after.text == before.text else before.id + "~b")
    np.testing.assert_allclose(b.index.embeddings(rows), rebuilt.index.embeddings(rows), atol=1e-5)
    assert b.meta["changed_passages"] == 2


def test_swap_index_shares_the_modules_and_retrieves_from_the_other_base(kbs):
    a_dir, b_dir, _ = kbs
    gen = tiny_bart(seed=0)
    retriever = Retriever.open(a_dir)
    model = RagModel(retriever.query_encoder, retriever, gen, "token", 2)
    swapped = swap_index(model, b_dir)
    assert swapped is not model and swapped.generator is gen and swapped.query_encoder is model.query_encoder
    assert (swapped.kind, swapped.k) == ("token", 2)
    question = ["what is the capital of angola ?"]
    want = Retriever.open(b_dir, query_encoder=model.query_encoder).retrieve(question, 6)
    got = swapped.retriever.retrieve(question, 6)
    assert got.ids == want.ids and got.texts == want.texts
    assert any("paris is the capital city of angola" in t for t in got.texts[0])
    assert not any("paris is the capital city of angola" in t for t in model.retriever.retrieve(question, 6).texts[0])


def test_hotswap_table_counts_answers_that_name_each_fact(kbs):
    a_dir, b_dir, _ = kbs
    retriever = Retriever.open(a_dir)
    model = RagModel(retriever.query_encoder, retriever, tiny_bart(seed=1), "token", 2)
    result = run_hotswap(model, {"A": a_dir, "B": b_dir}, FACTS, DecodingConfig(num_beams=1, max_new_tokens=5))
    assert set(result.table) == {"A", "B", "none"}
    for name in ("A", "B", "none"):
        for which in ("A", "B"):
            names = [f.fact_a if which == "A" else f.fact_b for f in FACTS]
            hand = sum(has_answer([n], ans) for n, ans in zip(names, result.answers[name], strict=True)) / 2
            assert result.table[name][which] == hand
    assert "| A |" in hotswap_markdown(result) and "| B |" in hotswap_markdown(result)


@pytest.mark.slow
@torch.no_grad()
def test_answers_follow_the_plugged_in_index_with_the_default_models(tmp_path):
    from rag.config import RagConfig
    from rag.hotswap import hotswap_experiment
    from rag.knowledge import default_knowledge_base

    model = RagModel.from_config(RagConfig(k=5))
    result = hotswap_experiment(model, default_knowledge_base(), tmp_path, n_questions=20)
    assert len(result.facts) == 20
    # retrieval follows the plugged-in index: the top passage states that index's facts
    assert result.top_passage["A"]["A"] >= 0.8 and result.top_passage["B"]["B"] >= 0.8
    # and the answers move with it, without retraining (a 135M model also answers from its parameters
    # for famous capitals, so the swap moves part of the answers, not all)
    assert result.table["B"]["B"] > result.table["A"]["B"] and result.table["A"]["A"] > result.table["B"]["A"]


@pytest.mark.slow
@torch.no_grad()
def test_the_shipped_reader_answers_from_the_plugged_in_index(tmp_path):
    """Issue 9's promise: with the trained reader (every default of `rag ask`), swapping the index changes
    the answers: most answers state index B's capital under B, and hardly any state B's under A."""
    from rag.answering import rag_model_config
    from rag.hotswap import hotswap_experiment
    from rag.knowledge import default_knowledge_base

    model = RagModel.from_config(rag_model_config())
    assert model.generator.generator_config.deltas  # the reader's delta is merged
    result = hotswap_experiment(model, default_knowledge_base(), tmp_path, n_questions=20)
    assert result.table["B"]["B"] > 0.5 and result.table["A"]["A"] > 0.5  # most answers follow the index in use
    assert result.table["A"]["B"] <= 0.1  # under A, B's facts are (nearly) never stated
