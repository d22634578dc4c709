"""One rule for q(x) (rag.knowledge.query_encoder_config), one --index convention for every command.

Defects this pins (each reproduced on abb17d6):
- `rag ask --index KB` on a knowledge base built with another encoder used the default MiniLM as q(x);
- `rag eval` chose q(x)'s scale by comparing path strings (a copy of the default encoder got scale 1);
- `rag train` defaulted to scale 20 even for DPR encoders;
- `rag search` needed a knowledge base folder while `rag ask` defaulted to the built-in one.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace

import pytest
from tiny_encoders import tiny_bert_dir, tiny_dpr_dir, tiny_sentence_transformers_dir, write_corpus
from tiny_generators import tiny_generator

from rag.answering import rag_model_config
from rag.cli import build_parser, main
from rag.cli.model_options import INDEX_HELP
from rag.config import (
    DEFAULT_QUERY_SCALE,
    CorpusConfig,
    EncoderConfig,
    GeneratorConfig,
    IndexConfig,
    RagConfig,
)
from rag.knowledge import build_knowledge_base, query_encoder_config, read_knowledge_meta
from rag.model import RagModel


def _kb(tmp_path, name, encoder, **query) -> str:
    write_corpus(tmp_path / "docs.jsonl", docs=8, seed=2)
    corpus = CorpusConfig(source=str(tmp_path / "docs.jsonl"), words_per_passage=20)
    build_knowledge_base(corpus, EncoderConfig(path=str(encoder), batch_size=4), IndexConfig(), tmp_path / name,
                         progress=False, **query)  # fmt: skip
    return str(tmp_path / name)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return {
        "normalised": tiny_sentence_transformers_dir(root / "st", seed=3),  # cosine scores
        "plain": tiny_bert_dir(root / "bert", seed=4),  # inner product, no normalisation
        "dpr-context": tiny_dpr_dir(root / "ctx", side="context", seed=5),
        "dpr-question": tiny_dpr_dir(root / "question", side="question", seed=6),
    }


def test_the_knowledge_base_records_its_q_and_every_command_reads_it(tmp_path, encoders):
    kb = _kb(tmp_path, "kb", encoders["normalised"])
    recorded = read_knowledge_meta(kb)["query_encoder"]
    assert recorded["path"] == str(encoders["normalised"]) and recorded["scale"] == DEFAULT_QUERY_SCALE
    assert query_encoder_config(kb) == EncoderConfig(path=str(encoders["normalised"]), scale=DEFAULT_QUERY_SCALE)
    # rag ask / rag serve: the model config leaves q(x) to the rule (before: the default MiniLM)
    config = rag_model_config(index_dir=kb)
    assert config.query_encoder is None and config.index_dir == kb and RagConfig().query_encoder is None
    gen = tiny_generator("bart")
    gen.model.save_pretrained(tmp_path / "gen")
    gen.tokenizer.save_pretrained(tmp_path / "gen")
    model = RagModel.from_config(replace(config, generator=GeneratorConfig(path=str(tmp_path / "gen"))))
    # the knowledge base's own 32-dimensional q(x), scaled as recorded (MiniLM would not even fit: 384)
    assert (model.query_encoder.dim, model.query_encoder.scale) == (32, DEFAULT_QUERY_SCALE)
    with_flags = rag_model_config(index_dir=kb, query_scale=3.0)
    assert with_flags.query_encoder == EncoderConfig(path=str(encoders["normalised"]), scale=3.0)


def test_the_scale_follows_the_encoder_not_its_path(tmp_path, encoders):
    # a copy of a normalised encoder at another path: still scale 20 (rag eval compared path strings)
    copy = tmp_path / "copy-of-encoder"
    shutil.copytree(encoders["normalised"], copy)
    assert query_encoder_config(_kb(tmp_path, "kb-copy", copy)).scale == DEFAULT_QUERY_SCALE
    # an inner-product encoder: scale 1 (rag train defaulted to 20)
    assert query_encoder_config(_kb(tmp_path, "kb-plain", encoders["plain"])).scale == 1.0


def test_dpr_needs_its_question_encoder_and_gets_scale_one(tmp_path, encoders):
    no_q = _kb(tmp_path, "kb-ctx", encoders["dpr-context"])
    assert read_knowledge_meta(no_q)["query_encoder"] is None
    with pytest.raises(ValueError, match="DPR context encoder .* --query-encoder"):
        query_encoder_config(no_q)
    assert query_encoder_config(no_q, str(encoders["dpr-question"])).scale == 1.0
    with_q = _kb(tmp_path, "kb-dpr", encoders["dpr-context"], query_encoder=str(encoders["dpr-question"]))
    assert query_encoder_config(with_q) == EncoderConfig(path=str(encoders["dpr-question"]), scale=1.0)
    # rag train reads the same rule: scale 1 for the DPR pair (before: 20 whatever the encoder)
    from rag.cli.train import rag_config

    args = build_parser().parse_args(["train", "--train", "t.jsonl", "--out", "o", "--index", with_q])
    assert rag_config(args).query_encoder == EncoderConfig(path=str(encoders["dpr-question"]), scale=1.0)


def test_a_knowledge_base_from_before_the_rule_gets_the_same_q(tmp_path, encoders):
    kb = _kb(tmp_path, "kb", encoders["normalised"])
    meta = read_knowledge_meta(kb)
    del meta["query_encoder"]  # as rag index build wrote it before
    assert query_encoder_config(meta) == query_encoder_config(kb)


def _subparsers(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name), sub
                yield from _subparsers(sub, (*prefix, name))


def test_index_means_a_knowledge_base_with_the_same_default_on_every_command():
    commands = {}
    for name, sub in _subparsers(build_parser()):
        options = {o: a for a in sub._actions for o in a.option_strings}
        if "--index" in options:
            commands[name] = options["--index"]
    assert {("ask",), ("serve",), ("search",), ("eval",), ("train",), ("index", "info"), ("index", "hybrid")} <= set(commands)
    for name, action in commands.items():
        assert (action.default, action.help) == ("", INDEX_HELP), name
    # building writes a knowledge base: --out; the index type is --index-type
    build = dict(_subparsers(build_parser()))[("index", "build")]
    assert "--index" not in {o for a in build._actions for o in a.option_strings}
    search = build_parser().parse_args(["search", "what is the capital of angola?"])
    assert search.index == ""  # the default knowledge base, as rag ask


def test_search_tells_an_old_style_knowledge_base_argument_from_a_query(tmp_path, encoders, capsys):
    kb = _kb(tmp_path, "kb", encoders["normalised"])
    assert main(["search", kb, "what is the capital?"]) == 2
    assert f"give it as --index {kb}" in capsys.readouterr().err
    assert main(["search", "--index", kb, "capital of angola", "-k", "2", "--json"]) == 0
    assert main(["search", "--index", kb, "  "]) == 2
    assert "query 1 is empty" in capsys.readouterr().err
