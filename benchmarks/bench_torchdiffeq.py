"""Overhead of regnde on torchdiffeq, measured side by side in one process.

    python benchmarks/bench_torchdiffeq.py [--repeats 15] [--device cpu|cuda] [--threads 1]

MLP vector field dim 64, batch 128, dopri5, rtol = atol = 1e-5, float32; the field is scaled so
the solve takes at least 20 accepted steps. Each row times the baseline and the candidate in
alternation and reports the ratio of medians. Targets (issues 2 and 3): recording <= 1.05x
forward and <= 1.10x forward+backward; local regularization <= 1.10x per training iteration
for both sensitivities; global regularization <= 1.15x direct backprop; the drop-in
(``with regnde.regularize(...)`` around the unchanged ``odeint``) no worse than
``regnde.solve``'s ratio for the same regularizer (issue 14).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torchdiffeq
from torch_bench import Field, compare

import regnde
from regnde import regularizers as R


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    p.add_argument("--span", type=float, default=16.0,
                   help="end time of the solve (16: at least 20 accepted steps)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    f = Field().to(dev)
    y0 = torch.randn(128, 64, generator=torch.Generator().manual_seed(1)).to(dev)
    t = torch.tensor([0.0, args.span], device=dev)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    probe = regnde.solve(f, y0, t, **tol)
    print(f"device {dev}, accepted steps {probe.stats.n_steps}, rejected "
          f"{probe.stats.n_rejected}, NFE {probe.stats.nfe}, threads {torch.get_num_threads()}")
    if probe.stats.n_steps < 20:
        print(f"warning: only {probe.stats.n_steps} accepted steps; the targets assume >= 20 "
              f"(raise --span)")

    def plain_fwd() -> object:
        with torch.no_grad():
            return torchdiffeq.odeint(f, y0, t, method="dopri5", **tol)

    def rec_fwd(trace: str) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return regnde.solve(f, y0, t, trace=trace, **tol).ys
        return run

    def plain_iter() -> None:
        f.zero_grad()
        torchdiffeq.odeint(f, y0, t, method="dopri5", **tol)[-1].square().mean().backward()

    def plain_adj_iter() -> None:
        f.zero_grad()
        ys = torchdiffeq.odeint_adjoint(f, y0, t, method="dopri5", **tol)
        ys[-1].square().mean().backward()

    def solve_iter(reg: object, sensitivity: str = "direct", trace: str = "full"
                   ) -> Callable[[], None]:
        key = iter(range(10**9))

        def run() -> None:
            f.zero_grad()
            sol = regnde.solve(f, y0, t, sensitivity=sensitivity, regularizer=reg,
                               key=next(key), trace=trace, **tol)
            loss = sol.ys[-1].square().mean()
            if sol.reg is not None:
                loss = loss + 0.1 * sol.reg
            loss.backward()
        return run

    def dropin_iter(reg: object, adjoint: bool = False) -> Callable[[], None]:
        key = iter(range(10**9))
        odeint = torchdiffeq.odeint_adjoint if adjoint else torchdiffeq.odeint

        def run() -> None:
            f.zero_grad()
            with regnde.regularize(reg, key=next(key)) as block:
                ys = odeint(f, y0, t, method="dopri5", **tol)
            (ys[-1].square().mean() + 0.1 * block.value).backward()
        return run

    rows = [
        compare("record forward (trace=full)", plain_fwd, rec_fwd("full"), args.repeats, sync,
                1.05),
        compare("record forward (trace=summary)", plain_fwd, rec_fwd("summary"), args.repeats,
                sync, 1.05),
        compare("record forward+backward", plain_iter, solve_iter(None), args.repeats, sync,
                1.10),
        compare("LocalError, direct (vs plain odeint)", plain_iter, solve_iter(R.LocalError()),
                args.repeats, sync, 1.10),
        compare("LocalError, adjoint (vs plain odeint_adjoint)", plain_adj_iter,
                solve_iter(R.LocalError(), "adjoint", "summary"), args.repeats, sync, 1.10),
        compare("GlobalError, direct (vs plain odeint)", plain_iter,
                solve_iter(R.GlobalError()), args.repeats, sync, 1.15),
        # the drop-in around the unchanged call: no worse than regnde.solve's ratios above
        compare("drop-in LocalError, odeint (vs plain odeint)", plain_iter,
                dropin_iter(R.LocalError()), args.repeats, sync, 1.10),
        compare("drop-in LocalError, odeint_adjoint (vs plain)", plain_adj_iter,
                dropin_iter(R.LocalError(), adjoint=True), args.repeats, sync, 1.10),
    ]
    print()
    print("| measurement | baseline ms | regnde ms | ratio | target |")
    print("|---|---|---|---|---|")
    for name, b, c, ratio, target in rows:
        ok = "ok" if ratio <= target else "MISSED"
        print(f"| {name} | {b:.1f} | {c:.1f} | {ratio:.3f}x | <= {target:.2f}x {ok} |")


if __name__ == "__main__":
    main()
