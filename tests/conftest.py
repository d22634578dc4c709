from __future__ import annotations

import pytest

from rag.resources import shared_data_dir


@pytest.fixture(scope="session")
def shared_data():
    """`../shared/data`, or a skip that says why (tests must not need it to run)."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data is absent: this test uses the shared real data sets")
    return path
