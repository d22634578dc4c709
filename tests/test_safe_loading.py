"""Nothing the project loads from disk can run code.

Every place a file is read gets a malicious pickle (a payload that creates a marker file when it is
unpickled) where it expects its own data; the load must fail with an error, and the marker must not
exist. A static check fails if an unsafe load (pickle, torch.load without weights_only=True,
allow_pickle=True, trust_remote_code=True, yaml.load, eval/exec) appears anywhere in rag/.
"""

from __future__ import annotations

import ast
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_encoders import tiny_bert_dir, tiny_sentence_transformers_dir, write_corpus
from tiny_generators import tiny_llama

from rag.config import CorpusConfig, EncoderConfig, GeneratorConfig, IndexConfig
from rag.tensor_state import StateFileError, load_state, save_state

RAG = Path(__file__).resolve().parent.parent / "rag"


class Payload:
    """Unpickling this creates the file `marker`: the proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path, how: str = "pickle") -> Path:
    """Write a malicious file at `path`: a plain pickle, a torch.save file, or a .npy object array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    if how == "torch":
        torch.save({"weight": Payload(marker)}, path)
    elif how == "npy":
        with open(path, "wb") as f:
            np.save(f, np.array([Payload(marker)], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(pickle.dumps({"data": Payload(marker)}))
    assert not Path(marker).exists()
    return path


def assert_refused(marker: Path, load, *args, **kwargs) -> Exception:
    with pytest.raises(Exception) as info:  # noqa: PT011  (any error will do: what matters is the marker)
        load(*args, **kwargs)
    assert not marker.exists(), f"the payload ran in {getattr(load, '__name__', load)}"
    return info.value


# ------------------------------------------------------------------------------------ trainer state


def test_trainer_state_round_trips_exactly_an_optimisers_state(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        optimizer.step()
        scheduler.step()
    state = {"step": 3, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "torch_rng": torch.get_rng_state()}  # fmt: skip
    save_state(state, tmp_path / "state")
    back = load_state(tmp_path / "state")
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]  # betas stay a tuple
    assert back["optimizer"]["state"].keys() == state["optimizer"]["state"].keys()  # int keys stay ints
    for key, slot in state["optimizer"]["state"].items():
        for name, value in slot.items():
            assert torch.equal(back["optimizer"]["state"][key][name], value) and back["optimizer"]["state"][key][name].dtype == value.dtype
    assert back["scheduler"] == state["scheduler"] and torch.equal(back["torch_rng"], state["torch_rng"])
    # loading it continues exactly where the original would
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    twin_opt.load_state_dict(back["optimizer"])
    x = torch.randn(5, 4)
    for m, o in ((model, optimizer), (twin, twin_opt)):
        o.zero_grad()
        m(x).pow(2).sum().backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters(), strict=True))


_keys = st.one_of(st.text(max_size=6), st.integers(-5, 5), st.booleans(), st.none())
_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.text(max_size=8),
    st.floats(allow_nan=False), st.sampled_from([float("inf"), float("-inf")]),
    st.builds(lambda shape, dtype: torch.randn(shape).to(dtype),
              st.lists(st.integers(0, 3), max_size=3).map(tuple),
              st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.uint8])),
)  # fmt: skip
_states = st.recursive(
    _leaves,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.lists(inner, max_size=3).map(tuple),
                            st.dictionaries(_keys, inner, max_size=3)),  # fmt: skip
    max_leaves=12,
)


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


@settings(max_examples=40, deadline=None)
@given(state=_states)
def test_any_nested_state_round_trips_exactly(tmp_path_factory, state):
    base = tmp_path_factory.mktemp("state") / "s"
    save_state(state, base)
    assert _same(load_state(base), state)


def test_state_files_that_are_not_ours_are_clear_errors(tmp_path):
    save_state({"a": torch.ones(2)}, tmp_path / "s")
    (tmp_path / "s.json").write_text(json.dumps({"format": "rag-tensor-state-1", "state": {"__tensor__": "9"}}))
    with pytest.raises(StateFileError, match=r"s\.json: field 'state': .*tensor '9'"):
        load_state(tmp_path / "s")
    (tmp_path / "s.json").write_text("[" * 100_000)
    with pytest.raises(StateFileError, match=r"s\.json"):
        load_state(tmp_path / "s")
    with pytest.raises(TypeError, match="cannot store a Payload"):
        save_state({"x": Payload(tmp_path / "m")}, tmp_path / "t")


