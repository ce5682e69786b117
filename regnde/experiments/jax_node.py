"""``digits-node`` on JAX: the neural ODE classifier in equinox, solved with
``regnde.solve(..., backend="diffrax")`` inside ``eqx.filter_jit``.

The same experiment as :class:`regnde.experiments.node.DigitsNODE` (``--backend torchdiffeq``)
with only the framework changed, so that NFE and accuracy can be compared across backends:

- same data and split (:func:`regnde.experiments.node.digits_splits`), same configuration
  class, defaults, coefficient schedules and selection rule;
- same initial weights: the torch model is built with ``torch.manual_seed(seed)`` exactly as the
  torch variant does, and its weights are copied (float32);
- same batches: drawn with a ``torch.Generator`` seeded with ``seed``, as the torch variant;
- same optimizer: Adam with torch's defaults and torch's update formula (:func:`adam_update`);
- the regularizer's key of iteration ``i`` is ``jax.random.key((seed * 1_000_003 + i) % 2**62)``,
  the integer the torch variant seeds its sampler with.

One training step is one compiled call. The coefficients of the schedule enter it as an array,
so it compiles once per run (and once per resumed session), not once per iteration; the
compilation time is part of the first step's time and thus of ``training_seconds``.

Checkpoints keep the runner's safe format: parameters and Adam moments are stored as torch
tensors under the torch model's ``state_dict`` names (``func.layers.0.weight``, ...), plus the
batch generator's state. This module is the only one of the experiments that imports JAX.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch

import regnde
from regnde.experiments.base import Experiment, register
from regnde.experiments.node import Classifier as TorchClassifier
from regnde.experiments.node import DigitsConfig, DigitsNODE, digits_splits
from regnde.experiments.torch_common import EVAL_SEED, chunks, random_rows
from regnde.regularizers import Regularizer, Sum

BETAS = (0.9, 0.999)
EPS = 1e-8
Params = dict[str, jax.Array]


# -- the model ----------------------------------------------------------------------------------
class TimeMLP(eqx.Module):
    """``f(t, z)``: an MLP with the time appended to the input of every layer, ``tanh`` between
    layers (:class:`regnde.experiments.torch_common.TimeMLP` in equinox). Weights have torch's
    layout ``(out, in + 1)``; ``z`` has shape ``(B, d)``, ``t`` is a scalar."""

    weights: tuple[jax.Array, ...]
    biases: tuple[jax.Array, ...]

    def __call__(self, t: jax.Array, z: jax.Array) -> jax.Array:
        tt = jnp.broadcast_to(jnp.asarray(t, dtype=z.dtype), (*z.shape[:-1], 1))
        h = z
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = jnp.concatenate([h, tt], axis=-1) @ w.T + b
            if i < len(self.weights) - 1:
                h = jnp.tanh(h)
        return h


class Classifier(eqx.Module):
    """``func``: the ODE's vector field; ``head_weight``/``head_bias``: the linear classifier."""

    func: TimeMLP
    head_weight: jax.Array
    head_bias: jax.Array

    def head(self, z: jax.Array) -> jax.Array:
        """Logits of the final state ``z`` ``(B, d)``."""
        return z @ self.head_weight.T + self.head_bias


def to_params(model: Classifier) -> Params:
    """The parameters under the torch model's ``state_dict`` names."""
    out = {f"func.layers.{i}.weight": w for i, w in enumerate(model.func.weights)}
    out.update({f"func.layers.{i}.bias": b for i, b in enumerate(model.func.biases)})
    out.update({"head.weight": model.head_weight, "head.bias": model.head_bias})
    return out


def from_params(params: dict[str, Any]) -> Classifier:
    """The model from :func:`to_params`'s dictionary (arrays converted to float32 JAX)."""
    n = sum(1 for k in params if k.startswith("func.layers.") and k.endswith(".weight"))

    def get(name: str) -> jax.Array:
        return jnp.asarray(np.asarray(params[name]), dtype=jnp.float32)

    func = TimeMLP(tuple(get(f"func.layers.{i}.weight") for i in range(n)),
                   tuple(get(f"func.layers.{i}.bias") for i in range(n)))
    return Classifier(func, get("head.weight"), get("head.bias"))


# -- Adam as torch.optim.Adam computes it ---------------------------------------------------------
def adam_update(model: Any, grads: Any, m: Any, v: Any, step: jax.Array, lr: float
                ) -> tuple[Any, Any, Any]:
    """One Adam step with torch's defaults and formula (``betas=(0.9, 0.999)``, ``eps=1e-8``,
    ``denom = sqrt(v) / sqrt(1 - b2^n) + eps``, step ``lr / (1 - b1^n)``); ``step`` is the new
    step count ``n``. Returns ``(model, m, v)``."""
    b1, b2 = BETAS
    n = step.astype(jnp.float32)
    bc1 = 1 - jnp.float32(b1) ** n
    bc2_sqrt = jnp.sqrt(1 - jnp.float32(b2) ** n)
    m = jax.tree.map(lambda m, g: m + (1 - b1) * (g - m), m, grads)
    v = jax.tree.map(lambda v, g: v * b2 + (1 - b2) * g * g, v, grads)
    updates = jax.tree.map(lambda m, v: -(lr / bc1) * m / (jnp.sqrt(v) / bc2_sqrt + EPS), m, v)
    return eqx.apply_updates(model, updates), m, v


