"""The one example type of every task, training and evaluation alike, and what the tasks share about it:
the FEVER label sets, the Red-Trivia general-knowledge lists and the reserved-split rule."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Provenance:
    """One page (or passage) of evidence; KILT names pages by wikipedia_id, FEVER and NQ by title."""

    title: str | None = None
    wikipedia_id: str | None = None
    passage_id: str | None = None


@dataclass(frozen=True)
class Example:
    """One (input, output) pair of a task: what `rag eval` scores and `rag train` learns from."""

    id: str
    input: str  # what the retriever and generator see: question, answer entity, claim
    targets: tuple[str, ...]  # what the generator is trained to produce (empty for regex answers)
    answers: tuple[str, ...]  # what the metric compares against (regular expressions if answer_is_regex)
    position: int  # 0-based position of the record in its file (the reserved-split rule uses it)
    label: str | None = None  # the dataset's class label (FEVER)
    provenance: tuple[tuple[Provenance, ...], ...] | None = None  # evidence sets: one per gold output
    answer_is_regex: bool = False
    subset: str | None = None  # Red-Trivia list name

    @classmethod
    def pair(cls, input: str, target: str, answers: Sequence[str] = (), *, id: str = "",
             position: int = 0) -> Example:  # fmt: skip
        """A training pair: `target` is what the generator learns; `answers` (default: the target) what
        exact match and recall accept."""
        return cls(id=id or str(position), input=input, targets=(target,), answers=tuple(answers) or (target,),
                   position=position)  # fmt: skip

    @property
    def target(self) -> str:
        """The string training teaches: the first target (regex-answer examples have none)."""
        if not self.targets:
            raise ValueError(f"example {self.id!r} (position {self.position}) has no target string to train on "
                             "(its answers are regular expressions)")  # fmt: skip
        return self.targets[0]


# The Red-Trivia lists of general knowledge. The game, show and flag/map-picture lists are left out of
# the experiments: their answers occur in Wikipedia summaries mostly by accident (a Pokemon named after
# a common word), which makes "the answer is in a passage" a poor test of retrieval.
RED_TRIVIA_GENERAL_LISTS = ("general", "artandliterature", "entertainment", "worldcapitals", "uscapitals",
                            "greekmyth", "elements", "sports", "computers", "2015", "2016")  # fmt: skip


@dataclass(frozen=True)
class LabelSet:
    """A classification task as generation: each label maps to a one-token target string."""

    labels: tuple[str, ...]
    targets: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "labels", tuple(self.labels))  # JSON gives lists
        object.__setattr__(self, "targets", tuple(self.targets))
        if len(self.labels) != len(self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"LabelSet: one distinct target per label, got {self.labels} -> {self.targets}")

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
# SciFact (Wadden et al. 2020) and Climate-FEVER (Diggelmann et al. 2020) name the same three classes
# their own way; the one-token targets are FEVER's. Climate-FEVER's fourth label, DISPUTED (evidence
# both ways), has no target: its claims are left out, as in the 3-way task.
SCIFACT_3WAY = LabelSet(("SUPPORT", "CONTRADICT", "NOT ENOUGH INFO"), FEVER_3WAY.targets)
SCIFACT_2WAY = LabelSet(("SUPPORT", "CONTRADICT"), FEVER_2WAY.targets)
CLIMATE_FEVER_3WAY = LabelSet(("SUPPORTS", "REFUTES", "NOT_ENOUGH_INFO"), FEVER_3WAY.targets)
CLIMATE_FEVER_2WAY = LabelSet(("SUPPORTS", "REFUTES"), FEVER_2WAY.targets)
CLIMATE_FEVER_ALL_LABELS = (*CLIMATE_FEVER_3WAY.labels, "DISPUTED")


def is_reserved(position: int) -> bool:
    """../shared/data/README.md: in a "reserved" set, positions with i % 5 == 4 are the held-out test split."""
    return position % 5 == 4


def split_reserved(examples: Iterable[Example], part: Literal["dev", "reserved"]) -> list[Example]:
    """The development four fifths, or the reserved fifth (final figures only), by file position."""
    want = part == "reserved"
    return [ex for ex in examples if is_reserved(ex.position) == want]
