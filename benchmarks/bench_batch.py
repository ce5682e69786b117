"""Regularizer overhead flat in batch size: regnde's ratios at batch 1, 16, 128 and 2048.

    python benchmarks/bench_batch.py [--repeats 15] [--quick] [--threads 1]
                                     [--batches 1,16,128,2048] [--backends torchdiffeq,torchode]

MLP vector field dim 16, hidden 32, dopri5, rtol = atol = 1e-5, float32, the field scaled so
the solve takes about 20 accepted steps; on torchdiffeq and, if installed, torchode (whose steps
are per sample: the table shows the median over samples). For every batch size, two ratios of
medians of alternated repeats:

- regularizer: a training iteration (forward + backward of a loss on ``ys[-1]``) with
  ``LocalError("unbiased")`` via ``regnde.solve`` / the same without regularizer via
  ``regnde.solve``;
- recording: ``regnde.solve`` forward (``trace="summary"``, no_grad) / the plain backend
  forward (``torchdiffeq.odeint``; torchode's ``AutoDiffAdjoint`` built as regnde builds it).

The final row divides the regularizer ratio at the largest batch by the one at the smallest;
target: within 5% (0.95 to 1.05). The recording quotient is shown without a target.
Batches of 2048 and more run ``--big-repeats`` repeats (default: two thirds of ``--repeats``).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from collections.abc import Callable

import torch
import torchdiffeq
from torch_bench import Field, medians

import regnde
from regnde import regularizers as R

DIM, HIDDEN = 16, 32


def plain_forward(backend: str, f: torch.nn.Module, y0: torch.Tensor, t: torch.Tensor,
                  tol: dict[str, float], max_steps: int) -> Callable[[], object]:
    """The plain backend's forward solve, no_grad."""
    if backend == "torchdiffeq":
        def run() -> object:
            with torch.no_grad():
                return torchdiffeq.odeint(f, y0, t, method="dopri5", **tol)
        return run
    import torchode

    term = torchode.ODETerm(f)
    adjoint = torchode.AutoDiffAdjoint(
        torchode.Dopri5(term=term), torchode.IntegralController(term=term, **tol),
        max_steps=max_steps, backprop_through_step_size_control=False)
    t_eval = t[None].expand(y0.shape[0], -1)
    problem = torchode.InitialValueProblem(y0, t_eval[:, 0], t_eval[:, -1], t_eval)

    def run_ode() -> object:
        with torch.no_grad():
            return adjoint.solve(problem, term).ys
    return run_ode


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--big-repeats", type=int, default=None,
                   help="repeats for batches >= 2048 (default: two thirds of --repeats)")
    p.add_argument("--quick", action="store_true", help="3 repeats (overrides both)")
    p.add_argument("--batches", default="1,16,128,2048")
    p.add_argument("--backends", default="torchdiffeq,torchode",
                   help="comma-separated; torchode is skipped when not installed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: least noise)")
    p.add_argument("--span", type=float, default=5.0,
                   help="end time of the solve (5, with --scale 4: about 20 accepted steps)")
    p.add_argument("--scale", type=float, default=4.0, help="factor on the field's weights")
    p.add_argument("--trace", default="full", choices=("full", "summary"),
                   help="regnde's trace in the training iterations (full: solve's default)")
    args = p.parse_args()
    repeats = 3 if args.quick else args.repeats
    big = 3 if args.quick else (args.big_repeats or max(3, round(2 * repeats / 3)))
    batches = [int(b) for b in args.batches.split(",")]
    backends = [b for b in args.backends.split(",")
                if b != "torchode" or importlib.util.find_spec("torchode") is not None]
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    f = Field(DIM, HIDDEN, scale=args.scale).to(dev)
    t = torch.tensor([0.0, args.span], device=dev)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    max_steps = 4096  # regnde.solve's default
    print(f"device {dev}, threads {torch.get_num_threads()}, MLP dim {DIM} hidden {HIDDEN}, "
          f"dopri5 rtol=atol=1e-5, scale {args.scale}, span {args.span}, repeats {repeats} "
          f"({big} for batch >= 2048)"
          f", training trace={args.trace!r}, backends {', '.join(backends)}")
    start = time.perf_counter()
    for backend in backends:
        rows = []
        for batch in batches:
            n = big if batch >= 2048 else repeats
            y0 = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(1)).to(dev)
            solve = {"backend": backend, "max_steps": max_steps, **tol}
            steps = regnde.solve(f, y0, t, **solve).stats.n_steps
            steps_s = (str(int(steps)) if not isinstance(steps, torch.Tensor) else
                       f"{int(steps.median())} ({int(steps.min())}–{int(steps.max())})")

            def train(reg: object, y0: torch.Tensor = y0, solve: dict = solve
                      ) -> Callable[[], None]:
                key = iter(range(10**9))

                def run() -> None:
                    f.zero_grad()
                    sol = regnde.solve(f, y0, t, regularizer=reg, key=next(key),
                                       trace=args.trace, **solve)
                    loss = sol.ys[-1].square().mean()
                    if sol.reg is not None:
                        loss = loss + 0.1 * sol.reg
                    loss.backward()
                return run

            def rec_fwd(y0: torch.Tensor = y0, solve: dict = solve) -> object:
                with torch.no_grad():
                    return regnde.solve(f, y0, t, trace="summary", **solve).ys

            reg = medians(train(None), train(R.LocalError("unbiased")), n, sync)
            rec = medians(plain_forward(backend, f, y0, t, tol, max_steps), rec_fwd, n, sync)
            rows.append((batch, steps_s, n, reg, rec))
        print()
        print(f"{backend}: training iteration LocalError(unbiased) / no regularizer (both "
              f"regnde.solve); forward regnde.solve / plain {backend}")
        print()
        print("| batch | accepted steps | repeats | no reg ms | LocalError ms | reg ratio "
              "| plain fwd ms | regnde fwd ms | record ratio |")
        print("|---|---|---|---|---|---|---|---|---|")
        for batch, steps_s, n, (b0, c0, r0), (b1, c1, r1) in rows:
            print(f"| {batch} | {steps_s} | {n} | {b0:.1f} | {c0:.1f} | {r0:.3f}x | {b1:.1f} "
                  f"| {c1:.1f} | {r1:.3f}x |")
        (lo, *_, lo_reg, lo_rec), (hi, *_, hi_reg, hi_rec) = rows[0], rows[-1]
        q = hi_reg[2] / lo_reg[2]
        ok = "ok" if 0.95 <= q <= 1.05 else "MISSED"
        print()
        print("| quotient | reg ratio | target | record ratio | target |")
        print("|---|---|---|---|---|")
        print(f"| batch {hi} / batch {lo} | {q:.3f} | within 5% {ok} | "
              f"{hi_rec[2] / lo_rec[2]:.3f} | – |")
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
