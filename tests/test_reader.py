"""The trained reader (rag.reader): manifest and sha256 checks, where its deltas apply, and the options
that choose it. The shipped weights themselves: tests/test_reader_shipped.py."""

from __future__ import annotations

import json

import pytest
from tiny_generators import tiny_llama

from rag.config import DEFAULT_ENCODER, DEFAULT_GENERATOR, EncoderConfig, GeneratorConfig, LoraSpec
from rag.lora import attach, base_fingerprint, delta_tensors, save_delta, sha256_file
from rag.reader import FORMAT, MANIFEST, ReaderError, load_reader, read_reader, with_reader


def _reader_folder(tmp_path, query: bool = True):
    gen = tiny_llama(seed=0)
    spec = LoraSpec(rank=2, alpha=4.0)
    attach(gen.model, spec)
    folder = tmp_path / "reader"
    save_delta(folder / "generator", delta_tensors(gen.model), spec, {"fingerprint": base_fingerprint(gen.model)})
    files = ["generator/delta.safetensors", "generator/delta.json"]
    meta = {"format": FORMAT, "generator": "generator", "generator_base": DEFAULT_GENERATOR, "prompt": "plain"}
    if query:
        save_delta(folder / "query_encoder", delta_tensors(gen.model), spec, {})
        files += ["query_encoder/delta.safetensors", "query_encoder/delta.json"]
        meta |= {"query_encoder": "query_encoder", "query_base": DEFAULT_ENCODER}
    meta["files"] = {name: sha256_file(folder / name) for name in files}
    (folder / MANIFEST).write_text(json.dumps(meta))
    return folder


def test_a_reader_folder_is_verified_and_applies_to_its_bases_only(tmp_path):
    reader = read_reader(_reader_folder(tmp_path))
    generator, query = with_reader(reader, GeneratorConfig(), EncoderConfig(), None)
    assert generator.deltas == (str(reader.generator_delta),) and generator.prompt == "plain"
    assert query is not None and query.deltas == (str(reader.query_delta),)
    other_query = EncoderConfig(path="some/other/encoder")
    _, untouched = with_reader(reader, GeneratorConfig(), other_query, "short-answer")
    assert untouched == other_query  # a knowledge base with another d(z) keeps its own q(x)
    with pytest.raises(ReaderError, match="not over the generator"):
        with_reader(reader, GeneratorConfig(path="other/generator"), None, None)
    generator, query = with_reader(None, GeneratorConfig(), EncoderConfig(), None)
    assert generator.deltas == () and generator.prompt == "short-answer" and query == EncoderConfig()


def test_a_corrupted_missing_or_foreign_file_is_a_clear_error(tmp_path):
    folder = _reader_folder(tmp_path)
    weights = folder / "generator" / "delta.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match="sha256 does not match .*corrupted or was replaced"):
        read_reader(folder)
    weights.unlink()
    with pytest.raises(ReaderError, match="missing"):
        read_reader(folder)
    meta = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**meta, "files": {"../outside": "0" * 64}}))
    with pytest.raises(ReaderError, match="outside the reader folder"):
        read_reader(folder)
    (folder / MANIFEST).write_text("{not json")
    with pytest.raises(ReaderError, match="not valid JSON"):
        read_reader(folder)
    with pytest.raises(ReaderError, match="not a trained reader folder"):
        load_reader(str(tmp_path / "nowhere"))
    assert load_reader("none") is None


def test_rag_model_config_applies_the_reader_unless_none(tmp_path, monkeypatch):
    from rag import answering

    folder = _reader_folder(tmp_path, query=False)
    config = answering.rag_model_config(reader=str(folder), index_dir=str(tmp_path / "unused"))
    assert config.generator.deltas == (str(folder / "generator"),) and config.generator.prompt == "plain"
    config = answering.rag_model_config(reader="none")
    assert config.generator.deltas == () and config.generator.prompt == "short-answer"
    config = answering.rag_model_config(reader=str(folder), prompt="chat")
    assert config.generator.prompt == "chat"  # an explicit prompt wins over the reader's
