"""The example third-party plugin package (examples/regnde-ralston-plugin) through its entry
point: discovered, listed, and run as a non-FSAL tableau on torchdiffeq."""

from __future__ import annotations

import importlib.metadata
import math
import pathlib

import pytest
import torch

import regnde
from regnde.plugins import Registry, set_registry

PLUGIN_DIR = pathlib.Path(__file__).parents[1] / "examples" / "regnde-ralston-plugin"


@pytest.fixture
def ralston_registry(monkeypatch):
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    ep = importlib.metadata.EntryPoint(name="ralston", value="regnde_ralston", group="regnde")
    real = importlib.metadata.entry_points

    def fake(**kw):
        return [ep] if kw.get("group") == "regnde" else real(**kw)

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    old = set_registry(Registry(autoload=True))
    yield
    set_registry(old)


def test_entry_point_plugin_adds_a_method(ralston_registry):
    assert "ralston2" in regnde.methods("torchdiffeq")
    from regnde.plugins.manager import registry

    assert registry().entry("method", "ralston2").plugin == "ralston"


def test_non_fsal_plugin_method_solves_and_counts_evaluations(ralston_registry):
    calls = 0

    def f(t, y):
        nonlocal calls
        calls += 1
        return -y

    y0 = torch.ones(3, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    sol = regnde.solve(f, y0, t, method="ralston2", rtol=1e-6, atol=1e-8)
    assert abs(sol.ys[-1, 0].item() - math.exp(-1.0)) < 1e-4
    s = sol.stats
    # f0 and one probe in the initial step selection, one new stage per attempt, and
    # f(t1, y1) after every accepted step (the tableau is not FSAL)
    assert s.nfe == calls == 2 + (s.n_steps + s.n_rejected) + s.n_steps
