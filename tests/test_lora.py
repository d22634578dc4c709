"""LoRA deltas (rag.lora): merging equals peft's forward; storage is checked; training with deltas resumes
exactly and its checkpoint loads with one argument; counterfactual passages (rag.counterfactual)."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from tiny_generators import tiny_llama

from rag.config import LoraSpec
from rag.counterfactual import SubstitutePool, Substitution, answer_type, substitute_passages
from rag.lora import (
    DeltaError,
    adapted_modules,
    attach,
    base_fingerprint,
    delta_tensors,
    load_delta_into,
    merge_delta,
    read_delta,
    save_delta,
)
from rag.model import RagModel
from rag.synthetic import SyntheticConfig, build_world, make_task
from rag.train_checkpoint import GENERATOR_DELTA_DIR, QUERY_DELTA_DIR, load_rag_model, read_checkpoint_config
from rag.training import Example, TrainConfig, draw_substitutions, make_optimizer, train


def _trained_pairs(model: torch.nn.Module, seed: int = 0) -> None:
    """Give every B a random value (peft starts B at zero, which would make any delta inert)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in adapted_modules(model):
            b = model.get_submodule(name).lora_B["default"].weight
            b.copy_(torch.randn(b.shape, generator=gen) * 0.05)


def test_merged_delta_equals_the_adapted_forward_and_round_trips(tmp_path):
    adapted, plain = tiny_llama(seed=0), tiny_llama(seed=0)
    spec = LoraSpec(rank=4, alpha=8.0)
    names = attach(adapted.model, spec)
    assert names and all("lora" not in n for n in names)
    _trained_pairs(adapted.model)
    ids = torch.randint(5, adapted.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = adapted.model(input_ids=ids).logits  # (3, 7, V) through peft's LoRA layers
        before = plain.model(input_ids=ids).logits
    save_delta(tmp_path / "d", delta_tensors(adapted.model), spec, {"fingerprint": base_fingerprint(plain.model)})
    delta = read_delta(tmp_path / "d")
    assert merge_delta(plain.model, delta) == len(names)
    with torch.no_grad():
        merged = plain.model(input_ids=ids).logits
    torch.testing.assert_close(merged, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, merged, atol=1e-3)  # the delta is not inert


def test_a_corrupted_or_foreign_delta_is_refused(tmp_path):
    gen = tiny_llama(seed=0)
    spec = LoraSpec(rank=2, alpha=4.0)
    attach(gen.model, spec)
    _trained_pairs(gen.model)
    folder = save_delta(tmp_path / "d", delta_tensors(gen.model), spec, {"fingerprint": base_fingerprint(gen.model)})
    weights = folder / "delta.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="sha256 .* does not match"):
        read_delta(folder)
    folder = save_delta(tmp_path / "e", delta_tensors(gen.model), spec, {"fingerprint": base_fingerprint(gen.model)})
    other = tiny_llama(seed=1)  # other base weights, same shapes
    with pytest.raises(DeltaError, match="other base weights"):
        merge_delta(other.model, read_delta(folder))
    meta = json.loads((folder / "delta.json").read_text())
    (folder / "delta.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(DeltaError, match="field 'format'"):
        read_delta(folder)
    with pytest.raises(DeltaError, match="not a LoRA delta folder"):
        read_delta(tmp_path)


def test_load_delta_into_restores_the_pairs_and_refuses_a_mismatch():
    a, b = tiny_llama(seed=0), tiny_llama(seed=0)
    attach(a.model, LoraSpec(rank=2))
    attach(b.model, LoraSpec(rank=2))
    _trained_pairs(a.model, seed=3)
    load_delta_into(b.model, delta_tensors(a.model))
    for key, value in delta_tensors(a.model).items():
        assert torch.equal(value, delta_tensors(b.model)[key])
    with pytest.raises(ValueError, match="does not match"):
        load_delta_into(b.model, dict(list(delta_tensors(a.model).items())[1:]))


# ------------------------------------------------------------------------------ training with deltas


@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    synth = SyntheticConfig(seed=1, dropout=0.1)
    task = make_task(synth)
    rag, _ = build_world(task, tmp_path_factory.mktemp("lora-world"), synth, reader_steps=0, k=4)
    return rag, [Example.pair(p.question, p.answer) for p in task.train]


def _lora_config(rag, **overrides) -> TrainConfig:
    base = TrainConfig(rag=rag, steps=6, batch_size=8, lr=3e-3, warmup_steps=2, save_every=2,
                       generator_lora=LoraSpec(rank=4, alpha=8.0), query_lora=LoraSpec(rank=2, alpha=4.0),
                       counterfactual_rate=0.5)  # fmt: skip
    return dataclasses.replace(base, **overrides)


def test_lora_training_trains_only_the_pairs_resumes_exactly_and_loads(small_world, tmp_path):
    rag, data = small_world
    config = _lora_config(rag)
    model = RagModel.from_config(rag)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    whole = train(model, data, config, out_dir=tmp_path / "whole")
    changed = {n for n, p in model.named_parameters() if n in base and not torch.equal(base[n], p)}
    assert not changed  # the base weights never move: only the injected pairs do
    first = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "cut", stop_after=3)
    rest = train(RagModel.from_config(rag), data, config, out_dir=tmp_path / "cut", resume=True)
    np.testing.assert_allclose(first.losses + rest.losses, whole.losses, rtol=0, atol=1e-6)
    checkpoint = tmp_path / "cut" / "checkpoint"
    assert (checkpoint / GENERATOR_DELTA_DIR / "delta.safetensors").is_file()
    assert (checkpoint / QUERY_DELTA_DIR / "delta.safetensors").is_file()
    assert not (checkpoint / "generator").exists()  # no full copy of the generator: the delta is enough
    meta = read_checkpoint_config(checkpoint)
    assert meta["rag"]["generator"]["deltas"] == [GENERATOR_DELTA_DIR]
    loaded = load_rag_model(checkpoint)  # base weights + merged deltas, no peft layers
    assert not adapted_modules(loaded.generator.model)
    model.eval()
    questions, answers = [e.input for e in data[:6]], [e.target for e in data[:6]]
    with torch.no_grad():
        torch.testing.assert_close(loaded(questions, answers).nll, model(questions, answers).nll,
                                   rtol=1e-4, atol=1e-4)  # fmt: skip
    assert loaded.generate(questions).answers == model.generate(questions).answers


def test_optimizer_holds_only_the_pairs(small_world):
    rag, _ = small_world
    model = RagModel.from_config(rag)
    config = _lora_config(rag, freeze_query_encoder=True, query_lora=None)
    from rag.training import attach_lora

    attach_lora(model, config)
    optimizer, _ = make_optimizer(model, config)
    trained = [p for g in optimizer.param_groups for p in g["params"]]
    pairs = sum(t.numel() for t in delta_tensors(model.generator.model).values())
    assert sum(p.numel() for p in trained) == pairs
    assert not any(p.requires_grad for p in model.query_encoder.parameters())


# ------------------------------------------------------------------------------ counterfactual passages


def test_answer_types_by_hand():
    assert answer_type("When did the war end?", "1945") == "year"
    assert answer_type("When was she born?", "12 March 1921") == "date"
    assert answer_type("How many moons does Mars have?", "two") == "number"
    assert answer_type("How many pages?", "581") == "number"
    assert answer_type("Who wrote Hamlet?", "William Shakespeare") == "person"
    assert answer_type("Where is the Louvre?", "Paris") == "place"
    assert answer_type("What is the capital of Angola?", "Luanda") == "entity"


def test_substitution_replaces_every_alias_as_whole_words_in_titles_and_texts():
    passages = [("Luanda", "Luanda is the capital of Angola. LUANDA port; Luandan food."),
                ("Angola", "The capital, Luanda, lies on the coast.")]  # fmt: skip
    out, changed = substitute_passages(passages, Substitution(("Luanda", "São Paulo de Loanda"), "Nairobi"))
    assert changed
    assert out == [("Nairobi", "Nairobi is the capital of Angola. Nairobi port; Luandan food."),
                   ("Angola", "The capital, Nairobi, lies on the coast.")]  # fmt: skip
    same, changed = substitute_passages(passages, Substitution(("Lisbon",), "Nairobi"))
    assert not changed and same == passages


def test_substitute_pool_draws_the_same_type_and_never_an_alias():
    pool = SubstitutePool([("Who wrote A?", "Jane Austen"), ("Who wrote B?", "Leo Tolstoy"), ("When?", "1900"),
                           ("Who wrote C?", "Shakespeare")])  # fmt: skip
    rng = random.Random(0)
    for _ in range(50):
        got = pool.draw("Who wrote Hamlet?", ("William Shakespeare", "Shakespeare"), rng)
        assert got is not None and got.replacement in ("Jane Austen", "Leo Tolstoy")
    year = pool.draw("In which year?", ("1950",), rng)
    assert year is not None and year.replacement == "1900"
    assert pool.draw("Where?", ("Paris",), rng) is None  # no place in the pool


def test_counterfactual_passages_change_the_target_only_where_a_passage_names_the_answer(small_world):
    rag, data = small_world
    model = RagModel.from_config(rag)
    retrieved = model.retriever.retrieve([data[0].input], model.k)
    named = data[0].target in " ".join(retrieved.texts[0])
    other = next(e.target for e in data if e.target != data[0].target)
    model.eval()
    with torch.no_grad():
        plain = model([data[0].input], [data[0].target])
        swapped = model([data[0].input], [data[0].target], substitutions=[Substitution((data[0].target,), other)])
        as_other = model([data[0].input], [other])
    if named:  # the loss is then the loss of the substitute over the rewritten passages
        assert not torch.allclose(swapped.nll, plain.nll)
        assert not torch.allclose(swapped.nll, as_other.nll)
    else:
        torch.testing.assert_close(swapped.nll, plain.nll)


def test_draws_are_a_function_of_position():
    pool = SubstitutePool([("Who?", "Ann Smith"), ("Who?", "Bob Jones"), ("Who?", "Cy Young")])
    batch = [Example.pair("Who is it?", "Ann Smith")] * 6
    a = draw_substitutions(batch, pool, 0.5, seed=0, step=3, micro=1)
    b = draw_substitutions(batch, pool, 0.5, seed=0, step=3, micro=1)
    c = draw_substitutions(batch, pool, 0.5, seed=0, step=4, micro=1)
    assert a == b and a != c
    assert draw_substitutions(batch, pool, 0.0, seed=0, step=3, micro=1) is None
