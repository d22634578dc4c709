"""Users' files are sacred: output paths, --overwrite, concurrent writers, locks, stale temporaries.

Defects this pins (each reproduced on abb17d6, where every build below exited 0):
- `rag index build --out PATH` deleted a folder of user files, the corpus folder (`--corpus notes
  --out notes`), the current directory (`--out .`), and replaced an existing file by a folder;
- another knowledge base at PATH was replaced silently (200 -> 5 passages);
- two concurrent builds of different corpora into one --out both reported success, the last winning;
- `rag train --out <existing file>` raised FileExistsError; orphaned `.NAME.*.tmp` / `.checkpoint.*.tmp`
  folders were never cleaned up; lock files were never removed; io.py's comment promised the old
  folder survives an interrupted replacement though two renames left a window.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_encoders import tiny_sentence_transformers_dir, write_corpus

from rag.cli import main
from rag.io import (
    OutputBusyError,
    OutputPathError,
    atomic_dir,
    check_output_dir,
    lock_path,
    output_lock,
    remove_stale_temps,
)
from rag.knowledge import PAUSE_ENV, is_knowledge_base, open_knowledge_base

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_sentence_transformers_dir(tmp_path_factory.mktemp("enc"), seed=3)


def _build_args(corpus: Path, encoder: Path, out: Path | str, *extra: str) -> list[str]:
    return ["index", "build", "--corpus", str(corpus), "--words", "20", "--encoder", str(encoder), "--batch-size",
            "4", "--out", str(out), "--no-progress", *extra]  # fmt: skip


def _user_files(folder: Path) -> dict[str, bytes]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "notes.md").write_text("my notes, not rag's", encoding="utf-8")
    (folder / "sub").mkdir(exist_ok=True)
    (folder / "sub" / "data.bin").write_bytes(os.urandom(64))
    return _snapshot(folder)


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_index_build_never_deletes_what_it_did_not_write(tmp_path, encoder, capsys, monkeypatch):
    corpus = tmp_path / "docs.jsonl"
    write_corpus(corpus, docs=6)
    mydocs = tmp_path / "mydocs"
    before = _user_files(mydocs)
    assert main(_build_args(corpus, encoder, mydocs)) == 2
    assert "did not write as a knowledge base" in capsys.readouterr().err and _snapshot(mydocs) == before
    assert main(_build_args(corpus, encoder, mydocs, "--overwrite")) == 2  # not even with --overwrite
    assert _snapshot(mydocs) == before

    notes = tmp_path / "notes"  # the corpus folder itself, and a folder inside it
    (notes / "a.txt").parent.mkdir()
    (notes / "a.txt").write_text("Luanda is the capital of Angola. " * 5, encoding="utf-8")
    corpus_files = _snapshot(notes)
    for out in (notes, notes / "kb"):
        assert main(_build_args(notes, encoder, out)) == 2
        assert "input" in capsys.readouterr().err and _snapshot(notes) == corpus_files

    work = tmp_path / "work"  # the current directory, and a folder holding it
    cwd_files = _user_files(work)
    monkeypatch.chdir(work)
    for out in (".", str(tmp_path)):
        assert main(_build_args(corpus, encoder, out)) == 2
        assert "current directory" in capsys.readouterr().err
    assert _snapshot(work) == cwd_files

    file = tmp_path / "a-file"
    file.write_text("keep me", encoding="utf-8")
    assert main(_build_args(corpus, encoder, file)) == 2
    assert "not a folder" in capsys.readouterr().err and file.read_text(encoding="utf-8") == "keep me"


def test_replacing_a_knowledge_base_needs_overwrite(tmp_path, encoder, capsys):
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    write_corpus(big, docs=12, seed=1)
    write_corpus(small, docs=2, seed=2)
    kb = tmp_path / "kb"
    assert main(_build_args(big, encoder, kb)) == 0
    passages = len(open_knowledge_base(kb).passages)
    assert main(_build_args(small, encoder, kb)) == 2
    assert "already holds a knowledge base; --overwrite replaces it" in capsys.readouterr().err
    assert len(open_knowledge_base(kb).passages) == passages  # untouched
    assert main(_build_args(small, encoder, kb, "--overwrite")) == 0
    assert len(open_knowledge_base(kb).passages) < passages
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.jsonl", "kb", "small.jsonl"]  # no .old, no lock


def test_a_concurrent_second_build_waits_then_refuses_instead_of_reporting_a_lost_success(tmp_path, encoder, capsys):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_corpus(a, docs=8, seed=1)
    write_corpus(b, docs=3, seed=2)
    kb = tmp_path / "kb"
    command = [sys.executable, "-c", "import sys; from rag.cli import main; sys.exit(main())",
               *_build_args(a, encoder, kb, "--shard-size", "4")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", PAUSE_ENV: "0.3"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".kb.build-*/shards/*.npy")):  # the first holds the lock and is encoding
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.02)
    assert main(_build_args(b, encoder, kb)) == 2  # waited for the first, then found its knowledge base
    assert "already holds a knowledge base" in capsys.readouterr().err
    assert first.wait(timeout=120) == 0, first.communicate()
    assert open_knowledge_base(kb).meta["corpus"]["source"] == str(a)  # the success reported is the one that stuck
    assert not lock_path(kb).exists()


def test_stale_temporaries_of_a_killed_build_are_removed_by_the_next(tmp_path, encoder):
    corpus = tmp_path / "docs.jsonl"
    write_corpus(corpus, docs=4)
    kb = tmp_path / "kb"
    stale = tmp_path / ".kb.x1y2z3.tmp"  # what a kill during the final copy leaves: a full-size folder
    (stale / "index").mkdir(parents=True)
    (stale / "index" / "embeddings.npy").write_bytes(b"\0" * 4096)
    (tmp_path / ".kb.lock").write_text("12345")  # and a lock file whose holder is gone
    assert main(_build_args(corpus, encoder, kb)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "kb"]


def test_train_output_paths(world, tmp_path, capsys):
    from rag.synthetic import write_qa_jsonl

    task, rag, _, _, _ = world
    data = write_qa_jsonl(task.train, tmp_path / "train.jsonl")
    common = ["train", "--train", str(data), "--index", rag.index_dir, "--query-encoder", rag.query_encoder.path,
              "--query-scale", "1", "--generator", rag.generator.path, "-k", "2", "--batch-size", "8",
              "--steps", "1", "--quiet"]  # fmt: skip
    file = tmp_path / "a-file"
    file.write_text("keep me", encoding="utf-8")
    assert main([*common, "--out", str(file)]) == 2  # was a FileExistsError traceback
    assert "not a folder" in capsys.readouterr().err and file.read_text(encoding="utf-8") == "keep me"
    mine = tmp_path / "mine"
    before = _user_files(mine)
    assert main([*common, "--out", str(mine)]) == 2 and _snapshot(mine) == before
    assert main([*common, "--out", str(data)]) == 2
    assert "input" in capsys.readouterr().err

    run = tmp_path / "run"
    stale = run / ".checkpoint.abc123.tmp"  # a killed save's full-size copy, from an earlier run
    assert main([*common, "--out", str(run)]) == 0
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    assert main([*common, "--out", str(run)]) == 2
    assert "--resume continues it" in capsys.readouterr().err
    assert main([*common, "--steps", "2", "--out", str(run), "--resume"]) == 0
    assert not stale.exists() and not lock_path(run / "checkpoint").exists()
    assert main([*common, "--out", str(run), "--overwrite"]) == 0
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1]  # started over
    assert main([*common, "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "no checkpoint to resume" in capsys.readouterr().err


# ------------------------------------------------------------------------------ the primitives


def test_atomic_dir_replaces_only_its_own_kind_and_exchanges_in_one_step(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(OutputPathError, match="did not write"):
        with atomic_dir(target) as tmp:  # no `replaces`: an existing non-empty folder is never replaced
            (tmp / "v").write_text("2")
    with atomic_dir(target, replaces=lambda p: (p / "v").is_file()) as tmp:
        (tmp / "v").write_text("3")
    assert (target / "v").read_text() == "3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputPathError, match="not a folder"):
        with atomic_dir(tmp_path / "file", replaces=lambda p: True):
            pass
    assert (tmp_path / "file").read_text() == "x"


def test_an_interrupted_two_rename_swap_is_undone_by_the_next_writer(tmp_path):
    # what a kill between the fallback's two renames leaves: the old folder at .out.old, no out
    old = tmp_path / ".out.old"
    old.mkdir()
    (old / "v").write_text("old")
    assert remove_stale_temps(tmp_path / "out") == []
    assert (tmp_path / "out" / "v").read_text() == "old" and not old.exists()


def test_a_second_writer_fails_at_once_or_waits_and_the_lock_file_goes(tmp_path):
    out = tmp_path / "out"
    held, release = threading.Event(), threading.Event()

    def holder() -> None:
        with output_lock(out):
            held.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(10)
    with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()}"):
        with output_lock(out, wait=False):
            pass
    got, done = threading.Event(), threading.Event()

    def waiter() -> None:
        with output_lock(out):
            got.set()
            done.wait(10)

    second = threading.Thread(target=waiter)
    second.start()
    time.sleep(0.2)
    assert not got.is_set()  # still waiting
    release.set()
    thread.join(10)
    assert got.wait(10) and lock_path(out).exists()  # the waiter holds a fresh lock file
    with pytest.raises(OutputBusyError):
        with output_lock(out, wait=False):
            pass
    done.set()
    second.join(10)
    assert not lock_path(out).exists()


def test_check_output_dir_rules(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    own = tmp_path / "own"
    own.mkdir()
    (own / "marker").write_text("x")
    is_own = lambda p: (p / "marker").is_file()  # noqa: E731
    assert check_output_dir(tmp_path / "new", what="thing", is_own=is_own) is False
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty", what="thing", is_own=is_own) is False
    with pytest.raises(OutputPathError, match="--overwrite"):
        check_output_dir(own, what="thing", is_own=is_own)
    assert check_output_dir(own, what="thing", is_own=is_own, overwrite=True) is True
    with pytest.raises(OutputPathError, match="current directory"):
        check_output_dir(".", what="thing", is_own=is_own, overwrite=True)
    (tmp_path / "link").symlink_to(own)
    with pytest.raises(OutputPathError, match="not a folder"):
        check_output_dir(tmp_path / "link", what="thing", is_own=is_own, overwrite=True)
    assert is_knowledge_base(own) is False


def test_index_settings_are_refused_before_the_corpus_is_read(tmp_path, encoder, capsys, monkeypatch):
    """An invalid --factory (or PQ size) was only rejected after the whole corpus had been encoded."""
    import rag.knowledge as K

    corpus = tmp_path / "docs.jsonl"
    write_corpus(corpus, docs=4)

    def never(*args, **kwargs):
        raise AssertionError("the corpus was read before the index settings were checked")

    monkeypatch.setattr(K, "iter_passages", never)
    for extra, message in ((["--index-type", "factory", "--factory", "NotAnIndex"], "factory string 'NotAnIndex'"),
                           (["--index-type", "ivfpq", "--pq", "7"], "not a multiple")):  # fmt: skip
        assert main(_build_args(corpus, encoder, tmp_path / "kb", *extra)) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "kb").exists() and not list(tmp_path.glob(".kb*"))
