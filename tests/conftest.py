"""Shared test fixtures: the GPU skip, seeded generators, poisoned outputs, the tolerance table."""

from __future__ import annotations

import numpy as np
import pytest

from rawformer import backend


def pytest_collection_modifyitems(config, items):
    """Skip `gpu` tests without a GPU, and the long `full` grid unless `-m` asks for it."""
    no_gpu = backend.cupy_module() is None
    want_full = "full" in (config.getoption("-m") or "")
    skip_gpu = pytest.mark.skip(reason="no CUDA GPU / CuPy on this machine")
    skip_full = pytest.mark.skip(reason="long grid: run with -m full")
    for item in items:
        if no_gpu and "gpu" in item.keywords:
            item.add_marker(skip_gpu)
        elif "full" in item.keywords and not want_full:
            item.add_marker(skip_full)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def cp():
    """CuPy, for tests marked gpu."""
    return backend.require_cupy()
