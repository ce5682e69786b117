"""Fit the spiral SDE of the ERNODE paper with a neural SDE, vanilla vs regularized.

The data (Pal et al., "Opening the Blackbox", ICML 2021, the spiral SDE experiment)::

    du1 = (-a u1^3 + b u2^3) dt + g u1 dW1
    du2 = (-b u1^3 - a u2^3) dt + g u2 dW2,     a = 0.1, b = 2.0, g = 0.2, u(0) = (2, 0)

observed at 30 points on [0, 1] through the means and variances of many trajectories. A neural
SDE (drift: an MLP of u^3, diffusion: a diagonal linear layer) is fitted to those moments with a
moment-matching loss, three times: without regularization, with the global error regularizer
(ERNODE) and with the local error regularizer. The script prints the loss, the NFE of an
unregularized solve of the trained model (what prediction costs) and the training and
prediction times (CPU seconds of this process, so other load on the machine does not count).

Run: ``PYTHONPATH=. python examples/spiral_sde.py [--iters 300] [--lam-global 1.0] ...``.
Tolerances are ``rtol = atol = 1e-2``: SDE step doubling measures the noise too, so SDEs need
looser tolerances than regnde's ODE default of 1e-6.
"""

from __future__ import annotations

import argparse
import time

import torch
import torchsde

import regnde
from regnde import regularizers as R

A, B, G = 0.1, 2.0, 0.2
TOL = {"rtol": 1e-2, "atol": 1e-2}


class TrueSpiral(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def f(self, t, u):
        u1, u2 = u[:, :1], u[:, 1:]
        return torch.cat([-A * u1**3 + B * u2**3, -B * u1**3 - A * u2**3], dim=1)

    def g(self, t, u):
        return G * u


class NeuralSpiral(torch.nn.Module):
    """Drift: MLP of ``u^3``; diffusion: a diagonal linear map of ``u``. A Stratonovich SDE,
    so torchsde's default method is the cheap ``midpoint`` (Ito's default, ``srk``, costs about
    five times more evaluations per step); the model only has to match the data's moments."""

    noise_type, sde_type = "diagonal", "stratonovich"

    def __init__(self, hidden: int = 32):
        super().__init__()
        self.drift = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(),
                                         torch.nn.Linear(hidden, 2))
        self.diffusion = torch.nn.Linear(2, 2)
        with torch.no_grad():
            self.diffusion.weight.mul_(0.1)
            self.diffusion.bias.zero_()

    def f(self, t, u):
        return self.drift(u**3)

    def g(self, t, u):
        return self.diffusion(u)


def moments(ys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Means and variances over trajectories: ``(T, batch, 2) -> (T, 2), (T, 2)``."""
    return ys.mean(dim=1), ys.var(dim=1)


def moment_loss(ys: torch.Tensor, target: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    mean, var = moments(ys)
    return ((mean - target[0]) ** 2).sum() + ((var - target[1]) ** 2).sum()


def train(name: str, regularizer, lam: float, args, t, target, u0) -> dict:
    torch.manual_seed(args.seed)
    model = NeuralSpiral()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    y0 = u0.expand(args.batch, 2)
    nfe = 0
    start = time.process_time()
    for it in range(args.iters):
        sol = regnde.solve(model, y0, t, regularizer=regularizer, key=it, trace="summary",
                           max_steps=args.max_steps, **TOL)
        loss = moment_loss(sol.ys, target)
        total = loss if sol.reg is None else loss + lam * sol.reg
        opt.zero_grad()
        total.backward()
        opt.step()
        nfe += sol.stats.nfe + sol.stats.nfe_reg
    train_time = time.process_time() - start
    with torch.no_grad():  # evaluation: plain solves of the trained model, fixed paths
        start = time.process_time()
        sol = regnde.solve(model, u0.expand(args.eval_batch, 2), t, key=10_000,
                           max_steps=args.max_steps, **TOL)
        predict_time = time.process_time() - start
    return {"name": name, "loss": float(moment_loss(sol.ys, target)), "nfe": sol.stats.nfe,
            "steps": sol.stats.n_steps, "train_nfe": nfe, "train_s": train_time,
            "predict_s": predict_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=300, help="training iterations per model")
    parser.add_argument("--batch", type=int, default=64, help="trajectories per iteration")
    parser.add_argument("--eval-batch", type=int, default=1024)
    parser.add_argument("--data-batch", type=int, default=2000, help="trajectories of the data")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--lam-global", type=float, default=1.0)
    parser.add_argument("--lam-local", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small tensors: one thread is fastest

    t = torch.linspace(0.0, 1.0, 30)
    u0 = torch.tensor([[2.0, 0.0]])
    with torch.no_grad():
        bm = torchsde.BrownianInterval(0.0, 1.0, size=(args.data_batch, 2), entropy=args.seed,
                                       levy_area_approximation="space-time")
        data = torchsde.sdeint(TrueSpiral(), u0.expand(args.data_batch, 2), t, bm=bm, dt=1e-3)
    target = moments(data)

    runs = [("vanilla", None, 0.0),
            ("global error (ERNODE)", R.GlobalError(), args.lam_global),
            ("local error (unbiased)", R.LocalError(), args.lam_local)]
    results = [train(name, reg, lam, args, t, target, u0) for name, reg, lam in runs]

    print(f"spiral SDE, {args.iters} iterations x {args.batch} trajectories, "
          f"rtol=atol={TOL['rtol']:g}")
    print(f"{'':24s}{'loss':>9s}{'eval NFE':>10s}{'steps':>7s}{'train NFE':>11s}"
          f"{'train s':>9s}{'predict s':>11s}  (CPU s)")
    for r in results:
        print(f"{r['name']:24s}{r['loss']:9.4f}{r['nfe']:10d}{r['steps']:7d}{r['train_nfe']:11d}"
              f"{r['train_s']:9.1f}{r['predict_s']:11.3f}")


if __name__ == "__main__":
    main()
