"""MNIST-1D experiments: ``mnist1d-node`` (a neural ODE classifier) and ``mnist1d-nsde``.

MNIST-1D (Greydanus 2020) is a 40-sample 1-D analogue of MNIST that the ``mnist1d`` package
generates offline (4000 training, 1000 test sequences). It is small enough for two CPU cores
and, unlike scikit-learn's digits, hard enough that an unregularized model's dynamics stiffen as
it trains: the setting in which the regularizers are supposed to matter. The model follows the
seed papers' MNIST NODE (a dense encoder, an ODE block on a small latent state, a linear head),
scaled to 40-d inputs; the validation split is a fixed 10% of the training set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from regnde.experiments import data as D
from regnde.experiments.base import register
from regnde.experiments.node import (
    ClassifierConfig,
    ClassifierExperiment,
    Splits,
    hold_out,
    limited,
)
from regnde.experiments.sde import Diagonal, SDEClassifier, SDEModule
from regnde.experiments.torch_common import TimeMLP


@dataclass
class Mnist1dConfig(ClassifierConfig):
    """``latent``: size of the ODE state; ``hidden``: width of the vector field's two hidden
    layers; ``t1``: integration time; ``n_train``/``n_eval``: keep only that many examples
    (0: all)."""

    iters: int = 1200
    batch_size: int = 128
    lr: float = 3e-3
    rtol: float = 1e-6
    atol: float = 1e-6
    latent: int = 64
    hidden: int = 128


def mnist1d_splits(c: Mnist1dConfig) -> Splits:
    """``train``/``val``/``test``: the standard split, validation a fixed 10% of training."""
    parts = D.mnist1d()
    return limited(hold_out(*parts["train"], parts["test"]), c.n_train, c.n_eval)


class ODEClassifier(nn.Module):
    """``encode``: ``(B, 40) -> (B, latent)``; ``func``: the ODE's field on the latent state;
    ``head``: ``(B, latent) -> (B, 10)`` logits."""

    def __init__(self, dim: int, latent: int, hidden: int, classes: int):
        super().__init__()
        self.encode = nn.Sequential(nn.Linear(dim, latent), nn.Tanh())
        self.func = TimeMLP((latent, hidden, hidden, latent))
        self.head = nn.Linear(latent, classes)


@register
class Mnist1dNODE(ClassifierExperiment):
    """A neural ODE classifier on MNIST-1D: encode, ``z(t1)`` of ``dz/dt = f([z; t])``, linear
    head. Metric: accuracy."""

    name = "mnist1d-node"
    lam_defaults: ClassVar[dict[str, str]] = {
        "error": "1.0", "stiffness": "0.01", "taylor": "1e-3", "rnode": "0.01",
        "steer": "0.5"}
    config_class = Mnist1dConfig
    config: Mnist1dConfig

    def arrays(self) -> Splits:
        return mnist1d_splits(self.config)

    def build_model(self) -> nn.Module:
        c = self.config
        return ODEClassifier(self.dim, c.latent, c.hidden, 10)

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """The encoded inputs ``(B, latent)``."""
        return self.model.encode(x)


@dataclass
class Mnist1dSDEConfig(Mnist1dConfig):
    """``mnist1d-node``'s settings with torchsde's adaptive stepping: tolerances, the method
    and the initial ``dt`` (torchsde has no initial step selection).

    ``dt`` is the whole interval: torchsde's controller grows a step at most 1.4-fold, so from a
    small first step (0.05 took 7 steps over ``[0, 1]`` however smooth the drift) the step count
    has a floor that hides the drift's stiffening; from ``t1`` only the error sets it.
    Euler-Maruyama (``"euler"``): one drift evaluation per step, so the NFE follows the step
    count; with constant (additive) noise the noise cancels from the step-doubling error but for
    its drift-coupling term, and the drift's error drives the steps."""

    rtol: float = 1e-3
    atol: float = 1e-3
    method: str = "euler"
    dt: float = 1.0


@register
class Mnist1dNSDE(SDEClassifier, Mnist1dNODE):
    """``mnist1d-node`` as a neural SDE: the same drift, learned constant diagonal noise
    (torchsde, adaptive step doubling). The state at ``t1`` of one sampled path feeds the
    head."""

    name = "mnist1d-nsde"
    backends = ("torchsde",)
    config_class = Mnist1dSDEConfig
    config: Mnist1dSDEConfig  # type: ignore[assignment]
    # error: 1.0 collapses the solve to one Euler step (4 NFE) at -3.4 points of accuracy;
    # 0.1 gave 0.6x vanilla's NFE at equal accuracy (seed 0), so a x0.1/x1/x10 sweep brackets it
    lam_defaults: ClassVar[dict[str, str]] = {
        "error": "0.1", "stiffness": "0.01", "taylor": "1e-3", "rnode": "0.01", "steer": "0.5"}

    def build_model(self) -> nn.Module:
        c = self.config
        model = ODEClassifier(self.dim, c.latent, c.hidden, 10)
        model.sde = SDEModule(model.func, Diagonal(c.latent, constant=True, scale=0.0))
        return model
