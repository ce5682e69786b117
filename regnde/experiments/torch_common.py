"""The torch side shared by the torch experiments: training step, evaluation, state, models.

A :class:`TorchExperiment` subclass provides data (:meth:`TorchExperiment.load_data`), a model
(:meth:`TorchExperiment.build_model`), a batch sampler and :meth:`TorchExperiment.forward`,
which runs the model through :meth:`TorchExperiment.solve` (the one place that calls
``regnde.solve``) and returns the task loss. Randomness comes from ``self.gen`` (batches,
Hutchinson noise, reparameterisation), whose state is checkpointed with the model and the
optimizer, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import itertools
import platform
import time
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

import regnde
from regnde.experiments.base import Experiment

EVAL_SEED = 12345


@dataclass
class Output:
    """What :meth:`TorchExperiment.forward` returns for one batch.

    Attributes:
        loss: scalar task loss (differentiable). reg: the solve's regularizer value or ``None``.
        nfe: forward evaluations. nfe_reg: the regularizer's extra evaluations.
        correct: number of correct predictions (classifiers) or ``None``.
        count: examples in the batch. metric_sum: sum of the per-example metric (regressors).
    """

    loss: torch.Tensor
    reg: torch.Tensor | None
    nfe: float
    nfe_reg: float
    count: int
    metric_sum: float


def classified(logits: torch.Tensor, y: torch.Tensor, sol: regnde.Solution) -> Output:
    """The :class:`Output` of a classifier: cross-entropy of ``logits`` ``(B, classes)``
    against labels ``y`` ``(B,)``, the number correct, and the solve's regularizer and NFE."""
    loss = nn.functional.cross_entropy(logits, y)
    correct = float((logits.argmax(-1) == y).sum())
    return Output(loss=loss, reg=sol.reg, nfe=float(sol.stats.nfe),
                  nfe_reg=float(sol.stats.nfe_reg), count=len(y), metric_sum=correct)


class TimeMLP(nn.Module):
    """``f(t, z)``: an MLP with the time appended to the input of every layer.

    ``dims = (d, h1, ..., d)``; ``tanh`` between layers. Input ``z`` of shape ``(B, d)``, scalar
    ``t``; returns ``(B, d)``.
    """

    def __init__(self, dims: tuple[int, ...], activation: type[nn.Module] = nn.Tanh):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a + 1, b) for a, b in itertools.pairwise(dims))
        self.act = activation()

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        tt = torch.as_tensor(t, dtype=z.dtype).reshape(1, 1).expand(*z.shape[:-1], 1)
        h = z
        for i, layer in enumerate(self.layers):
            h = layer(torch.cat([h, tt], dim=-1))
            if i < len(self.layers) - 1:
                h = self.act(h)
        return h


