"""A knowledge base's manifest (rag.manifest): sizes always, hashes on first open and on `rag index verify`.

Defects this pins (each reproduced on abb17d6):
- a swapped passage store with the same row count returned wrong texts under the original scores;
- an edited `dim` in meta.json was reported by `rag index info` as fact;
- a corrupt or hand-edited FAISS file gave a faiss RuntimeError, missing meta.json keys a KeyError.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from tiny_encoders import tiny_sentence_transformers_dir, write_corpus

from rag import manifest as M
from rag.cli import main
from rag.config import CorpusConfig, EncoderConfig, IndexConfig
from rag.knowledge import build_knowledge_base, open_knowledge_base
from rag.manifest import IntegrityError, verify_folder, write_manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("integrity")
    encoder = tiny_sentence_transformers_dir(root / "enc", seed=3)
    write_corpus(root / "docs.jsonl", docs=10, seed=1)
    config = (CorpusConfig(source=str(root / "docs.jsonl"), words_per_passage=20),
              EncoderConfig(path=str(encoder), batch_size=4))  # fmt: skip
    build_knowledge_base(*config, IndexConfig(kind="hnsw"), root / "kb", progress=False)
    return root / "kb"


@pytest.fixture
def kb(built, tmp_path):
    copy = tmp_path / "kb"
    shutil.copytree(built, copy)  # a copy: every file gets a new inode, so the first open hashes
    return copy


def _flip_byte(path, offset_from_end: int = 40) -> None:
    """Change one byte in place, keeping the size and (as `cp -p` would) the modification time."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0x20
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_swapped_or_edited_passage_store_is_refused_not_read(kb, tmp_path):
    assert len(open_knowledge_base(kb).passages) > 0  # as built: fine
    store = kb / "passages.arrow"
    text = open_knowledge_base(kb).passages[0].text
    raw = store.read_bytes()
    i = raw.index(text.encode())
    store.write_bytes(raw[:i] + text[::-1].encode() + raw[i + len(text):])  # same size, same rows
    with pytest.raises(IntegrityError, match=r"passages\.arrow: content differs"):
        open_knowledge_base(kb)
    other = tmp_path / "other.arrow"  # another store of another size
    other.write_bytes(raw + b"\0" * 8)
    shutil.copy2(other, store)
    with pytest.raises(IntegrityError, match=r"passages\.arrow: \d+ bytes, the manifest records"):
        open_knowledge_base(kb)


def test_an_edited_meta_json_is_never_reported_as_fact(kb, capsys):
    meta = json.loads((kb / "meta.json").read_text())
    (kb / "meta.json").write_text(json.dumps({**meta, "dim": 384}, indent=2))
    assert main(["index", "info", "--index", str(kb)]) == 2
    assert f"{kb / 'meta.json'}: " in capsys.readouterr().err  # named, not reported
    with pytest.raises(IntegrityError, match=r"meta\.json"):
        open_knowledge_base(kb)
    write_manifest(kb)  # even an edit recorded as if it were the build's: the index says otherwise
    with pytest.raises(ValueError, match=r"meta\.json: field 'dim': 384, but the index holds vectors of dim 32"):
        open_knowledge_base(kb)
    del meta["passages"]
    (kb / "meta.json").write_text(json.dumps(meta))
    write_manifest(kb)
    with pytest.raises(ValueError, match=r"meta\.json: field 'passages': missing"):  # was a KeyError
        open_knowledge_base(kb)


def test_a_corrupt_faiss_file_is_a_clear_error(kb):
    _flip_byte(kb / "index" / "faiss.index", offset_from_end=200)
    with pytest.raises(IntegrityError, match=r"faiss\.index: content differs"):
        open_knowledge_base(kb)
    faiss_file = kb / "index" / "faiss.index"
    faiss_file.write_bytes(b"not a faiss index " * (faiss_file.stat().st_size // 18) + b"x" * (faiss_file.stat().st_size % 18))
    write_manifest(kb)
    with pytest.raises(ValueError, match=r"faiss\.index: not a readable FAISS index"):  # was a RuntimeError
        open_knowledge_base(kb)


def test_opening_hashes_once_then_only_sizes(kb, monkeypatch):
    calls = []
    real = M.sha256_file
    monkeypatch.setattr(M, "sha256_file", lambda p: calls.append(p.name) or real(p))
    first = verify_folder(kb)
    assert first.hashed and "passages.arrow" in calls  # a copy: new inodes, so the first open hashes
    calls.clear()
    second = verify_folder(kb)
    assert not second.hashed and [c for c in calls if c != "manifest.json"] == []  # sizes only
    assert verify_folder(kb, full=True).hashed  # rag index verify always hashes
    _flip_byte(kb / "passages.arrow")  # same size, mtime put back: ctime still moves
    with pytest.raises(IntegrityError):
        verify_folder(kb)


def test_rag_index_verify(kb, capsys):
    assert main(["index", "verify", "--index", str(kb)]) == 0
    assert "ok:" in capsys.readouterr().out
    _flip_byte(kb / "index" / "embeddings.npy")
    assert main(["index", "verify", "--index", str(kb)]) == 2
    assert "embeddings.npy: content differs" in capsys.readouterr().err
    # a knowledge base built before manifests: nothing to check against, until one is recorded
    (kb / "manifest.json").unlink()
    (kb / ".verified.json").unlink()
    assert main(["index", "verify", "--index", str(kb)]) == 2
    assert "--write-manifest" in capsys.readouterr().err
    _flip_byte(kb / "index" / "embeddings.npy")  # put the byte back: the files as built
    assert main(["index", "verify", "--index", str(kb), "--write-manifest"]) == 0
    assert main(["index", "verify", "--index", str(kb)]) == 0
