"""Neural ODE experiments on fixed arrays: ``digits-node`` (classifier) and ``toy-cubic``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from regnde.experiments import data as D
from regnde.experiments.base import Config, register
from regnde.experiments.torch_common import (
    Output,
    TimeMLP,
    TorchExperiment,
    chunks,
    classified,
    random_rows,
    split_indices,
)

Arrays = tuple[torch.Tensor, torch.Tensor]


class ArrayExperiment(TorchExperiment):
    """Splits are ``(x, y)`` tensor pairs; batches are row subsets."""

    def sample_batch(self, split: Arrays, gen: torch.Generator) -> Arrays:
        rows = random_rows(len(split[0]), self.config.batch_size, gen)
        return split[0][rows], split[1][rows]

    def eval_batches(self, split: Arrays) -> list[Arrays]:
        return [(split[0][s], split[1][s]) for s in chunks(len(split[0]), self.config.batch_size)]


Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def hold_out(x: np.ndarray, y: np.ndarray, test: tuple[np.ndarray, np.ndarray]) -> Splits:
    """``train``/``val``/``test`` from a training and a test set: validation is a fixed 10% of
    the training set (a seeded permutation)."""
    perm = np.random.default_rng(0).permutation(len(x))
    n_val = max(len(x) // 10, 1)
    va, tr = perm[:n_val], perm[n_val:]
    return {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": test}


def limited(parts: Splits, n_train: int, n_eval: int) -> Splits:
    """``parts`` as contiguous arrays, cut to ``n_train`` training and ``n_eval`` evaluation
    examples (0: all)."""
    out = {}
    for k, (xs, ys) in parts.items():
        n = n_train if k == "train" else n_eval
        if n > 0:
            xs, ys = xs[:n], ys[:n]
        out[k] = (np.ascontiguousarray(xs), np.ascontiguousarray(ys))
    return out


@dataclass
class ClassifierConfig(Config):
    """``t1``: integration time. ``n_train``/``n_eval``: keep only that many training /
    evaluation examples (0: all)."""

    t1: float = 1.0
    n_train: int = 0
    n_eval: int = 0


@dataclass
class DigitsConfig(ClassifierConfig):
    """``hidden``: width of the vector field's hidden layer; ``val_fraction``/``test_fraction``
    of scikit-learn's digits."""

    hidden: int = 100
    val_fraction: float = 0.15
    test_fraction: float = 0.15


def digits_splits(c: DigitsConfig, data: str | None) -> Splits:
    """The ``train``/``val``/``test`` splits of ``digits-node`` as contiguous NumPy arrays
    ``(x float32 (N, d), y int64 (N,))``: scikit-learn's digits with a fixed 70/15/15 split, or
    MNIST IDX files under ``data`` (validation: a fixed 10% of the training set). Shared by
    the torch and the JAX implementation, so both see the same examples."""
    if data is None:
        x, y = D.digits()
        tr, va, te = split_indices(len(x), (c.val_fraction, c.test_fraction))
        parts = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": (x[te], y[te])}
    else:
        mnist = D.load_mnist(data)
        parts = hold_out(*mnist["train"], mnist["test"])
    return limited(parts, c.n_train, c.n_eval)


class ClassifierExperiment(ArrayExperiment):
    """Classification by the state at ``config.t1`` of a differential equation started at
    :meth:`initial` of the input; ``model.head`` maps that state ``(B, d)`` to logits
    ``(B, classes)``. Subclasses give :meth:`arrays` and ``build_model``; an SDE variant
    overrides :meth:`solve_to_t1`. Metric: accuracy."""

    metric = "accuracy"
    higher_is_better = True
    select_tolerance = 0.01
    config: ClassifierConfig

    def arrays(self) -> Splits:
        """The ``train``/``val``/``test`` arrays ``(x float32 (N, d), y int64 (N,))``."""
        raise NotImplementedError

    def load_data(self) -> dict[str, Any]:
        out = {k: (torch.from_numpy(xs), torch.from_numpy(ys))
               for k, (xs, ys) in self.arrays().items()}
        self.dim = out["train"][0].shape[1]
        return out

    def initial(self, x: torch.Tensor) -> torch.Tensor:
        """The initial state ``(B, d)`` for inputs ``x``: the inputs themselves."""
        return x

    def solve_to_t1(self, z0: torch.Tensor, regularizer: Any, key: int) -> Any:
        """The solution of ``model.func`` from ``z0`` over ``[0, t1]`` (differentiable)."""
        t = torch.tensor([0.0, self.config.t1], dtype=torch.float32)
        return self.solve(self.model.func, z0, t, regularizer, key)

    def forward(self, batch: Arrays, regularizer: Any, key: int, gen: torch.Generator,
                train: bool) -> Output:
        x, y = batch
        sol = self.solve_to_t1(self.initial(x), regularizer, key)
        return classified(self.model.head(sol.ys[-1]), y, sol)