def test_malicious_trainer_states_never_run(tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    plant(tmp_path / "s.safetensors", marker)
    (tmp_path / "s.json").write_text(json.dumps({"format": "rag-tensor-state-1", "state": {}}))
    assert isinstance(assert_refused(marker, load_state, tmp_path / "s"), StateFileError)
    plant(tmp_path / "s.json", marker)
    save_state({}, tmp_path / "t")
    (tmp_path / "t.json").write_bytes((tmp_path / "s.json").read_bytes())
    assert isinstance(assert_refused(marker, load_state, tmp_path / "t"), StateFileError)


def test_resume_refuses_an_old_pickled_trainer_state_without_running_it(world, tmp_path):
    from rag.model import RagModel
    from rag.training import TrainConfig, train

    _, rag, _, train_set, _ = world
    config = TrainConfig(rag=rag, steps=2, batch_size=8, save_every=1)
    train(RagModel.from_config(rag), train_set, config, out_dir=tmp_path / "run", stop_after=1)
    checkpoint = tmp_path / "run" / "checkpoint"
    for name in ("trainer_state.safetensors", "trainer_state.json"):
        (checkpoint / name).unlink()
    marker = tmp_path / "PAYLOAD_RAN"
    plant(checkpoint / "trainer_state.pt", marker, how="torch")
    error = assert_refused(marker, train, RagModel.from_config(rag), train_set, config, out_dir=tmp_path / "run",
                           resume=True)  # fmt: skip
    assert "trainer_state.pt" in str(error) and "never loaded" in str(error)


# ------------------------------------------------------------------------- models, data, indexes


def test_model_folders_with_pickled_weights_never_run(tmp_path):
    from rag.encoders import load_encoder
    from rag.generators import load_generator

    marker = tmp_path / "PAYLOAD_RAN"
    for folder in (tiny_bert_dir(tmp_path / "bert"), tiny_sentence_transformers_dir(tmp_path / "st")):
        weights = next(folder.rglob("model.safetensors"))
        plant(weights.with_name("pytorch_model.bin"), marker, how="torch")
        weights.unlink()
        assert_refused(marker, load_encoder, EncoderConfig(path=str(folder)))
    generator = tmp_path / "gen"
    tiny = tiny_llama()
    tiny.model.save_pretrained(generator)
    tiny.tokenizer.save_pretrained(generator)
    (generator / "model.safetensors").unlink()
    plant(generator / "pytorch_model.bin", marker, how="torch")
    assert_refused(marker, load_generator, GeneratorConfig(path=str(generator)))


def test_task_and_corpus_files_that_are_pickles_never_run(tmp_path):
    from rag.corpus import iter_passages
    from rag.tasks import READERS, read_task

    marker = tmp_path / "PAYLOAD_RAN"
    for fmt in READERS:
        name = {"dpr-qa": "x.csv", "curatedtrec": "x.tsv", "jeopardy": "x.csv", "red-trivia": "x.yaml"}.get(fmt, "x.jsonl")
        path = plant(tmp_path / fmt / name, marker)
        assert_refused(marker, read_task, fmt, path)
    for name, fmt in (("c.jsonl", "jsonl"), ("c.tsv", "dpr-tsv"), ("folder/a.txt", "folder")):
        path = plant(tmp_path / "corpus" / name, marker)
        source = path.parent if fmt == "folder" else path
        assert_refused(marker, lambda s=source, f=fmt: list(iter_passages(CorpusConfig(source=str(s), format=f))))


def test_knowledge_base_files_that_are_pickles_never_run(tmp_path):
    from rag.knowledge import build_knowledge_base, open_knowledge_base
    from rag.manifest import IntegrityError, write_manifest

    encoder = tiny_sentence_transformers_dir(tmp_path / "enc", seed=3)
    write_corpus(tmp_path / "docs.jsonl", docs=6)
    config = (CorpusConfig(source=str(tmp_path / "docs.jsonl"), words_per_passage=20),
              EncoderConfig(path=str(encoder), batch_size=4), IndexConfig(kind="hnsw"))  # fmt: skip
    marker = tmp_path / "PAYLOAD_RAN"
    for name, how in (("passages.arrow", "pickle"), ("index/embeddings.npy", "npy"), ("index/faiss.index", "pickle"),
                      ("meta.json", "pickle"), ("index/meta.json", "pickle")):  # fmt: skip
        kb = tmp_path / f"kb-{name.replace('/', '-')}"
        build_knowledge_base(*config, kb, progress=False)
        plant(kb / name, marker, how=how)
        first = assert_refused(marker, open_knowledge_base, kb)
        assert name == "meta.json" or isinstance(first, IntegrityError)  # the manifest catches it first
        write_manifest(kb)  # recorded as if the build wrote it: the loader itself must refuse it too
        assert not isinstance(assert_refused(marker, open_knowledge_base, kb), IntegrityError)


def test_training_checkpoint_and_eval_files_that_are_pickles_never_run(tmp_path):
    from rag.config import checkpoint_rag_config
    from rag.eval_store import read_predictions

    marker = tmp_path / "PAYLOAD_RAN"
    assert_refused(marker, checkpoint_rag_config, plant(tmp_path / "ckpt" / "config.json", marker).parent)
    predictions = plant(tmp_path / "run" / "predictions.jsonl", marker)
    with open(predictions, "ab") as f:
        f.write(b"\n")  # a complete (pickled) line, which the reader parses
    before = predictions.read_bytes()
    assert_refused(marker, read_predictions, predictions)
    assert predictions.read_bytes() == before  # reading never truncates (it used to cut torn lines off)


# ------------------------------------------------------------------------------- the static check


UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "joblib", "shelve", "marshal", "cloudpickle"}


