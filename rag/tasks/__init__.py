"""The paper's tasks: one `Example` type and one reader per published format, behind `read_task`.

    examples.py  Example, LabelSet (FEVER, SciFact, Climate-FEVER), the reserved-split rule         (imports nothing of rag)
    records.py   record sources, field helpers, TaskFormatError, SkipReport (imports examples)
    readers.py   one reader per format, READERS and read_task               (imports both)

Imports point one way (examples <- records <- readers <- this file), and every public name is here:
`from rag.tasks import Example, read_task, read_fever`.
"""

from __future__ import annotations

from rag.tasks.examples import (
    CLIMATE_FEVER_2WAY,
    CLIMATE_FEVER_3WAY,
    FEVER_2WAY,
    FEVER_3WAY,
    FEVER_ALL_LABELS,
    RED_TRIVIA_GENERAL_LISTS,
    SCIFACT_2WAY,
    SCIFACT_3WAY,
    Example,
    LabelSet,
    Provenance,
    is_reserved,
    split_reserved,
)
from rag.tasks.readers import (
    CLASSIFICATION_LABELS,
    READERS,
    read_climate_fever,
    read_curatedtrec,
    read_dpr_qa,
    read_fever,
    read_jeopardy,
    read_kilt,
    read_msmarco,
    read_nq_gold,
    read_open_qa,
    read_qa_jsonl,
    read_red_trivia,
    read_scifact,
    read_squad_open,
    read_task,
)
from rag.tasks.records import SkipReport, TaskFormatError

__all__ = [
    "CLASSIFICATION_LABELS",
    "CLIMATE_FEVER_2WAY",
    "CLIMATE_FEVER_3WAY",
    "FEVER_2WAY",
    "FEVER_3WAY",
    "FEVER_ALL_LABELS",
    "READERS",
    "RED_TRIVIA_GENERAL_LISTS",
    "SCIFACT_2WAY",
    "SCIFACT_3WAY",
    "Example",
    "LabelSet",
    "Provenance",
    "SkipReport",
    "TaskFormatError",
    "is_reserved",
    "read_climate_fever",
    "read_curatedtrec",
    "read_dpr_qa",
    "read_fever",
    "read_jeopardy",
    "read_kilt",
    "read_msmarco",
    "read_nq_gold",
    "read_open_qa",
    "read_qa_jsonl",
    "read_red_trivia",
    "read_scifact",
    "read_squad_open",
    "read_task",
    "split_reserved",
]
