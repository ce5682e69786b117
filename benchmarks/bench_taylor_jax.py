"""Cost of TayNODE's TaylorDerivative(K) next to LocalError and GlobalError, on diffrax (jit).

    python benchmarks/bench_taylor_jax.py [--repeats 15] [--max-order 6]

The problem of ``bench_taylor.py``: time-dependent MLP field, state dim 64, hidden 64, batch 128,
float32, dopri5, rtol = atol = 1e-5, t in [0, 1]. One training iteration = solve + gradient of
``ys[-1].square().mean() + 1e-3 * reg`` w.r.t. the field's parameters, compiled once with
``eqx.filter_jit`` (compile time excluded). Every regularizer solves with the plain solve's
accepted steps, so the ratios are the regularizers' own cost. Columns: ms per iteration, ratio
to the unregularized iteration, and for ``TaylorDerivative`` the ratio's excess over 1 divided
by ``K^2`` (Taylor mode: no faster than ``K^2`` when it does not grow).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                      "intra_op_parallelism_threads=1")

import equinox as eqx
import jax
import jax.numpy as jnp

import regnde
from regnde import regularizers as R


class Field(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, dim: int = 64, hidden: int = 64, scale: float = 1.5):
        k1, k2 = jax.random.split(jax.random.key(0))
        l1 = eqx.nn.Linear(dim + 1, hidden, key=k1)
        l2 = eqx.nn.Linear(hidden, dim, key=k2)
        self.l1 = eqx.tree_at(lambda m: m.weight, l1, l1.weight * scale)
        self.l2 = eqx.tree_at(lambda m: m.weight, l2, l2.weight * scale)

    def __call__(self, t: jax.Array, y: jax.Array) -> jax.Array:
        tt = jnp.broadcast_to(t, (y.shape[0], 1)).astype(y.dtype)
        h = jnp.tanh(jnp.concatenate([y, tt], 1) @ self.l1.weight.T + self.l1.bias)
        return h @ self.l2.weight.T + self.l2.bias


def median_time(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-order", type=int, default=6)
    ap.add_argument("--sensitivity", default="direct", choices=("direct", "adjoint"))
    args = ap.parse_args()

    f = Field()
    y0 = jax.random.normal(jax.random.key(1), (128, 64))
    t = jnp.array([0.0, 1.0])

    def iteration(reg: R.Regularizer | None) -> Callable[[], object]:
        @eqx.filter_jit
        def step(f: Field) -> tuple[Field, jax.Array, jax.Array]:
            def loss(f: Field) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
                sol = regnde.solve(f, y0, t, rtol=1e-5, atol=1e-5, regularizer=reg, key=0,
                                   trace="summary", sensitivity=args.sensitivity)
                value = jnp.mean(sol.ys[-1] ** 2)
                if sol.reg is not None:
                    value = value + 1e-3 * sol.reg
                return value, (sol.stats.nfe, sol.stats.nfe_reg)
            g, (nfe, nfe_reg) = eqx.filter_grad(loss, has_aux=True)(f)
            return g, nfe, jnp.asarray(nfe_reg)
        return lambda: step(f)

    rows: list[tuple[str, R.Regularizer | None, int]] = [("none", None, 0)]
    if args.sensitivity == "direct":
        rows += [("GlobalError", R.GlobalError(), 0)]
    rows += [("LocalError", R.LocalError(), 0), ("KineticEnergy", R.KineticEnergy(), 0),
             ("JacobianFrobenius", R.JacobianFrobenius(), 0)]
    rows += [(f"TaylorDerivative({k})", R.TaylorDerivative(k), k)
             for k in range(2, args.max_order + 1)]

    print(f"diffrax, per training iteration under eqx.filter_jit ({args.sensitivity}), dopri5, "
          f"dim 64, batch 128, float32, CPU, medians of {args.repeats}")
    print(f"{'regularizer':24s} {'ms':>8s} {'x none':>7s} {'(x-1)/K^2':>10s} {'nfe':>5s} "
          f"{'nfe_reg':>8s}")
    base = None
    for name, reg, k in rows:
        run = iteration(reg)
        _, nfe, nfe_reg = run()
        ms = median_time(run, args.repeats) * 1e3
        base = ms if base is None else base
        per_k2 = f"{(ms / base - 1) / k**2:10.3f}" if k else " " * 10
        print(f"{name:24s} {ms:8.2f} {ms / base:7.2f} {per_k2} {int(nfe):5d} "
              f"{int(nfe_reg):8d}", flush=True)


if __name__ == "__main__":
    main()
