"""The trained reader shipped with the package: LoRA deltas (rag.lora) for the default generator and q(x).

An untrained 135M generator retrieves well and reads badly (issue 9: 16% exact match over gold passages
that hold the answer 99% of the time). The reader is SmolLM2-135M-Instruct and all-MiniLM-L6-v2's q(x)
fine-tuned end to end with the RAG loss (rag.training, d(z) and the index frozen), stored as two small
deltas in rag/weights/reader/ with a manifest of sha256 sums, and rebuilt by `make reader`
(recipes/reader.py; results/reader.md reports it). `rag ask`, `rag eval` and `rag serve` apply it by
default (`--reader none`: the untrained models):

- the generator delta applies when the generator is the default one (the reader's base);
- the q(x) delta applies when q(x) is the default encoder (knowledge bases built with another d(z)
  keep their own q(x): a delta trained against MiniLM's d(z) means nothing elsewhere);
- the prompt becomes the reader's ("plain": passage, then "Question: ... / Answer:"), unless given.

Every file is checked against the manifest before anything is read (a corrupted or replaced file is a
clear error, never a silently different model); safetensors and JSON only, nothing that runs code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag.config import DEFAULT_ENCODER, DEFAULT_GENERATOR, EncoderConfig, GeneratorConfig

READER_DIR = Path(__file__).resolve().parent / "weights" / "reader"
MANIFEST = "reader.json"
FORMAT = "rag-reader"


@dataclass(frozen=True)
class Reader:
    folder: Path
    generator_delta: Path  # a rag.lora delta folder over `generator_base`
    query_delta: Path | None  # a rag.lora delta folder over `query_base` (None: q(x) was not trained)
    generator_base: str
    query_base: str
    prompt: str  # the prompt style it was trained with


class ReaderError(ValueError):
    pass


def read_reader(folder: Path | str = READER_DIR) -> Reader:
    """The reader in `folder`, every file verified against the manifest's sha256 first."""
    from rag.lora import sha256_file  # torch: only when a reader is read

    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        raise ReaderError(f"{folder}: no {MANIFEST}: not a trained reader folder (make reader writes one)")
    try:
        meta: dict[str, Any] = json.loads(manifest.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise ReaderError(f"{manifest}: not valid JSON ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ReaderError(f"{manifest}: field 'format': expected {FORMAT!r}")
    for key in ("files", "generator", "generator_base", "prompt"):
        if key not in meta:
            raise ReaderError(f"{manifest}: field {key!r} is missing")
    files = meta["files"]
    if not isinstance(files, dict) or not files:
        raise ReaderError(f"{manifest}: field 'files': expected {{relative path: sha256}}")
    for name, digest in files.items():
        path = (folder / name).resolve()
        if folder.resolve() not in path.parents:
            raise ReaderError(f"{manifest}: field 'files': {name!r} is outside the reader folder")
        if not path.is_file():
            raise ReaderError(f"{path}: missing (listed in {manifest})")
        if sha256_file(path) != digest:
            raise ReaderError(f"{path}: sha256 does not match {manifest}: the file is corrupted or was replaced; "
                              "restore it (git checkout) or rebuild it (make reader)")  # fmt: skip
    query = meta.get("query_encoder")
    return Reader(folder, folder / meta["generator"], None if query is None else folder / query,
                  str(meta["generator_base"]), str(meta.get("query_base", DEFAULT_ENCODER)), str(meta["prompt"]))  # fmt: skip


def load_reader(spec: str) -> Reader | None:
    """--reader: "none" (the untrained models), "default" (the shipped one) or a reader folder."""
    if spec == "none":
        return None
    if spec == "default" and not READER_DIR.exists():  # a checkout from before the reader shipped
        return None
    return read_reader(READER_DIR if spec == "default" else Path(spec))


def with_reader(reader: Reader | None, generator: GeneratorConfig, query: EncoderConfig | None,
                prompt: str | None) -> tuple[GeneratorConfig, EncoderConfig | None]:  # fmt: skip
    """The generator and q(x) configs with the reader applied where its bases are the ones in use;
    `prompt` (None: the reader's, else "short-answer") is the prompt style asked for."""
    if reader is None:
        return dataclasses.replace(generator, prompt=prompt or "short-answer"), query  # type: ignore[arg-type]
    if generator.path != reader.generator_base:
        raise ReaderError(f"the reader {reader.folder} is a delta over {reader.generator_base}, not over the "
                          f"generator {generator.path}; use --reader none with another generator")  # fmt: skip
    generator = dataclasses.replace(generator, deltas=(*generator.deltas, str(reader.generator_delta)),
                                    prompt=prompt or reader.prompt)  # type: ignore[arg-type]  # fmt: skip
    if reader.query_delta is not None and query is not None and query.path == reader.query_base:
        query = dataclasses.replace(query, deltas=(*query.deltas, str(reader.query_delta)))
    return generator, query


def reader_query_encoder(spec: str, query: EncoderConfig) -> EncoderConfig:
    """q(x) with the reader's delta where q(x) is the reader's base (`rag search`, `rag eval`'s retriever)."""
    reader = load_reader(spec)
    if reader is None or reader.query_delta is None or query.path != reader.query_base:
        return query
    return dataclasses.replace(query, deltas=(*query.deltas, str(reader.query_delta)))


def default_reader_applies(generator_path: str) -> bool:
    """Whether the shipped reader is for this generator (it is for the default one only)."""
    return generator_path == DEFAULT_GENERATOR
