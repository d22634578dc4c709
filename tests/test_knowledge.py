from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tiny_encoders import WORDS_PER_PASSAGE, expected_passages, tiny_sentence_transformers_dir, write_corpus

from rag.cli import main
from rag.config import CorpusConfig, EncoderConfig, IndexConfig
from rag.encoders import load_encoder, passage_text
from rag.knowledge import PAUSE_ENV, build_knowledge_base, open_knowledge_base, same_build

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    return tiny_sentence_transformers_dir(tmp_path_factory.mktemp("enc"), seed=3)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    return path, write_corpus(path)


def configs(corpus_path: Path, encoder_dir: Path, shard_size: int = 8):
    return (
        CorpusConfig(source=str(corpus_path), words_per_passage=WORDS_PER_PASSAGE),
        EncoderConfig(path=str(encoder_dir), batch_size=4),
        IndexConfig(shard_size=shard_size),
    )


def test_build_and_open_round_trip(tmp_path, corpus, encoder_dir):
    path, records = corpus
    out = tmp_path / "kb"
    info = build_knowledge_base(*configs(path, encoder_dir), out, progress=False)
    passages = expected_passages(records)
    assert (info.passages, info.documents, info.dim) == (len(passages), len(records), 32)
    assert info.shards == -(-len(passages) // 8) and info.shards_reused == 0
    # the work folder and the builders' lock file are gone: only the output is left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kb"]

    index, store, meta = open_knowledge_base(out)
    assert len(index) == len(store) == meta["passages"] == len(passages)
    assert [(p.title, p.text) for p in store.get(np.arange(len(store)))] == passages
    assert meta["encoder"]["path"] == str(encoder_dir) and meta["index"]["kind"] == "flat"
    fresh = load_encoder(EncoderConfig(path=str(encoder_dir))).encode(
        [passage_text(t, x) for t, x in passages]
    )
    np.testing.assert_allclose(index.embeddings(np.arange(len(passages))), fresh, atol=1e-5)


def test_open_refuses_an_unfinished_folder(tmp_path, corpus, encoder_dir):
    out = tmp_path / "kb"
    build_knowledge_base(*configs(corpus[0], encoder_dir), out, progress=False)
    (out / "meta.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a finished knowledge base"):
        open_knowledge_base(out)


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    command = [sys.executable, "-c", "import sys; from rag.cli import main; sys.exit(main())", *args]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.Popen(command, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(pattern: str, root: Path, proc: subprocess.Popen, timeout: float = 180) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(root.glob(pattern))
        if found:
            return found
        if proc.poll() is not None:
            raise AssertionError(f"build ended before a shard appeared: {proc.communicate()}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no {pattern} under {root} within {timeout} s")


def test_killed_build_resumes_and_matches_an_uninterrupted_one(tmp_path, corpus, encoder_dir):
    path, _ = corpus
    out = tmp_path / "kb"
    args = ["index", "build", "--corpus", str(path), "--words", str(WORDS_PER_PASSAGE), "--encoder",
            str(encoder_dir), "--batch-size", "4", "--shard-size", "8", "--dtype", "float32", "--out", str(out),
            "--no-progress"]  # fmt: skip  # float32: the configs() the resumed build is given
    proc = _cli(*args, env={PAUSE_ENV: "1.0"})  # a second between shards: time to kill it mid-build
    _wait_for(".kb.build-*/shards/*.npy", tmp_path, proc)
    proc.kill()
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not out.exists()  # nothing half-written where the knowledge base goes
    finished = sorted(tmp_path.glob(".kb.build-*/shards/*.npy"))

    resumed = build_knowledge_base(*configs(path, encoder_dir), out, progress=False)
    assert 1 <= resumed.shards_reused == len(finished) < resumed.shards
    straight = build_knowledge_base(*configs(path, encoder_dir), tmp_path / "straight", progress=False)
    assert straight.shards_reused == 0 and straight.fingerprint == resumed.fingerprint
    a, b = open_knowledge_base(out), open_knowledge_base(tmp_path / "straight")
    rows = np.arange(len(a.index))
    assert a.passages.ids().to_pylist() == b.passages.ids().to_pylist()
    np.testing.assert_allclose(a.index.embeddings(rows), b.index.embeddings(rows), atol=1e-6)
    assert not list(tmp_path.glob(".kb.build-*"))


def test_cli_build_and_info(tmp_path, corpus, encoder_dir, capsys):
    out = tmp_path / "kb"
    rc = main(["index", "build", "--corpus", str(corpus[0]), "--words", "20", "--encoder", str(encoder_dir),
               "--index-type", "hnsw", "--out", str(out), "--no-progress"])  # fmt: skip
    assert rc == 0
    n = len(expected_passages(corpus[1]))
    assert f"{n} passages from {len(corpus[1])} documents" in capsys.readouterr().out
    assert main(["index", "info", "--index", str(out), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert (facts["passages"], facts["dim"], facts["index"]) == (n, 32, "hnsw")


def test_cli_bad_input_is_a_clear_error(tmp_path, corpus, encoder_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "a", "text": "fine words"}\n{"title": "b"}\n', encoding="utf-8")
    out = tmp_path / "kb"
    base = [
        "index",
        "build",
        "--corpus",
        str(bad),
        "--encoder",
        str(encoder_dir),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(base) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "'text'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # nothing half-written, no lock left
    assert main([*base, "--skip-bad-records"]) == 0
    assert "1 bad records skipped" in capsys.readouterr().out
    assert main([*base, "--index-type", "factory"]) == 2
    assert "--factory" in capsys.readouterr().err
    assert main(["index", "info", "--index", str(tmp_path)]) == 2
    assert "not a knowledge base" in capsys.readouterr().err
    assert (
        main([*base[:3], str(corpus[0]), "--encoder", str(tmp_path / "nope"), "--out", str(tmp_path / "kb2")])
        == 2
    )
    assert f"encoder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "kb2").exists()


def test_same_build_ignores_search_time_fields_but_not_corpus_changes(tmp_path, encoder_dir):
    path = tmp_path / "docs.jsonl"
    write_corpus(path, docs=5)
    corpus, encoder, index = configs(path, encoder_dir)
    build_knowledge_base(corpus, encoder, index, tmp_path / "kb", progress=False)
    meta = open_knowledge_base(tmp_path / "kb").meta
    assert same_build(meta, corpus, encoder, index)
    relaxed = {k: v for k, v in meta.items() if k != "fingerprint"}  # force the field-by-field check
    assert same_build(relaxed, corpus, replace(encoder, batch_size=7, scale=20.0), replace(index, nprobe=3))
    assert not same_build(relaxed, replace(corpus, words_per_passage=10), encoder, index)
    assert not same_build(relaxed, corpus, replace(encoder, max_length=16), index)
    assert not same_build(relaxed, corpus, encoder, replace(index, kind="hnsw"))
    os.utime(path, ns=(1, 1))  # the corpus file changed (its mtime, as an edit would)
    assert not same_build(meta, corpus, encoder, index) and not same_build(relaxed, corpus, encoder, index)
