"""How many function evaluations the *data's own* dynamics cost at an experiment's settings.

A regularizer can only lower NFE at equal accuracy where the trained model spends evaluations
the data does not need. This script solves the exact dynamics behind two synthetic tasks with
the experiment's solver and tolerances and prints their NFE beside vanilla's (from
``benchmarks/results/experiments``), as evidence for BENCHMARKS.md's "why not":

- ``spiral-sde``: the true drift ``A z^3`` alone, and the true SDE (diffusion
  ``SPIRAL_DIFFUSION * z``) over ten noise keys; torchsde Milstein from ``dt = 1`` at the
  experiment's tolerance, ``paths`` sampled paths.
- ``latent-ode``: per series a rotation at its frequency (a state ``(x, y, omega)``, ``omega``
  constant), latent amplitude ``amp`` (the KL term keeps ``z(t0)`` near unit scale), solved by
  dopri5 at the experiment's tolerance on the union of a test batch's observation times, like
  the model's evaluation. Frequencies are drawn from the experiment's range (seeded), not
  recovered from the generator.

    python benchmarks/true_dynamics_nfe.py
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import torch

import regnde
from regnde.experiments import data as D
from regnde.experiments.latent import LatentConfig
from regnde.experiments.sde import SPIRAL_A, SPIRAL_DIFFUSION, SpiralConfig

RESULTS = Path(__file__).resolve().parent / "results" / "experiments"


class TrueSpiral(torch.nn.Module):
    """The spiral SDE of ``spiral-sde``'s data: drift ``A z^3``, diagonal diffusion ``s z``."""

    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, diffusion: float):
        super().__init__()
        self.a = torch.tensor(SPIRAL_A, dtype=torch.float32)
        self.s = diffusion

    def f(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (y**3) @ self.a

    def g(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.s * y


def rotation(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, v, w = y[..., 0], y[..., 1], y[..., 2]
    return torch.stack([-w * v, w * x, torch.zeros_like(w)], -1)


def vanilla_nfe(experiment: str) -> str:
    runs = sorted((RESULTS / experiment / "none").glob("seed*/results.json"))
    nfe = [json.loads(p.read_text())["eval_nfe"] for p in runs]
    return f"{statistics.fmean(nfe):.1f} ({len(nfe)} seeds)" if nfe else "no runs found"


def spiral() -> None:
    c = SpiralConfig()
    y0 = torch.tensor([[2.0, 0.0]]).expand(c.paths, 2).contiguous()
    t = torch.linspace(0.0, 1.0, c.n_times)
    kw = dict(backend="torchsde", method=c.method, rtol=c.rtol, atol=c.atol, adaptive=True,
              dt=c.dt)
    drift = regnde.solve(TrueSpiral(0.0), y0, t, key=0, **kw).stats.nfe
    true = TrueSpiral(SPIRAL_DIFFUSION)
    noisy = [int(regnde.solve(true, y0, t, key=k, **kw).stats.nfe) for k in range(10)]
    print(f"spiral-sde ({c.method}, rtol=atol={c.rtol:g}, dt={c.dt:g}, {c.paths} paths): true "
          f"drift alone {int(drift)} NFE; true SDE {min(noisy)}-{max(noisy)} (mean "
          f"{statistics.fmean(noisy):.0f}, 10 keys); vanilla's evaluation NFE "
          f"{vanilla_nfe('spiral-sde')}")


def latent(amp: float = 1.0, batch: int = 64) -> None:
    c = LatentConfig()
    recs = D.irregular_series(c.n_test, c.n_points, c.dim, 2, c.horizon,
                              (c.freq_min, c.freq_max), c.missing, c.decay).items
    rng = np.random.default_rng(0)
    nfes = []
    for start in range(0, len(recs) - batch + 1, batch):
        tt = np.unique(np.concatenate([r[1] for r in recs[start:start + batch]]))
        t = torch.tensor(np.concatenate([[0.0], tt]), dtype=torch.float32)
        w = torch.tensor(rng.uniform(c.freq_min, c.freq_max, batch) * np.pi, dtype=torch.float32)
        phase = torch.tensor(rng.uniform(0, 2 * np.pi, batch), dtype=torch.float32)
        y0 = torch.stack([amp * torch.cos(phase), amp * torch.sin(phase), w], -1)
        sol = regnde.solve(rotation, y0, t, backend="torchdiffeq", method="dopri5",
                           rtol=c.rtol, atol=c.atol)
        nfes.append(int(sol.stats.nfe))
    print(f"latent-ode (dopri5, rtol=atol={c.rtol:g}, horizon {c.horizon:g}, {c.freq_min:g}-"
          f"{c.freq_max:g} half cycles per unit time, latent amplitude {amp:g}): exact rotations "
          f"{nfes} NFE per test batch of {batch}; vanilla's evaluation NFE "
          f"{vanilla_nfe('latent-ode')}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    spiral()
    latent()