# -- one compiled training step and one compiled prediction ---------------------------------------
class _Weighted(Sum):
    """``sum_k lam[k] * R_k`` with coefficients that may be traced (the schedule's values enter
    the compiled step as an array). Keys as :class:`regnde.regularizers.Sum`: one term uses the
    key itself, several ``key.fold(k)``."""

    def __repr__(self) -> str:
        return " + ".join(f"lam[{i}] * {r!r}" for i, (_, r) in enumerate(self._terms))


@dataclass(frozen=True)
class _Settings:
    """The static part of the compiled calls (hashable; one compilation per distinct value)."""

    method: str
    rtol: float
    atol: float
    sensitivity: str
    max_steps: int
    lr: float
    terms: tuple[Regularizer, ...]


def _forward(model: Classifier, x: jax.Array, y: jax.Array, t: jax.Array, key: jax.Array,
             lam: jax.Array | None, s: _Settings) -> tuple[jax.Array, dict[str, jax.Array]]:
    reg = None
    if s.terms and lam is not None:
        # traced coefficients where Sum declares floats (Sum only multiplies by them)
        reg = _Weighted(cast(list[tuple[float, Regularizer]],
                             [(lam[i], r) for i, r in enumerate(s.terms)]))
    sol = regnde.solve(model.func, x, t, backend="diffrax", method=s.method or None,
                       rtol=s.rtol, atol=s.atol, sensitivity=s.sensitivity, regularizer=reg,
                       key=key, max_steps=s.max_steps, trace="summary")
    logits = model.head(sol.ys[-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    task = -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=-1))
    value = jnp.zeros((), logits.dtype) if sol.reg is None else sol.reg
    aux = {"task_loss": task, "reg": value, "nfe": sol.stats.nfe, "nfe_reg": sol.stats.nfe_reg,
           "correct": jnp.sum(jnp.argmax(logits, axis=-1) == y)}
    return task + value, aux


@eqx.filter_jit
def _train_step(model: Classifier, m: Any, v: Any, step: jax.Array, x: jax.Array, y: jax.Array,
                t: jax.Array, key: jax.Array, lam: jax.Array, s: _Settings
                ) -> tuple[Classifier, Any, Any, dict[str, jax.Array]]:
    (loss, aux), grads = eqx.filter_value_and_grad(_forward, has_aux=True)(
        model, x, y, t, key, lam, s)
    model, m, v = adam_update(model, grads, m, v, step, s.lr)
    return model, m, v, dict(aux, loss=loss)


@eqx.filter_jit
def _predict(model: Classifier, x: jax.Array, y: jax.Array, t: jax.Array, key: jax.Array,
             s: _Settings) -> dict[str, jax.Array]:
    _, aux = _forward(model, x, y, t, key, None, s)
    return aux


# -- the experiment -------------------------------------------------------------------------------
Split = tuple[np.ndarray, np.ndarray]


