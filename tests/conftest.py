from __future__ import annotations

import pytest
import torch

from rag.resources import shared_data_dir
from rag.synthetic import SyntheticConfig, build_world, make_task
from rag.tasks import Example

SYNTH = SyntheticConfig(seed=0)


@pytest.fixture(scope="session")
def shared_data():
    """`../shared/data`, or a skip that says why (tests must not need it to run)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent: this test uses the shared real data sets")
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """The synthetic task (rag.synthetic) and its world: tiny random q(x), d(z) and a generator that
    reads, saved as model folders, and a real knowledge base built from them. Built once per session."""
    torch.set_num_threads(1)  # tiny models: threads only add overhead on a shared 2-core machine
    task = make_task(SYNTH)
    rag, reader_accuracy = build_world(task, tmp_path_factory.mktemp("world"), SYNTH, reader_steps=400, k=8)
    train_set = [Example.pair(p.question, p.answer, (p.answer,)) for p in task.train]
    test_set = [Example.pair(p.question, p.answer, (p.answer,)) for p in task.test]
    return task, rag, reader_accuracy, train_set, test_set
