"""Counterfactual passages for training a reader that follows its evidence (knowledge conflicts).

Entity-Based Knowledge Conflicts in Question Answering (Longpre et al., 2021): a reader trained only on
passages that agree with what it memorised in pre-training learns it may ignore them. Training on some
examples whose retrieved passages state another answer of the same type, with that answer as the
target, makes it read. Here, for a training example with answer aliases a_1..a_m, a substitute s is
drawn from the other training answers of the same type (`answer_type`); every occurrence of every
alias in the titles and texts of the k retrieved passages is replaced by s (whole words, any case),
and the target becomes s. If no retrieved passage names the answer, the example stays factual: a
target the passages do not state would teach the generator to guess instead.

The type is a coarse stand-in for the named-entity type Longpre et al. use: the answer's shape
(a year, a date, a number) and otherwise the question's wh-word (who: a person, where: a place, ...).
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_YEAR = re.compile(r"^(1[0-9]|20)\d\d$")
_MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september",
           "october", "november", "december")  # fmt: skip
_NUMBER = re.compile(r"^[\d,.]+(\s+\w+)?$")
_NUMBER_WORDS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                 "twelve", "hundred", "thousand", "million", "billion"}  # fmt: skip
_WH = (("how many", "number"), ("how much", "number"), ("how long", "number"), ("how old", "number"),
       ("what year", "year"), ("which year", "year"), ("when", "date"), ("who", "person"),
       ("whom", "person"), ("whose", "person"), ("where", "place"), ("which country", "place"),
       ("what country", "place"), ("which city", "place"), ("what city", "place"))  # fmt: skip


def answer_type(question: str, answer: str) -> str:
    """A coarse type: year, date or number by the answer's shape; else from the question's wh-word."""
    text = answer.strip().lower()
    if _YEAR.match(text):
        return "year"
    words = text.replace(",", " ").split()
    if any(month in words for month in _MONTHS) and any(w.isdigit() for w in words):
        return "date"
    if _NUMBER.match(text) or (words and words[0] in _NUMBER_WORDS):
        return "number"
    q = question.strip().lower()
    for cue, kind in _WH:
        if cue in q:
            return kind if kind not in ("year", "date", "number") else "entity"
    return "entity"


@dataclass(frozen=True)
class Substitution:
    """Replace every alias of the true answer by `replacement` in the passages; the target becomes it."""

    aliases: tuple[str, ...]
    replacement: str


def _alias_pattern(aliases: Iterable[str]) -> re.Pattern[str] | None:
    names = sorted({a.strip() for a in aliases if len(a.strip()) >= 2}, key=len, reverse=True)
    if not names:
        return None
    return re.compile(r"(?<!\w)(?:" + "|".join(re.escape(n) for n in names) + r")(?!\w)", re.IGNORECASE)


def substitute_passages(passages: Sequence[tuple[str, str]], substitution: Substitution
                        ) -> tuple[list[tuple[str, str]], bool]:  # fmt: skip
    """(title, text) pairs with every alias replaced; and whether any passage changed."""
    pattern = _alias_pattern(substitution.aliases)
    if pattern is None:
        return list(passages), False
    out = [(pattern.sub(substitution.replacement, t), pattern.sub(substitution.replacement, x)) for t, x in passages]
    return out, out != list(passages)


class SubstitutePool:
    """Draws same-type substitutes from a set of (question, answer) pairs, e.g. the training answers."""

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        by_type: dict[str, set[str]] = defaultdict(set)
        for question, answer in pairs:
            if answer.strip():
                by_type[answer_type(question, answer)].add(answer.strip())
        self.by_type = {kind: sorted(answers) for kind, answers in by_type.items()}

    def draw(self, question: str, aliases: Sequence[str], rng: random.Random) -> Substitution | None:
        """A substitute of the type of aliases[0] that is none of the aliases (None if the type has none)."""
        if not aliases:
            return None
        candidates = self.by_type.get(answer_type(question, aliases[0]), [])
        taken = {a.strip().lower() for a in aliases}
        for _ in range(8):  # a few tries: the pool rarely holds an alias of this very answer
            if not candidates:
                return None
            pick = candidates[rng.randrange(len(candidates))]
            if pick.lower() not in taken and not any(pick.lower() in a or a in pick.lower() for a in taken):
                return Substitution(tuple(aliases), pick)
        return None
