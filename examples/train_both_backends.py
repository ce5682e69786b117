"""Train the same small neural ODE on torchdiffeq and on diffrax: only ``backend=`` changes
(plus the framework the model is written in).

    PYTHONPATH=. python examples/train_both_backends.py

Task: map points on a circle to points on a twice-as-large, rotated circle, with a local
error regularizer. Both runs start from the same weights and print loss, NFE and time.
"""

from __future__ import annotations

import time

import numpy as np

import regnde
from regnde import regularizers as R

DIM, HIDDEN, BATCH, ITERS, LR, LAM = 2, 32, 64, 40, 1e-2, 0.1
angles = np.linspace(0, 2 * np.pi, BATCH, endpoint=False)
X = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
Y = 2.0 * np.stack([np.cos(angles + 1.0), np.sin(angles + 1.0)], 1).astype(np.float32)
rng = np.random.default_rng(0)
INIT = {"w1": rng.normal(0, 0.5, (DIM, HIDDEN)).astype(np.float32),
        "b1": np.zeros(HIDDEN, np.float32),
        "w2": rng.normal(0, 0.5, (HIDDEN, DIM)).astype(np.float32),
        "b2": np.zeros(DIM, np.float32)}
SETTINGS = dict(method="dopri5", rtol=1e-5, atol=1e-5, regularizer=R.LocalError())


def train_torch() -> None:
    import torch

    class Field(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in INIT.items():
                setattr(self, k, torch.nn.Parameter(torch.tensor(v)))

        def forward(self, t, y):
            return torch.tanh(y @ self.w1 + self.b1) @ self.w2 + self.b2

    f = Field()
    opt = torch.optim.Adam(f.parameters(), lr=LR)
    x, y, t = torch.tensor(X), torch.tensor(Y), torch.tensor([0.0, 1.0])
    for i in range(ITERS):
        sol = regnde.solve(f, x, t, backend="torchdiffeq", key=i, **SETTINGS)
        loss = torch.mean((sol.ys[-1] - y) ** 2)
        opt.zero_grad()
        (loss + LAM * sol.reg).backward()
        opt.step()
    report("torchdiffeq", loss.item(), int(sol.stats.nfe))


def train_jax() -> None:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    class Field(eqx.Module):
        w1: jax.Array
        b1: jax.Array
        w2: jax.Array
        b2: jax.Array

        def __call__(self, t, y):
            return jnp.tanh(y @ self.w1 + self.b1) @ self.w2 + self.b2

    f = Field(**{k: jnp.asarray(v) for k, v in INIT.items()})
    zeros = jax.tree.map(jnp.zeros_like, eqx.filter(f, eqx.is_array))
    state = (zeros, zeros, jnp.asarray(0))  # Adam: moments, step count (torch's defaults)
    x, y, t = jnp.asarray(X), jnp.asarray(Y), jnp.asarray([0.0, 1.0])

    @eqx.filter_jit
    def update(f, state, key):
        def loss_fn(f):
            sol = regnde.solve(f, x, t, backend="diffrax", key=key, **SETTINGS)
            loss = jnp.mean((sol.ys[-1] - y) ** 2)
            return loss + LAM * sol.reg, (loss, sol.stats.nfe)

        (_, aux), g = eqx.filter_value_and_grad(loss_fn, has_aux=True)(f)
        m, v, n = state
        n = n + 1
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, g)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g**2, v, g)
        step = jax.tree.map(lambda m, v: -LR * (m / (1 - 0.9**n))
                            / (jnp.sqrt(v / (1 - 0.999**n)) + 1e-8), m, v)
        return eqx.apply_updates(f, step), (m, v, n), aux

    for i in range(ITERS):
        f, state, (loss, nfe) = update(f, state, jax.random.key(i))
    report("diffrax", float(loss), int(nfe))


START = [0.0]


def report(backend: str, loss: float, nfe: int) -> None:
    print(f"{backend:12s} loss {loss:.4f}  nfe {nfe:3d}  {time.perf_counter() - START[0]:.1f} s "
          f"for {ITERS} iterations")


if __name__ == "__main__":
    for train in (train_torch, train_jax):
        START[0] = time.perf_counter()
        train()
