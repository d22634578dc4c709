"""The generator p_theta(y_i | x, z, y_<i): seq2seq (BART, T5) and decoder-only LMs behind one interface.

The INTERFACE CONTRACT (rows, methods, refinements) is the docstring of rag/generators/base.py.
Modules: base (contract, value types, cache helpers, shared Generator), seq2seq, causal, loading.
"""

from __future__ import annotations

from rag.generators.base import (
    DecodeState,
    Generator,
    GeneratorInputs,
    Prefix,
    TargetBatch,
    _cache_of,
    _copy_cache,
    _is_identity,
    _logsoftmax,
)
from rag.generators.causal import (
    CAUSAL_SYSTEM_PROMPT,
    CLOSED_BOOK_SYSTEM_PROMPT,
    SHORT_ANSWER_EXAMPLES,
    CausalGenerator,
)
from rag.generators.loading import convert_gguf, converted_gguf_dir, load_generator
from rag.generators.seq2seq import Seq2SeqGenerator

__all__ = [
    "SHORT_ANSWER_EXAMPLES",
    "CAUSAL_SYSTEM_PROMPT",
    "CLOSED_BOOK_SYSTEM_PROMPT",
    "CausalGenerator",
    "DecodeState",
    "Generator",
    "GeneratorInputs",
    "Prefix",
    "Seq2SeqGenerator",
    "TargetBatch",
    "_cache_of",
    "_copy_cache",
    "_is_identity",
    "_logsoftmax",
    "convert_gguf",
    "converted_gguf_dir",
    "load_generator",
]