@register
class JaxDigitsNODE(Experiment):
    """``digits-node`` on ``--backend diffrax`` (see the module docstring): the same data,
    architecture, initial weights, batches, optimizer, tolerances, schedules and selection as
    the torch variant, in equinox under ``eqx.filter_jit``."""

    name = DigitsNODE.name
    backends = ("diffrax",)
    metric = DigitsNODE.metric
    higher_is_better = DigitsNODE.higher_is_better
    select_tolerance = DigitsNODE.select_tolerance
    lam_defaults: ClassVar[dict[str, str]] = dict(DigitsNODE.lam_defaults)
    config_class = DigitsConfig
    config: DigitsConfig
    data_help = DigitsNODE.data_help

    @classmethod
    def full_config(cls) -> dict[str, Any]:
        return DigitsNODE.full_config()

    @classmethod
    def check_available(cls, backend: str) -> None:
        if "diffrax" not in regnde.backends():
            raise ValueError("digits-node --backend diffrax needs regnde's diffrax backend "
                             "(pip install 'regnde[jax]').")

    def setup(self) -> None:
        torch.manual_seed(self.seed)
        self.gen = torch.Generator().manual_seed(self.seed)
        self.splits: dict[str, Split] = {
            k: (xs.astype(np.float32), ys.astype(np.int32))
            for k, (xs, ys) in digits_splits(self.config, self.data).items()}
        torch.manual_seed(self.seed)  # the torch variant's initial weights, copied
        dim = self.splits["train"][0].shape[1]
        init = TorchClassifier(dim, self.config.hidden, 10).float()
        self.model = from_params({k: p.detach().numpy() for k, p in init.state_dict().items()})
        zeros = jax.tree.map(jnp.zeros_like, self.model)
        self.m, self.v, self.step = zeros, zeros, 0
        self.t = jnp.asarray([0.0, self.config.t1], dtype=jnp.float32)

    def _settings(self, terms: tuple[Regularizer, ...]) -> _Settings:
        c = self.config
        return _Settings(method=c.method, rtol=c.rtol, atol=c.atol, sensitivity=c.sensitivity,
                         max_steps=c.max_steps, lr=c.lr, terms=terms)

    def train_step(self, iteration: int, regularizer: Any) -> dict[str, float]:
        x, y = self.splits["train"]
        rows = random_rows(len(x), self.config.batch_size, self.gen).numpy()
        terms = [] if regularizer is None else regularizer.terms()
        if any(r.name == "steer" for _, r in terms):
            raise ValueError("steer is not available on the diffrax digits-node yet; use "
                             "--backend torchdiffeq, or regnde.steer(t, b, key) in your own loop.")
        lam = jnp.asarray([c for c, _ in terms] or [0.0], dtype=jnp.float32)
        key = jax.random.key((self.seed * 1_000_003 + iteration) % 2**62)
        self.model, self.m, self.v, out = _train_step(
            self.model, self.m, self.v, jnp.asarray(self.step + 1, dtype=jnp.int32),
            jnp.asarray(x[rows]), jnp.asarray(y[rows]), self.t, key, lam,
            self._settings(tuple(r for _, r in terms)))
        self.step += 1
        return {"loss": float(out["loss"]), "task_loss": float(out["task_loss"]),
                "reg": float(out["reg"]), "nfe": float(out["nfe"]),
                "nfe_reg": float(out["nfe_reg"])}

    def evaluate(self, split: str) -> dict[str, float]:
        x, y = self.splits[split]
        settings = self._settings(())
        nfe, seconds, loss, correct, count = [], [], 0.0, 0.0, 0
        compiled: set[int] = set()
        for i, rows in enumerate(chunks(len(x), self.config.batch_size)):
            xb, yb = jnp.asarray(x[rows]), jnp.asarray(y[rows])
            key = jax.random.key(EVAL_SEED + i)
            if len(yb) not in compiled:  # compile outside the timed call
                jax.block_until_ready(_predict(self.model, xb, yb, self.t, key, settings))
                compiled.add(len(yb))
            start = time.perf_counter()
            out = jax.block_until_ready(_predict(self.model, xb, yb, self.t, key, settings))
            seconds.append(time.perf_counter() - start)
            nfe.append(float(out["nfe"]))
            loss += float(out["task_loss"]) * len(yb)
            correct += float(out["correct"])
            count += len(yb)
        return {"metric": correct / count, "loss": loss / count, "nfe": float(np.mean(nfe)),
                "seconds_per_batch": float(np.mean(seconds)),
                "seconds_per_batch_median": float(np.median(seconds[1:] or seconds)),
                "warmup_seconds": float(seconds[0]), "batches": len(nfe),
                "examples": count}

    def state(self) -> dict[str, Any]:
        def tensors(tree: Classifier) -> dict[str, torch.Tensor]:
            return {k: torch.from_numpy(np.array(a)) for k, a in to_params(tree).items()}

        return {"model": tensors(self.model),
                "optimizer": {"step": self.step, "exp_avg": tensors(self.m),
                              "exp_avg_sq": tensors(self.v)},
                "gen": self.gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        try:
            expected = {k: tuple(a.shape) for k, a in to_params(self.model).items()}
            trees = []
            for part in (state["model"], state["optimizer"]["exp_avg"],
                         state["optimizer"]["exp_avg_sq"]):
                found = {k: tuple(t.shape) for k, t in part.items()}
                if found != expected:
                    raise ValueError(f"parameters {found} differ from this model's {expected}")
                trees.append(from_params({k: t.numpy() for k, t in part.items()}))
            step = int(state["optimizer"]["step"])
            self.gen.set_state(state["gen"])
        except (KeyError, RuntimeError, ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"the checkpoint does not fit this model: {exc}") from None
        self.model, self.m, self.v = trees
        self.step = step

    def versions(self) -> dict[str, str]:
        from importlib.metadata import PackageNotFoundError, version

        out = {"python": platform.python_version(), "regnde": regnde.__version__,
               "jax": jax.__version__, "numpy": np.__version__, "torch": torch.__version__,
               "jax_platform": jax.default_backend(),
               "xla_flags": os.environ.get("XLA_FLAGS", "")}
        for dist in ("jaxlib", "equinox", "diffrax", "scikit-learn"):
            try:
                out[dist] = version(dist)
            except PackageNotFoundError:
                pass
        return out
