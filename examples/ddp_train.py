"""Train a small neural ODE data-parallel with a regnde regularizer (PyTorch DDP).

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 5 \
        --regularizer local-error

Each rank solves its shard of the batch with its own key (``rank_key(seed, rank).fold(step)``:
its own sampled time for local regularizers, reproducible for a seed and world size); DDP
averages the gradients; rank 0 logs the loss, regularizer and NFE averaged over ranks.
``--nfe-budget N`` chooses the coefficient online (``regnde.schedules.NFEBudget``) from the NFE
averaged over ranks (``reduce=D.mean_across_ranks``), so every rank uses the same one.
``--dropin`` runs the unchanged ``torchdiffeq.odeint`` call inside ``regnde.regularize`` in the
DDP module's forward instead of ``regnde.solve``. gloo on CPU, nccl on GPU (``--device``).
See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
import torchdiffeq
from torch.distributed.elastic.multiprocessing.errors import record

import regnde
from regnde import distributed as D
from regnde import regularizers as R
from regnde.adapters.torch.distributed import NotLaunchedError
from regnde.schedules import NFEBudget

#: ``--regularizer`` choices.
REGULARIZERS: dict[str, Any] = {
    "none": None,
    "local-error": R.LocalError,
    "local-stiffness": R.LocalStiffness,
    "global-error": R.GlobalError,
    "global-stiffness": R.GlobalStiffness,
}


class ODEFunc(torch.nn.Module):
    """``dy/dt = W2 tanh(W1 y + b1) + b2`` on 2-D states."""

    def __init__(self, hidden: int = 32, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden, dtype=dtype), torch.nn.Tanh(),
                                       torch.nn.Linear(hidden, 2, dtype=dtype))

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.net(y)


class NeuralODE(torch.nn.Module):
    """Maps ``x`` to the solution at ``t = 1``; returns ``(y(1), reg, stats)``.

    ``dropin=True`` calls ``torchdiffeq.odeint`` inside a ``regnde.regularize`` block (what
    existing code does); otherwise ``regnde.solve``. ``adjoint=True``: ``odeint_adjoint`` /
    ``sensitivity="adjoint"``. ``reg`` is ``None`` without a regularizer.
    """

    def __init__(self, func: torch.nn.Module, regularizer: Any = None, dropin: bool = False,
                 adjoint: bool = False, rtol: float = 1e-5, atol: float = 1e-5):
        super().__init__()
        self.func, self.regularizer, self.dropin = func, regularizer, dropin
        self.adjoint, self.rtol, self.atol = adjoint, rtol, atol

    def forward(self, x: torch.Tensor, key: Any) -> tuple[torch.Tensor, Any, regnde.Stats]:
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        if self.dropin:
            odeint = torchdiffeq.odeint_adjoint if self.adjoint else torchdiffeq.odeint
            with regnde.regularize(self.regularizer, key=key) as reg:
                ys = odeint(self.func, x, t, rtol=self.rtol, atol=self.atol, method="dopri5")
            return ys[-1], reg.value, reg.stats
        sol = regnde.solve(self.func, x, t, rtol=self.rtol, atol=self.atol,
                           sensitivity="adjoint" if self.adjoint else "direct",
                           regularizer=self.regularizer, key=key)
        return sol.ys[-1], sol.reg, sol.stats


def make_data(n: int, seed: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points and their images under a quarter turn (the task)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=dtype)
    return x, torch.stack([x[:, 1], -x[:, 0]], 1)


def make_model(args: argparse.Namespace) -> NeuralODE:
    """The model every rank starts from (same seed, so the same parameters)."""
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    make = REGULARIZERS[args.regularizer]
    return NeuralODE(ODEFunc(args.hidden, dtype), None if make is None else make(),
                     dropin=args.dropin, adjoint=args.adjoint, rtol=args.tol, atol=args.tol)


def loss_of(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor, key: Any,
            lam: float) -> tuple[torch.Tensor, torch.Tensor, Any, regnde.Stats]:
    """``(objective, task loss, reg, stats)`` of one shard: mse + ``lam * reg``."""
    y1, reg, stats = model(x, key)
    loss = (y1 - target).square().mean()
    return (loss if reg is None else loss + lam * reg), loss, reg, stats


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256, help="global batch (all ranks)")
    p.add_argument("--regularizer", choices=sorted(REGULARIZERS), default="local-error")
    p.add_argument("--lam", type=float, default=0.1, help="regularization weight")
    p.add_argument("--nfe-budget", type=float, default=None, metavar="N",
                   help="choose the weight online so that the solves settle at N evaluations "
                        "(NFEBudget; replaces --lam)")
    p.add_argument("--dropin", action="store_true",
                   help="torchdiffeq.odeint inside regnde.regularize instead of regnde.solve")
    p.add_argument("--adjoint", action="store_true",
                   help="continuous adjoint (odeint_adjoint) instead of backpropagating through "
                        "the solver; local regularizers only")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--tol", type=float, default=1e-5, help="rtol and atol")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: cuda if available (nccl), else cpu (gloo)")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds any rank waits for the others before failing")
    p.add_argument("--save", default=None, help="rank 0 saves final parameters and log here")
    p.add_argument("--fail-rank", type=int, default=None,
                   help="fault injection: this rank raises at --fail-step")
    p.add_argument("--stall-rank", type=int, default=None,
                   help="fault injection: this rank stops responding at --fail-step")
    p.add_argument("--fail-step", type=int, default=1)
    args = p.parse_args(argv)
    if args.dropin and args.regularizer == "none":
        p.error("--dropin needs a regularizer (it runs the solve inside regnde.regularize)")
    if args.nfe_budget is not None and args.regularizer == "none":
        p.error("--nfe-budget needs a regularizer to weigh")
    if args.steps < 1:
        p.error(f"--steps must be positive, got {args.steps}")
    return args


def train(args: argparse.Namespace) -> None:
    """Join the group, train, leave the group (also on errors)."""
    device = None if args.device == "auto" else args.device
    with D.setup(device=device, timeout=args.timeout, batch_size=args.batch_size) as ctx:
        train_in(ctx, args)  # returns before leaving the group, so DDP is gone by then


def train_in(ctx: Any, args: argparse.Namespace) -> None:
    """The training loop of one rank, inside the process group."""
    x, target = make_data(args.batch_size, args.seed + 1, getattr(torch, args.dtype))
    part = ctx.shard(args.batch_size)
    x, target = x[part].to(ctx.device), target[part].to(ctx.device)
    model = ctx.wrap(make_model(args).to(ctx.device))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    if ctx.is_main:
        print(f"{ctx.world_size} ranks ({ctx.backend}, {ctx.device}), "
              f"{x.shape[0]} samples each, regularizer {args.regularizer}"
              f"{' (drop-in)' if args.dropin else ''}", flush=True)
    budget = (None if args.nfe_budget is None
              else NFEBudget(args.nfe_budget, reduce=D.mean_across_ranks))
    history = []
    for step in range(args.steps):
        lam = args.lam if budget is None else budget(step)
        if step == args.fail_step and ctx.rank == args.fail_rank:
            raise RuntimeError(f"rank {ctx.rank}: injected failure at step {step}")
        if step == args.fail_step and ctx.rank == args.stall_rank:
            time.sleep(10 * args.timeout)  # a hung rank: the others time out
        start = time.perf_counter()
        key = D.rank_key(args.seed, ctx.rank).fold(step)
        objective, loss, reg, stats = loss_of(model, x, target, key, lam)
        opt.zero_grad()
        objective.backward()  # DDP: gradients averaged over ranks here
        opt.step()
        log = D.reduce_stats(stats, loss=loss, reg=reg)
        if budget is not None:
            budget.update(stats.nfe)  # a collective: the mean over ranks decides the next lam
        history.append({"loss": log.loss, "reg": log.reg, "nfe": log.stats.nfe,
                        "nfe_reg": log.stats.nfe_reg, "nfe_max": log.stats_max.nfe, "lam": lam})
        if ctx.is_main:
            print(f"step {step:3d}  {log}  {time.perf_counter() - start:.2f}s", flush=True)
    if ctx.is_main and args.save:
        params = {k: v.detach().cpu() for k, v in model.module.func.state_dict().items()}
        torch.save({"params": params, "history": history, "world_size": ctx.world_size},
                   args.save)


@record
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        train(args)
    except (ValueError, NotLaunchedError) as e:  # bad configuration: one line, no traceback
        sys.exit(f"ddp_train.py: error: {e}")


if __name__ == "__main__":
    main()