def unsafe_loads(source: str, name: str = "<source>") -> list[str]:
    """Every unsafe load in Python `source`: 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{name}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {m}" for m in modules if m.split(".")[0] in UNSAFE_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        if func in ("eval", "exec", "compile", "__import__"):
            found.append(f"{where}: {func}()")
        if func.endswith(("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all")) or func in (
            "read_pickle", "torch.jit.load", "jit.load"):  # fmt: skip
            found.append(f"{where}: {func}()")
        if func.endswith("torch.load") or func == "load" and "weights_only" in keywords:
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{where}: {func}() without weights_only=True")
        for flag in ("allow_pickle", "trust_remote_code"):
            value = keywords.get(flag)
            if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                found.append(f"{where}: {flag}={ast.unparse(value)}")
    return found


def test_the_unsafe_load_check_finds_every_kind():
    bad = """
import pickle
from dill import loads
torch.load(f)
torch.load(f, weights_only=False)
np.load(f, allow_pickle=True)
AutoModel.from_pretrained(p, trust_remote_code=flag)
yaml.load(text)
eval(text)
"""
    assert len(unsafe_loads(bad)) == 8
    assert unsafe_loads("torch.load(f, weights_only=True)\nnp.load(f, mmap_mode='r')\nyaml.compose(t)") == []


def test_no_unsafe_load_anywhere_in_rag():
    files = sorted(RAG.rglob("*.py"))
    assert len(files) > 20
    problems = [p for f in files for p in unsafe_loads(f.read_text(encoding="utf-8"), str(f.relative_to(RAG.parent)))]
    assert problems == []


def test_given_embeddings_lora_deltas_and_bm25_files_that_are_pickles_never_run(tmp_path):
    from rag.bm25 import BM25Index
    from rag.lora import DELTA_FORMAT, META_FILE, WEIGHTS_FILE, read_delta
    from rag.vectors import open_embeddings

    marker = tmp_path / "PAYLOAD_RAN"
    for name, how in (("vectors.npy", "npy"), ("vectors.parquet", "pickle"), ("vectors.arrow", "pickle")):
        assert_refused(marker, open_embeddings, plant(tmp_path / name, marker, how=how))
    delta = tmp_path / "delta"
    plant(delta / WEIGHTS_FILE, marker)
    from rag.lora import sha256_file

    (delta / META_FILE).write_text(json.dumps({"format": DELTA_FORMAT, "spec": {}, "base": {},
                                               "sha256": sha256_file(delta / WEIGHTS_FILE)}))  # fmt: skip
    assert_refused(marker, read_delta, delta)  # even with a matching sha256, safetensors reads no pickle
    bm25 = tmp_path / "bm25"
    for name in ("data.csc.index.npy", "indices.csc.index.npy", "indptr.csc.index.npy"):
        plant(bm25 / name, marker, how="npy")
    from rag.bm25 import FORMAT as BM25_FORMAT
    from rag.config import BM25Config, to_dict

    (bm25 / "bm25.json").write_text(json.dumps({"format": BM25_FORMAT, "config": to_dict(BM25Config()),
                                                "passages": 1, "terms": 1}))  # fmt: skip
    error = assert_refused(marker, BM25Index.load, bm25)
    assert "format" not in str(error)  # refused for its arrays, not for a wrong marker file
