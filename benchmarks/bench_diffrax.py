"""Overhead of regnde's diffrax backend, measured side by side in one run (medians, under jit).

    PYTHONPATH=. python benchmarks/bench_diffrax.py [--repeats 15]

Prints, for an MLP vector field (dim 64, batch 128, float32, dopri5, tol 1e-5):
  1. regnde.solve (recording) vs plain diffrax.diffeqsolve, forward;          target <= 1.05x
  2. the same, forward + backward;                                             target <= 1.10x
  3. a training iteration with LocalError vs without, both sensitivities;      target <= 1.10x
  4. the same training iteration on diffrax vs torchdiffeq (regnde on both).
Timings interleave the variants in every repeat so machine load hits them alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import diffrax as dfx
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import regnde
from regnde import regularizers as R

DIM, BATCH, HIDDEN = 64, 128, 64
TOL = 1e-5


class MLP(eqx.Module):
    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array

    def __call__(self, t, y):
        h = jnp.tanh(y @ self.w1 + self.b1 + t)
        return h @ self.w2 + self.b2


def make_params(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"w1": rng.normal(0, 2.0 / np.sqrt(DIM), (DIM, HIDDEN)).astype(np.float32),
            "b1": np.zeros(HIDDEN, np.float32),
            "w2": rng.normal(0, 2.0 / np.sqrt(HIDDEN), (HIDDEN, DIM)).astype(np.float32),
            "b2": np.zeros(DIM, np.float32)}


def timed(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    for fn in fns.values():  # compile and warm up
        jax.block_until_ready(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    p = make_params()
    model = MLP(**{k: jnp.asarray(v) for k, v in p.items()})
    y0 = jnp.asarray(np.random.default_rng(1).normal(size=(BATCH, DIM)).astype(np.float32))
    target = jnp.zeros_like(y0)
    t = jnp.linspace(0.0, 6.0, 2, dtype=jnp.float32)
    ctrl = dfx.PIDController(rtol=TOL, atol=TOL)

    def plain(m, y, adjoint):
        return dfx.diffeqsolve(dfx.ODETerm(lambda s, z, a: m(s, z)), dfx.Dopri5(), t[0], t[-1],
                               None, y, saveat=dfx.SaveAt(ts=t), stepsize_controller=ctrl,
                               adjoint=adjoint).ys

    def ours(m, y, sensitivity="direct", reg=None, key=None, trace="summary"):
        return regnde.solve(m, y, t, rtol=TOL, atol=TOL, sensitivity=sensitivity,
                            regularizer=reg, key=key, trace=trace)

    n = regnde.solve(model, y0, t, rtol=TOL, atol=TOL, trace="summary").stats.n_steps
    print(f"MLP dim {DIM}, batch {BATCH}, float32, dopri5, rtol=atol={TOL}: "
          f"{int(n)} accepted steps; medians of {args.repeats} repeats, {jax.devices()[0]}")

    # 1-2: recording overhead
    fwd_plain = jax.jit(lambda m, y: plain(m, y, dfx.RecursiveCheckpointAdjoint()))
    fwd_ours = jax.jit(lambda m, y: ours(m, y).ys)
    fwd_full = jax.jit(lambda m, y: ours(m, y, trace="full").ys)

    def loss_plain(m, y):
        return jnp.mean((plain(m, y, dfx.RecursiveCheckpointAdjoint())[-1] - target) ** 2)

    def loss_ours(m, y, reg=None, sensitivity="direct", key=None):
        sol = ours(m, y, sensitivity, reg, key)
        out = jnp.mean((sol.ys[-1] - target) ** 2)
        return out if reg is None else out + 0.1 * sol.reg

    g_plain = eqx.filter_jit(eqx.filter_grad(loss_plain))
    g_ours = eqx.filter_jit(eqx.filter_grad(loss_ours))
    g_ge = eqx.filter_jit(eqx.filter_grad(lambda m, y: loss_ours(m, y, R.GlobalError())))
    res = timed({"fwd plain": lambda: fwd_plain(model, y0),
                 "fwd regnde": lambda: fwd_ours(model, y0),
                 "fwd regnde full": lambda: fwd_full(model, y0),
                 "fb plain": lambda: g_plain(model, y0),
                 "fb regnde": lambda: g_ours(model, y0),
                 "fb regnde+GlobalError": lambda: g_ge(model, y0)}, args.repeats)
    print("\n1-2. recording overhead (regnde.solve / diffeqsolve)")
    print(f"  forward, trace='summary'      {res['fwd regnde'] / res['fwd plain']:.3f}x  "
          f"({res['fwd plain'] * 1e3:.1f} ms plain)   target <= 1.05x")
    print(f"  forward, trace='full'         {res['fwd regnde full'] / res['fwd plain']:.3f}x")
    print(f"  forward+backward              {res['fb regnde'] / res['fb plain']:.3f}x  "
          f"({res['fb plain'] * 1e3:.1f} ms plain)   target <= 1.10x")
    print(f"  forward+backward, GlobalError {res['fb regnde+GlobalError'] / res['fb plain']:.3f}x")

    # 3: local regularization per training iteration
    print("\n3. training iteration with LocalError / without (regnde both)   target <= 1.10x")
    for sens in ("direct", "adjoint"):
        fns = {}
        for name, reg in (("none", None), ("unbiased", R.LocalError()),
                          ("biased", R.LocalError(sampler="biased"))):
            fns[name] = eqx.filter_jit(eqx.filter_value_and_grad(
                lambda m, y, k, reg=reg, sens=sens: loss_ours(m, y, reg, sens, k)))
        key = jax.random.key(0)
        res = timed({k: (lambda fn=fn, key=key: fn(model, y0, key)) for k, fn in fns.items()},
                    args.repeats)
        print(f"  {sens:8s} unbiased {res['unbiased'] / res['none']:.3f}x   biased "
              f"{res['biased'] / res['none']:.3f}x   ({res['none'] * 1e3:.1f} ms without)")

    # 4: diffrax vs torchdiffeq, the same training iteration (no regularizer and LocalError)
    try:
        import torch
    except ImportError:
        print("\n4. torch not installed: skipped")
        return
    torch.set_num_threads(2)

    class TorchMLP(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for k, v in p.items():
                setattr(self, k, torch.nn.Parameter(torch.tensor(v)))

        def forward(self, s, y):
            h = torch.tanh(y @ self.w1 + self.b1 + s)
            return h @ self.w2 + self.b2

    tm = TorchMLP()
    ty0 = torch.tensor(np.asarray(y0))
    tt = torch.tensor(np.asarray(t))

    def torch_iter(reg):
        tm.zero_grad()
        sol = regnde.solve(tm, ty0, tt, rtol=TOL, atol=TOL, regularizer=reg, key=0,
                           trace="summary")
        loss = torch.mean(sol.ys[-1] ** 2)
        if reg is not None:
            loss = loss + 0.1 * sol.reg
        loss.backward()
        return loss.detach()

    print("\n4. training iteration, diffrax / torchdiffeq (regnde on both, dopri5)")
    for name, reg in (("no regularizer", None), ("LocalError", R.LocalError())):
        jfn = eqx.filter_jit(eqx.filter_value_and_grad(
            lambda m, y, k, reg=reg: loss_ours(m, y, reg, "direct", k)))
        key = jax.random.key(0)
        res = timed({"jax": lambda jfn=jfn, key=key: jfn(model, y0, key),
                     "torch": lambda reg=reg: torch_iter(reg)}, max(5, args.repeats // 2))
        print(f"  {name:15s} {res['jax'] / res['torch']:.3f}x  ({res['jax'] * 1e3:.1f} ms "
              f"diffrax, {res['torch'] * 1e3:.1f} ms torchdiffeq)")


if __name__ == "__main__":
    main()