class TorchExperiment(Experiment):
    """An experiment in torch on ``regnde.solve`` (backends ``torchdiffeq``/``torchsde``)."""

    splits: dict[str, Any]
    model: Any  # the experiment's nn.Module (subclasses reach its submodules)

    # -- what subclasses provide -----------------------------------------------------------
    @abstractmethod
    def load_data(self) -> dict[str, Any]:
        """The ``train``, ``val`` and ``test`` splits (any structure :meth:`batches` reads)."""

    @abstractmethod
    def build_model(self) -> nn.Module:
        """The model (every trained parameter), built after ``torch.manual_seed(seed)``."""

    @abstractmethod
    def sample_batch(self, split: Any, gen: torch.Generator) -> Any:
        """A random training batch drawn with ``gen``."""

    @abstractmethod
    def eval_batches(self, split: Any) -> list[Any]:
        """The evaluation batches of a split, in a fixed order."""

    @abstractmethod
    def forward(self, batch: Any, regularizer: Any, key: int, gen: torch.Generator,
                train: bool) -> Output:
        """Run the model on ``batch``; ``key`` seeds the regularizer's sampler."""

    # -- the solve ---------------------------------------------------------------------------
    def solve(self, f: Any, y0: torch.Tensor, t: torch.Tensor, regularizer: Any, key: int,
              **options: Any) -> regnde.Solution:
        """``regnde.solve`` with the experiment's backend, method, tolerances and limits; a STEER
        term becomes ``steer=b`` while training."""
        from regnde.experiments.specs import split_steer

        c = self.config
        regularizer, b = split_steer(regularizer, t)
        if b is not None and self.model.training:
            options.setdefault("steer", b)
        return regnde.solve(f, y0, t, backend=self.backend, method=c.method or None, rtol=c.rtol,
                            atol=c.atol, sensitivity=c.sensitivity, regularizer=regularizer,
                            key=key, max_steps=c.max_steps, trace="summary", **options)

    # -- Experiment ------------------------------------------------------------------------------
    def setup(self) -> None:
        torch.manual_seed(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.splits = self.load_data()
        torch.manual_seed(self.seed)
        self.model = self.build_model().float()  # the experiments run in float32
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.config.lr)

    def train_step(self, iteration: int, regularizer: Any) -> dict[str, float]:
        self.model.train()
        batch = self.sample_batch(self.splits["train"], self.gen)
        key = (self.seed * 1_000_003 + iteration) % 2**62
        out = self.forward(batch, regularizer, key, self.gen, train=True)
        loss = out.loss if out.reg is None else out.loss + out.reg
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return {"loss": float(loss.detach()), "task_loss": float(out.loss.detach()),
                "reg": 0.0 if out.reg is None else float(out.reg.detach()),
                "nfe": float(out.nfe), "nfe_reg": float(out.nfe_reg)}

    def evaluate(self, split: str) -> dict[str, float]:
        self.model.eval()
        gen = torch.Generator().manual_seed(EVAL_SEED)
        nfe, seconds, loss, metric, count = [], [], 0.0, 0.0, 0
        for i, batch in enumerate(self.eval_batches(self.splits[split])):
            start = time.perf_counter()
            with torch.no_grad():
                out = self.forward(batch, None, EVAL_SEED + i, gen, train=False)
            seconds.append(time.perf_counter() - start)
            nfe.append(out.nfe)
            loss += float(out.loss) * out.count
            metric += out.metric_sum
            count += out.count
        return {"metric": metric / count, "loss": loss / count, "nfe": float(np.mean(nfe)),
                "seconds_per_batch": float(np.mean(seconds)),
                "seconds_per_batch_median": float(np.median(seconds[1:] or seconds)),
                "warmup_seconds": float(seconds[0]), "batches": len(nfe),
                "examples": count}

    def state(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.gen.set_state(state["gen"])
            torch.set_rng_state(state["torch_rng"])
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise ValueError(f"the checkpoint does not fit this model: {exc}") from None

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {"python": platform.python_version(), "regnde": regnde.__version__,
               "torch": torch.__version__, "numpy": np.__version__,
               "torch_threads": str(torch.get_num_threads())}
        for dist in ("torchdiffeq", "torchsde", "scikit-learn"):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                pass
        return out


# -- batching helpers -------------------------------------------------------------------------
def random_rows(n: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """``size`` row indices drawn without replacement (all rows if ``size >= n``)."""
    return torch.randperm(n, generator=gen)[: min(size, n)]


def chunks(n: int, size: int) -> list[slice]:
    """Consecutive slices of ``range(n)`` of length ``size`` (the last may be shorter)."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def split_indices(n: int, fractions: tuple[float, float], seed: int = 0
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fixed random train/val/test partition of ``range(n)``: ``fractions`` = (val, test).

    The partition depends on ``seed`` only (default 0), not on the run's seed, so every seed
    and regularizer sees the same splits.
    """
    perm = np.random.default_rng(seed).permutation(n)
    n_val, n_test = round(fractions[0] * n), round(fractions[1] * n)
    if n - n_val - n_test < 1 or n_val < 1 or n_test < 1:
        raise ValueError(f"{n} examples are too few for a train/val/test split.")
    return perm[n_val + n_test:], perm[:n_val], perm[n_val:n_val + n_test]
