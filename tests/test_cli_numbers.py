"""Every number option of the command line, and every number field of a config, is checked before any
work: property tests (hypothesis) over all of them, and the reproduced defects.

Defects this pins (abb17d6): `rag ask -k 0` answered with k = 5; `--max-length 0`, `--lr -1` and
`--steps 0` were accepted (with --steps 0 the output named a checkpoint that does not exist);
`--batch-size 0` gave a ZeroDivisionError.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rag import config as C
from rag.cli import build_parser, main
from rag.cli.numbers import Bounded


def _number_options() -> list[tuple[str, argparse.Action]]:
    found = []

    def walk(parser: argparse.ArgumentParser, prefix: str) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{prefix} {name}".strip())
            elif action.type in (int, float) or isinstance(action.type, Bounded):
                found.append((f"{prefix} {'/'.join(action.option_strings) or action.dest}", action))

    walk(build_parser(), "")
    return found


NUMBER_OPTIONS = _number_options()


def test_every_number_option_checks_its_range_while_parsing():
    assert len(NUMBER_OPTIONS) > 40
    bare = [name for name, action in NUMBER_OPTIONS if not isinstance(action.type, Bounded)]
    assert bare == []  # a bare type=int/float would let 0, -1, nan through to the work
    # every default is itself allowed (None: "not given")
    for name, action in NUMBER_OPTIONS:
        defaults = action.default if isinstance(action.default, list) else [action.default]
        assert all(d is None or action.type.range.allows(d) for d in defaults), name


_texts = st.one_of(
    st.integers(-(10**30), 10**30).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "-1", "1", "1e309", "-0", "0.5", "nan", "inf", " 3 ", "1_000", "0x10", ""]),
    st.text(max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(data=st.data(), text=_texts)
def test_a_number_option_accepts_exactly_its_range(data, text):
    name, action = data.draw(st.sampled_from(NUMBER_OPTIONS))
    bounded: Bounded = action.type
    try:
        value = bounded(text)
    except argparse.ArgumentTypeError as error:
        assert str(error)  # argparse prints it as "argument --flag: <this>"
        return
    assert isinstance(value, bounded.kind) and math.isfinite(value), (name, text)
    assert bounded.range.allows(value), (name, text, value)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["ask", "-k", "0", "q"], "-k"),  # was answered with k = 5
        (["search", "q", "-k", "-3"], "-k"),
        (["index", "build", "--out", "kb", "--max-length", "0"], "--max-length"),
        (["index", "build", "--out", "kb", "--batch-size", "0"], "--batch-size"),  # was a ZeroDivisionError
        (["train", "--train", "t", "--out", "o", "--lr", "-1"], "--lr"),
        (["train", "--train", "t", "--out", "o", "--steps", "0"], "--steps"),  # named a missing checkpoint
        (["train", "--train", "t", "--out", "o", "--label-smoothing", "1"], "--label-smoothing"),
        (["eval", "--out", "o", "--batch-size", "0"], "--batch-size"),
        (["eval", "--out", "o", "--beams", "nan"], "--beams"),
        (["serve", "--port", "70000"], "--port"),
    ],
)
def test_bad_numbers_are_usage_errors_naming_the_flag(argv, flag, capsys):
    assert main(argv) == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_cross_flag_rules_are_checked_before_any_work(tmp_path, capsys):
    # min > max: refused before the output folder is even made, let alone a model loaded
    out = tmp_path / "out"
    assert main(["eval", "--task", "nq-open", "--data", "x", "--out", str(out), "--min-new-tokens", "9",
                 "--max-new-tokens", "4"]) == 2  # fmt: skip
    assert "min_new_tokens (9) must be <= max_new_tokens (4)" in capsys.readouterr().err and not out.exists()


# ------------------------------------------------------------------------------------ the configs

CONFIGS = [c for c in vars(C).values() if isinstance(c, type) and issubclass(c, C.Validated) and c is not C.Validated]
RANGED = [(cls, name, rule) for cls in CONFIGS for name, rule in cls.RANGES.items()]


def test_every_config_class_is_validated():
    names = {c.__name__ for c in CONFIGS}
    assert {"CorpusConfig", "EncoderConfig", "IndexConfig", "GeneratorConfig", "DecodingConfig", "RagConfig",
            "TrainConfig", "EvalConfig", "RetrieverConfig", "FusionConfig", "BM25Config", "LoraSpec"} <= names


@settings(max_examples=300, deadline=None)
@given(data=st.data(), value=st.one_of(st.integers(-(10**12), 10**12), st.floats(allow_nan=True),
                                       st.booleans(), st.none(), st.text(max_size=3)))  # fmt: skip
def test_a_config_number_field_accepts_exactly_its_range(data, value):
    cls, name, rule = data.draw(st.sampled_from(RANGED))
    hint = C._hints(cls)[name]
    kwargs = {"path": "x"} if cls is C.GivenEmbeddings else {}
    if name == "recall_ks":
        value = (value,)
    try:
        made = cls(**kwargs, **{name: value})
    except C.ConfigError:
        return
    got = getattr(made, name)
    for v in got if isinstance(got, tuple) else (got,):
        if v is None:
            assert "None" in str(hint), (cls, name)
            continue
        assert not isinstance(v, bool) and isinstance(v, int | float) and math.isfinite(v), (cls, name, v)
        assert rule.allows(v), (cls, name, v)
    assert dataclasses.replace(made) == made
