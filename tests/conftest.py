"""Test setup: float64 by default for numerical checks, one thread (small problems), and a fresh
plugin registry per test (no entry points from the environment) so that tests are hermetic and
plugins registered by one test never leak into another."""

from __future__ import annotations

import pytest
import torch

from regnde.plugins import Registry, set_registry


def pytest_configure(config: pytest.Config) -> None:
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def registry() -> Registry:
    """A fresh :class:`regnde.plugins.Registry` (built-ins only) installed as the process-wide
    one for the duration of the test; the previous one is restored afterwards."""
    fresh = Registry(autoload=False)
    old = set_registry(fresh)
    try:
        yield fresh
    finally:
        set_registry(old)


@pytest.fixture
def one_thread_float32():
    """For the experiments, which train in float32: one thread and float32 as torch's default
    for the test, restored afterwards."""
    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_num_threads(threads)
    torch.set_default_dtype(dtype)