class Classifier(nn.Module):
    """``func``: the ODE's vector field on the input space; ``head``: linear classifier."""

    def __init__(self, dim: int, hidden: int, classes: int):
        super().__init__()
        self.func = TimeMLP((dim, hidden, dim))
        self.head = nn.Linear(dim, classes)


@register
class DigitsNODE(ClassifierExperiment):
    """A neural ODE classifier: ``z(1)`` of ``dz/dt = f([z; t])`` with ``z(0) = x``, then a
    linear head. scikit-learn's 8x8 digits by default (70/15/15 split, fixed), real MNIST with
    ``--data DIR`` (IDX files; validation = 10% of the training set)."""

    name = "digits-node"
    lam_defaults: ClassVar[dict[str, str]] = {
        "error": "2.5:1.0", "stiffness": "0.01", "taylor": "6e-5", "rnode": "0.01",
        "steer": "0.5"}
    config_class = DigitsConfig
    config: DigitsConfig
    data_help = "a directory with the four MNIST IDX files (optionally .gz)"

    @classmethod
    def full_config(cls) -> dict[str, Any]:
        return {"iters": 3000}

    def arrays(self) -> Splits:
        return digits_splits(self.config, self.data)

    def build_model(self) -> nn.Module:
        return Classifier(self.dim, self.config.hidden, 10)


@dataclass
class CubicConfig(Config):
    """``hidden``: width of the two hidden layers; ``n_*``: sizes of the fixed splits; inputs
    ``z(0) ~ U[-range, range]``. ``range`` 2 (targets up to 10): vanilla's training NFE grows
    from about 41 to 80 as the field learns the cubic's fast ends; on ``[-1, 1]`` it stayed
    flat (30 -> 34), so no regularizer could show an effect."""

    hidden: int = 32
    n_train: int = 1024
    n_val: int = 256
    n_test: int = 256
    range: float = 2.0


@register
class ToyCubic(ArrayExperiment):
    """TayNODE's toy problem: learn the map ``z(1) = z(0) + z(0)^3`` with a 1-D neural ODE;
    metric: mean squared error (lower is better)."""

    name = "toy-cubic"
    metric = "mse"
    higher_is_better = False
    select_tolerance = 0.05
    select_relative = True
    lam_defaults: ClassVar[dict[str, str]] = {
        "error": "1.0", "stiffness": "0.01", "taylor": "1e-2", "rnode": "0.01", "steer": "0.5"}
    config_class = CubicConfig
    config: CubicConfig

    @classmethod
    def full_config(cls) -> dict[str, Any]:
        return {"iters": 3000}

    def load_data(self) -> dict[str, Any]:
        c = self.config
        rng = np.random.default_rng(0)
        out = {}
        for k, n in (("train", c.n_train), ("val", c.n_val), ("test", c.n_test)):
            x = rng.uniform(-c.range, c.range, size=(n, 1)).astype(np.float32)
            out[k] = (torch.from_numpy(x), torch.from_numpy(x + x**3))
        return out

    def build_model(self) -> nn.Module:
        h = self.config.hidden
        return TimeMLP((1, h, h, 1))

    def forward(self, batch: Arrays, regularizer: Any, key: int, gen: torch.Generator,
                train: bool) -> Output:
        x, y = batch
        sol = self.solve(self.model, x, torch.tensor([0.0, 1.0], dtype=x.dtype), regularizer,
                         key)
        err = ((sol.ys[-1] - y) ** 2).mean(dim=-1)
        return Output(loss=err.mean(), reg=sol.reg, nfe=float(sol.stats.nfe),
                      nfe_reg=float(sol.stats.nfe_reg), count=len(y),
                      metric_sum=float(err.detach().sum()))
