"""Number flags that check their range while the command line is parsed, before any work.

Every number option of `rag` takes its `type=` from here (tests/test_cli_numbers.py fails on a bare
`type=int` or `type=float`), so `--batch-size 0`, `--lr -1` or `--steps nan` is argparse's usage error
naming the flag, never a ZeroDivisionError later or a silent default.
"""

from __future__ import annotations

import argparse
import math

from rag.config import Range


class Bounded:
    """An argparse `type`: the text as an int (or a finite float) within `range`."""

    def __init__(self, kind: type, range: Range) -> None:  # noqa: A002  (the Range's name)
        self.kind = kind
        self.range = range
        self.__name__ = "integer" if kind is int else "number"  # argparse's "invalid integer value" wording

    def __call__(self, text: str) -> int | float:
        try:
            value = self.kind(text.strip())
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {'an integer' if self.kind is int else 'a number'}, "
                                             f"got {text!r}") from None  # fmt: skip
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if not self.range.allows(value):
            raise argparse.ArgumentTypeError(f"must be {self.range}, got {text}")
        return value

    def __repr__(self) -> str:
        return f"{self.__name__} {self.range}"


def integer(min: int | None = None, max: int | None = None) -> Bounded:  # noqa: A002
    return Bounded(int, Range(min=min, max=max))


def number(min: float | None = None, max: float | None = None, gt: float | None = None,
           lt: float | None = None) -> Bounded:  # noqa: A002  # fmt: skip
    return Bounded(float, Range(min=min, max=max, gt=gt, lt=lt))


COUNT = integer(min=1)  # k, beams, batch sizes, steps: at least one
OPTIONAL_COUNT = integer(min=0)  # 0 means "none" or "default" (documented per flag)
POSITIVE = number(gt=0)
NON_NEGATIVE = number(min=0)
