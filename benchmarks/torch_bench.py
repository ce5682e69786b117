"""Pieces the torch benchmarks share: the MLP field and side-by-side timing.

Imported by ``benchmarks/bench_*.py`` run as scripts (``python benchmarks/bench_x.py`` puts
this folder on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


class Field(torch.nn.Module):
    """``f(t, y) = W2 tanh(W1 y)``, weights scaled by ``scale`` (more steps); autonomous, so
    ``t`` may be a scalar (torchdiffeq) or one time per sample (torchode)."""

    def __init__(self, dim: int = 64, hidden: int = 64, scale: float = 2.0):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(dim, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)
        with torch.no_grad():
            self.l1.weight.mul_(scale)
            self.l2.weight.mul_(scale)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.l2(torch.tanh(self.l1(y)))


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    """Seconds of one call of ``fn``, synchronised before and after."""
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def medians(base: Callable[[], object], cand: Callable[[], object], repeats: int,
            sync: Callable[[], None]) -> tuple[float, float, float]:
    """``(baseline ms, candidate ms, ratio)``: medians of alternated repeats after 2 warm-ups."""
    for _ in range(2):  # warm-up
        base()
        cand()
    tb, tc = [], []
    for _ in range(repeats):
        tb.append(timed(base, sync))
        tc.append(timed(cand, sync))
    mb, mc = statistics.median(tb), statistics.median(tc)
    return mb * 1e3, mc * 1e3, mc / mb


def compare(name: str, base: Callable[[], object], cand: Callable[[], object], repeats: int,
            sync: Callable[[], None], target: float | None
            ) -> tuple[str, float, float, float, float | None]:
    """A table row: ``(name, baseline ms, candidate ms, ratio, target)``."""
    return (name, *medians(base, cand, repeats, sync), target)
