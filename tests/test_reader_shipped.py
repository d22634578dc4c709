"""The reader shipped in rag/weights/reader: present in a clean clone, small, verified on load, and not inert.
(slow) With every default, `rag ask` answers the Angola question with Luanda, greedily."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rag.config import DEFAULT_GENERATOR, GeneratorConfig
from rag.reader import MANIFEST, READER_DIR, ReaderError, load_reader, read_reader

PROMPT = "Angola. Angola is a country in Southern Africa. Its capital and largest city is Luanda.\nQuestion: What is the capital of Angola?\nAnswer:"


def test_the_shipped_reader_is_small_and_verified():
    reader = read_reader(READER_DIR)  # every file's sha256 against the manifest
    assert load_reader("default") == reader
    assert reader.generator_base == DEFAULT_GENERATOR and reader.prompt == "plain"
    size = sum(f.stat().st_size for f in READER_DIR.rglob("*") if f.is_file())
    assert size <= 25 * 2**20, f"{size / 2**20:.1f} MB of shipped weights (at most 25 MB)"
    files = json.loads((READER_DIR / MANIFEST).read_text())["files"]
    assert {str(f.relative_to(READER_DIR)) for f in READER_DIR.rglob("*") if f.is_file()} == {MANIFEST, *files}


def test_a_corrupted_copy_is_refused(tmp_path):
    copy = shutil.copytree(READER_DIR, tmp_path / "reader")
    weights = copy / "generator" / "delta.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ReaderError, match="sha256 does not match"):
        load_reader(str(copy))


def test_the_delta_changes_the_generator():
    from rag.generators import load_generator

    reader = read_reader(READER_DIR)
    base = load_generator(GeneratorConfig(prompt="plain"))
    trained = load_generator(GeneratorConfig(prompt="plain", deltas=(str(reader.generator_delta),)))
    ids = base.tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        a, b = base.model(input_ids=ids).logits[0, -1], trained.model(input_ids=ids).logits[0, -1]
    assert (a - b).abs().max() > 1.0  # logits of the first answer token move by more than rounding
    changed = [n for n, p in trained.model.named_parameters() if not torch.equal(p, dict(base.model.named_parameters())[n])]
    assert any("q_proj" in n for n in changed) and any("down_proj" in n for n in changed)


@pytest.mark.slow
def test_rag_ask_with_every_default_answers_luanda():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(root))
    out = subprocess.run([sys.executable, "-m", "rag.cli", "ask", "--json", "What is the capital of Angola?"],
                         capture_output=True, text=True, env=env, timeout=1800)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    assert data["answer"].strip() == "Luanda", data["answer"]
    assert data["decoding"] == "greedy"
    best = max(data["passages"], key=lambda p: p["posterior"])
    assert "Luanda" in best["text"]  # the answer is read from a passage that states it
