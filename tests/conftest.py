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
