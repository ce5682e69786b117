"""Cost of TayNODE's TaylorDerivative(K) next to LocalError and GlobalError, on torchdiffeq.

    python benchmarks/bench_taylor.py [--repeats 15] [--max-order 6] [--max-jvp-order 5]

Time-dependent MLP field, state dim 64, hidden 64, batch 128, float32, dopri5,
rtol = atol = 1e-5, t in [0, 1]. One training iteration = solve + backward of
``ys[-1].square().mean() + reg``. Every regularizer solves with the same accepted steps as the
plain solve (integrals are extra states whose error the step-size controller ignores), so the
ratios are the regularizers' own cost. Two tables:

1. per training iteration, relative to the unregularized iteration (median of ``repeats``),
   with NFE of the solve and ``stats.nfe_reg`` (evaluations spent by the regularizer);
2. per evaluation of the integrand at one point (forward + backward), relative to one
   evaluation of ``f`` (forward + backward), for Taylor mode and for nested jvp, with the ratio
   to ``K^2`` (Taylor mode: bounded) and to ``2^K`` (nested jvp).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import regnde
from regnde import regularizers as R
from regnde.adapters.torch.taylor import jvp_derivatives, taylor_derivatives


class Field(torch.nn.Module):
    def __init__(self, dim: int = 64, hidden: int = 64, scale: float = 1.5):
        super().__init__()
        torch.manual_seed(0)
        self.l1 = torch.nn.Linear(dim + 1, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)
        with torch.no_grad():
            self.l1.weight.mul_(scale)
            self.l2.weight.mul_(scale)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tt = t.to(y.dtype).expand(y.shape[0], 1)
        return self.l2(torch.tanh(self.l1(torch.cat([y, tt], 1))))


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--max-order", type=int, default=6)
    ap.add_argument("--max-jvp-order", type=int, default=5,
                    help="nested jvp per iteration grows ~4x per order: K=5 takes ~2 s")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-iterations", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    f = Field()
    y0 = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 1.0])
    orders = range(2, args.max_order + 1)

    def iteration(reg: R.Regularizer | None) -> Callable[[], regnde.Solution]:
        def run() -> regnde.Solution:
            f.zero_grad()
            sol = regnde.solve(f, y0, t, rtol=1e-5, atol=1e-5, regularizer=reg, key=0,
                               trace="summary")
            loss = sol.ys[-1].square().mean()
            if sol.reg is not None:
                loss = loss + 1e-3 * sol.reg
            loss.backward()
            return sol
        return run

    rows: list[tuple[str, R.Regularizer | None]] = [
        ("none", None), ("LocalError", R.LocalError()), ("GlobalError", R.GlobalError()),
        ("KineticEnergy", R.KineticEnergy()), ("JacobianFrobenius", R.JacobianFrobenius()),
    ]
    rows += [(f"TaylorDerivative({k})", R.TaylorDerivative(k)) for k in orders]
    rows += [(f"TaylorDerivative({k}, jvp)", R.TaylorDerivative(k, mode="jvp"))
             for k in range(2, args.max_jvp_order + 1)]

    print("Per training iteration (solve + backward), dopri5, dim 64, batch 128, float32, CPU")
    print(f"{'regularizer':28s} {'ms':>9s} {'x none':>8s} {'nfe':>5s} {'nfe_reg':>8s}")
    base = None
    for name, reg in [] if args.skip_iterations else rows:
        run = iteration(reg)
        sol = run()
        ms = median_time(run, args.repeats) * 1e3
        base = ms if base is None else base
        print(f"{name:28s} {ms:9.1f} {ms / base:8.2f} {sol.stats.nfe:5d} "
              f"{sol.stats.nfe_reg:8d}")

    print("\nPer integrand evaluation at one point (forward + backward), relative to one f")
    tp = torch.tensor(0.3)

    def point(fn: Callable[[], list[torch.Tensor]]) -> Callable[[], None]:
        def go() -> None:
            f.zero_grad()
            fn()[-1].square().mean().backward()
        return go

    f_ms = median_time(point(lambda: [f(tp, y0)]), 5 * args.repeats) * 1e3
    print(f"f alone: {f_ms:.3f} ms")
    print(f"{'K':>2s} {'taylor x f':>11s} {'/K^2':>6s} {'jvp x f':>9s} {'/2^K':>6s}")
    for k in range(1, args.max_order + 1):
        ta = median_time(point(lambda k=k: taylor_derivatives(f, tp, y0, k)),
                         5 * args.repeats) * 1e3 / f_ms
        jv = median_time(point(lambda k=k: jvp_derivatives(f, tp, y0, k)),
                         5 * args.repeats) * 1e3 / f_ms
        print(f"{k:2d} {ta:11.2f} {ta / k**2:6.2f} {jv:9.2f} {jv / 2**k:6.2f}")


if __name__ == "__main__":
    main()
