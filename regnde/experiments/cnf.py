"""``cnf-2d``: an FFJORD-style continuous normalizing flow.

The state is ``[z; logdet]``: ``dz/dt = f(t, z)`` and ``dlogdet/dt = tr(df/dz)``, estimated with
Hutchinson's estimator ``e^T (df/dz) e`` (Gaussian ``e`` drawn once per solve, as FFJORD does) in
training; evaluation uses the exact trace when the data has at most ``exact_trace_max_dim``
dimensions. Data ``x = z(0)`` flows to the base distribution ``N(0, I)`` at ``t = 1``;
``log p(x) = log N(z(1)) + logdet(1)``. Metric: negative log-likelihood in nats (lower is
better). Data: scikit-learn's moons (default) or circles (``--set dataset=circles``), or
MINIBOONE with ``--data PATH``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from regnde.experiments import data as D
from regnde.experiments.base import Config, register
from regnde.experiments.node import ArrayExperiment, Arrays
from regnde.experiments.torch_common import Output, TimeMLP


@dataclass
class CNFConfig(Config):
    """``hidden``/``layers``: width and number of hidden layers of ``f``; ``n_*``: sizes of the
    2-D splits; ``dataset``: ``moons`` or ``circles``."""

    iters: int = 500
    batch_size: int = 256
    rtol: float = 1e-5
    atol: float = 1e-5
    hidden: int = 64
    layers: int = 2
    dataset: str = "moons"
    n_train: int = 4096
    n_val: int = 1024
    n_test: int = 1024
    exact_trace_max_dim: int = 8


class CNFField(nn.Module):
    """The augmented vector field ``(t, [z; logdet]) -> [f; tr(df/dz)]`` of shape ``(B, D+1)``.

    Set ``noise`` (``(B, D)``) before a solve for Hutchinson's estimator, or ``exact = True``.
    """

    def __init__(self, dim: int, hidden: int, layers: int):
        super().__init__()
        self.net = TimeMLP((dim, *([hidden] * layers), dim))
        self.noise: torch.Tensor | None = None
        self.exact = False

    def forward(self, t: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        create_graph = torch.is_grad_enabled()
        with torch.enable_grad():
            z = state[..., :-1]
            if not z.requires_grad:
                z = z.detach().requires_grad_(True)
            dz = self.net(t, z)
            if self.exact:
                div: Any = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=create_graph,
                                              retain_graph=True)[0][:, i]
                          for i in range(z.shape[-1]))
            else:
                assert self.noise is not None, "set CNFField.noise before solving"
                vjp = torch.autograd.grad(dz, z, self.noise, create_graph=create_graph)[0]
                div = (vjp * self.noise).sum(dim=-1)
        out = torch.cat([dz, div.unsqueeze(-1)], dim=-1)
        return out if create_graph else out.detach()


@register
class CNF2D(ArrayExperiment):
    """FFJORD-style CNF on 2-D toy data (or MINIBOONE)."""

    name = "cnf-2d"
    metric = "nll"
    higher_is_better = False
    select_tolerance = 0.05
    select_relative = True
    lam_defaults: ClassVar[dict[str, str]] = {
        "error": "1.0", "stiffness": "0.01", "taylor": "1e-2", "rnode": "0.01", "steer": "0.5"}
    config_class = CNFConfig
    config: CNFConfig
    data_help = "MINIBOONE data.npy (N, 43) or a directory holding miniboone/data.npy"

    @classmethod
    def full_config(cls) -> dict[str, Any]:
        return {"iters": 10000, "layers": 3, "batch_size": 1000}

    def load_data(self) -> dict[str, Any]:
        c = self.config
        if self.data is not None:
            parts = D.load_miniboone(self.data)
        else:
            parts = {k: D.toy_2d(c.dataset, n, seed)
                     for k, n, seed in (("train", c.n_train, 0), ("val", c.n_val, 1),
                                        ("test", c.n_test, 2))}
        out = {}
        for k, x in parts.items():
            t = torch.from_numpy(np.ascontiguousarray(x))
            out[k] = (t, torch.zeros(len(t), dtype=t.dtype))
        self.dim = out["train"][0].shape[1]
        return out

    def build_model(self) -> nn.Module:
        return CNFField(self.dim, self.config.hidden, self.config.layers)

    def forward(self, batch: Arrays, regularizer: Any, key: int, gen: torch.Generator,
                train: bool) -> Output:
        x, _ = batch
        field: CNFField = self.model  # type: ignore[assignment]
        field.exact = not train and self.dim <= self.config.exact_trace_max_dim
        field.noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        state = torch.cat([x, torch.zeros(len(x), 1, dtype=x.dtype)], dim=-1)
        sol = self.solve(field, state, torch.tensor([0.0, 1.0], dtype=state.dtype), regularizer,
                         key)
        z1, logdet = sol.ys[-1][:, :-1], sol.ys[-1][:, -1]
        log_base = -0.5 * (z1**2).sum(-1) - 0.5 * self.dim * math.log(2 * math.pi)
        nll = -(log_base + logdet)
        return Output(loss=nll.mean(), reg=sol.reg, nfe=float(sol.stats.nfe),
                      nfe_reg=float(sol.stats.nfe_reg), count=len(x),
                      metric_sum=float(nll.detach().sum()))
