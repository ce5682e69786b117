"""Cost of regnde's torchsde backend against plain ``torchsde.sdeint``.

Two ratios, medians of interleaved repeats in one run (same model, same Brownian path):

1. recording: ``regnde.solve`` (trace of every accepted step with its step-doubling error) vs
   ``torchsde.sdeint(adaptive=True)``, forward only (no_grad). Target <= 1.05x. Also shown:
   a training iteration (forward + backward) without regularizer, where regnde also builds the
   gradient graph of ``trace.error``.
2. local regularization per training iteration: forward + backward of
   ``loss(ys) + LocalError`` vs forward + backward of ``loss(ys)`` with plain sdeint.
   Target <= 1.10x.

Run: ``PYTHONPATH=. python benchmarks/bench_torchsde.py [--repeats 15] [--clock wall]``.
The default clock is process CPU time with one torch thread, so other processes on a shared
machine do not distort the ratios; ``--clock wall`` measures wall time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchsde

import regnde
from regnde import regularizers as R


class NeuralSDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.drift = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, dim))
        self.diffusion = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(),
                                             torch.nn.Linear(hidden, dim), torch.nn.Sigmoid())

    def f(self, t, y):
        return self.drift(y) - y

    def g(self, t, y):
        return 0.3 * self.diffusion(y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--method", default="midpoint")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: process CPU time (robust on a shared machine); wall: wall time")
    args = parser.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    sde = NeuralSDE(args.dim, args.hidden)
    if args.method in ("midpoint", "heun", "euler_heun", "reversible_heun", "log_ode"):
        sde.sde_type = "stratonovich"
    y0 = torch.randn(args.batch, args.dim)
    t = torch.linspace(0, 1, 10)
    tol = {"rtol": 2e-3, "atol": 2e-3}
    levy = "space-time" if args.method == "srk" else "none"

    def bm():
        return torchsde.BrownianInterval(0.0, 1.0, size=(args.batch, args.dim), entropy=11,
                                         levy_area_approximation=levy)

    def plain_fwd():
        with torch.no_grad():
            torchsde.sdeint(sde, y0, t, bm=bm(), method=args.method, adaptive=True, **tol)

    def regnde_fwd():
        with torch.no_grad():
            regnde.solve(sde, y0, t, bm=bm(), method=args.method, trace="summary", **tol)

    def plain_iter():
        ys = torchsde.sdeint(sde, y0, t, bm=bm(), method=args.method, adaptive=True, **tol)
        ys.square().mean().backward()

    def record_iter():
        sol = regnde.solve(sde, y0, t, bm=bm(), method=args.method, trace="summary", **tol)
        sol.ys.square().mean().backward()

    reg = R.LocalError()

    def local_iter():
        sol = regnde.solve(sde, y0, t, bm=bm(), method=args.method, trace="summary", key=0,
                           regularizer=reg, **tol)
        (sol.ys.square().mean() + 0.1 * sol.reg).backward()

    sol = regnde.solve(sde, y0, t, bm=bm(), method=args.method, **tol)
    print(f"method={args.method} batch={args.batch} dim={args.dim} hidden={args.hidden} "
          f"threads={torch.get_num_threads()} clock={args.clock}: {sol.stats.n_steps} accepted "
          f"steps, {sol.stats.n_rejected} rejected, nfe={sol.stats.nfe}")
    assert sol.stats.n_steps >= 20, "the benchmark solve should take >= 20 accepted steps"

    def timed(fn):
        start = clock()
        fn()
        return clock() - start

    fns = (plain_fwd, regnde_fwd, plain_iter, record_iter, local_iter)
    for fn in fns:  # warm up
        fn()
    times: dict[str, list[float]] = {f.__name__: [] for f in fns}
    for _ in range(args.repeats):  # interleaved, so drifts in machine load hit both sides
        for fn in fns:
            times[fn.__name__].append(timed(fn))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"{'':36s}{'plain sdeint':>14s}{'regnde':>12s}{'ratio':>8s}  target")
    print(f"{'forward, recording every step':36s}{med['plain_fwd'] * 1e3:12.1f}ms"
          f"{med['regnde_fwd'] * 1e3:10.1f}ms{med['regnde_fwd'] / med['plain_fwd']:8.3f}  <= 1.05")
    print(f"{'train iteration, recording only':36s}{med['plain_iter'] * 1e3:12.1f}ms"
          f"{med['record_iter'] * 1e3:10.1f}ms{med['record_iter'] / med['plain_iter']:8.3f}")
    print(f"{'train iteration, + LocalError':36s}{med['plain_iter'] * 1e3:12.1f}ms"
          f"{med['local_iter'] * 1e3:10.1f}ms{med['local_iter'] / med['plain_iter']:8.3f}  <= 1.10")


if __name__ == "__main__":
    main()
