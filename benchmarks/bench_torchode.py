"""Overhead of regnde on torchode, measured side by side in one process.

    python benchmarks/bench_torchode.py [--repeats 15] [--quick] [--device cpu|cuda] [--threads 1]

MLP vector field dim 64, batch 128, dopri5, rtol = atol = 1e-5, float32; the field is scaled so
the solve takes at least 20 accepted steps per sample (torchode steps each sample on its own).
The baseline is plain torchode: ``ODETerm``, ``Dopri5``, ``IntegralController`` and
``AutoDiffAdjoint`` built once, as regnde's adapter builds them (``max_steps=4096``,
``backprop_through_step_size_control=False``, regnde's convention), so both sides do the same
arithmetic. Each row times the baseline and the candidate in alternation and reports the ratio
of medians. Targets: recording (``trace="summary"``) <= 1.03x forward; a training iteration
(forward + backward of a loss on ``ys[-1]``) with ``LocalError("unbiased")`` <= 1.15x a plain
torchode training iteration without regularizer (issue 13). ``LocalError("biased")`` and
``GlobalError`` are reported without a target.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torchode
from torch_bench import Field, compare

import regnde
from regnde import regularizers as R


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="3 repeats (overrides --repeats)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    p.add_argument("--span", type=float, default=24.0,
                   help="end time of the solve (24: at least 20 accepted steps per sample)")
    p.add_argument("--trace", default="full", choices=("full", "summary"),
                   help="regnde's trace in the training rows (full: regnde.solve's default)")
    args = p.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    f = Field().to(dev)
    y0 = torch.randn(128, 64, generator=torch.Generator().manual_seed(1)).to(dev)
    t = torch.tensor([0.0, args.span], device=dev)
    rtol = atol = 1e-5
    tol = {"rtol": rtol, "atol": atol}
    max_steps = 4096  # regnde.solve's default

    # plain torchode, built once: the objects regnde's adapter builds (without its recording)
    term = torchode.ODETerm(f)
    adjoint = torchode.AutoDiffAdjoint(
        torchode.Dopri5(term=term), torchode.IntegralController(atol=atol, rtol=rtol, term=term),
        max_steps=max_steps, backprop_through_step_size_control=False)
    t_eval = t[None].expand(y0.shape[0], -1)  # as torchode.solve_ivp and regnde's adapter
    problem = torchode.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval)

    probe = regnde.solve(f, y0, t, backend="torchode", max_steps=max_steps, **tol)
    steps, rej = probe.stats.n_steps, probe.stats.n_rejected
    with torch.no_grad():
        ref = adjoint.solve(problem, term)
    same = torch.equal(ref.ys[:, -1], probe.ys[-1].detach())
    print(f"device {dev}, accepted steps per sample min {int(steps.min())} median "
          f"{int(steps.median())} max {int(steps.max())}, rejected per sample median "
          f"{int(rej.median())}, NFE (rows) {probe.stats.nfe}, threads {torch.get_num_threads()}"
          f", repeats {repeats}; regnde ys[-1] == plain torchode: {same}")
    if int(steps.min()) < 20:
        print(f"warning: only {int(steps.min())} accepted steps for some sample; the targets "
              f"assume >= 20 (raise --span)")

    def plain_fwd() -> object:
        with torch.no_grad():
            return adjoint.solve(problem, term).ys

    def rec_fwd() -> object:
        with torch.no_grad():
            return regnde.solve(f, y0, t, backend="torchode", trace="summary",
                                max_steps=max_steps, **tol).ys

    def plain_iter() -> None:
        f.zero_grad()
        adjoint.solve(problem, term).ys[:, -1].square().mean().backward()

    def solve_iter(reg: object) -> Callable[[], None]:
        key = iter(range(10**9))

        def run() -> None:
            f.zero_grad()
            sol = regnde.solve(f, y0, t, backend="torchode", regularizer=reg, key=next(key),
                               trace=args.trace, max_steps=max_steps, **tol)
            loss = sol.ys[-1].square().mean()
            if sol.reg is not None:
                loss = loss + 0.1 * sol.reg
            loss.backward()
        return run

    rows = [
        compare("record forward (trace=summary)", plain_fwd, rec_fwd, repeats, sync, 1.03),
        compare("LocalError(unbiased), train iteration", plain_iter,
                solve_iter(R.LocalError("unbiased")), repeats, sync, 1.15),
        compare("LocalError(biased), train iteration", plain_iter,
                solve_iter(R.LocalError("biased")), repeats, sync, None),
        compare("GlobalError, train iteration", plain_iter, solve_iter(R.GlobalError()),
                repeats, sync, None),
    ]
    print()
    print(f"training rows: regnde.solve(trace={args.trace!r}) vs plain torchode forward+backward "
          f"without regularizer")
    print()
    print("| measurement | torchode ms | regnde ms | ratio | target |")
    print("|---|---|---|---|---|")
    for name, b, c, ratio, target in rows:
        if target is None:
            goal = "–"
        else:
            goal = f"<= {target:.2f}x {'ok' if ratio <= target else 'MISSED'}"
        print(f"| {name} | {b:.1f} | {c:.1f} | {ratio:.3f}x | {goal} |")


if __name__ == "__main__":
    main()
