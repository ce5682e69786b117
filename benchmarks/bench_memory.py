"""Memory as the number of solver steps grows: the local-regularization paper's memory table.

    python benchmarks/bench_memory.py

What is measured: the bytes a training iteration keeps alive for its backward pass, counted
exactly with ``torch.autograd.graph.saved_tensors_hooks`` (every tensor autograd saves, each
storage once), plus the bytes of the returned trace's arrays. This is the memory that grows
with the number of steps; it is deterministic, so one run suffices.

Rows: direct backprop with ``GlobalError`` and ``trace="full"`` (grows linearly: every stage
of every step is kept), and ``sensitivity="adjoint"`` with ``LocalError`` and
``trace="summary"`` (target: flat, at most 1.1x from N=20 to N=200).
"""

from __future__ import annotations

import argparse

import torch

import regnde
from regnde import regularizers as R


class Rotation(torch.nn.Module):
    """A linear rotation field with a small MLP on top: steps grow linearly with the span."""

    def __init__(self, dim: int = 64):
        super().__init__()
        torch.manual_seed(0)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, dim), torch.nn.Tanh(),
                                       torch.nn.Linear(dim, dim))
        skew = torch.randn(dim, dim)
        self.register_buffer("a", 3.0 * (skew - skew.T) / dim**0.5)

    def forward(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return y @ self.a.T + 0.1 * self.mlp(y)


def saved_bytes(run: object) -> tuple[int, object]:
    """Bytes autograd saves while ``run()`` builds the graph, each storage counted once."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.device.type != "meta":
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()  # type: ignore[operator]
    return sum(seen.values()), out


def trace_bytes(trace: regnde.Trace) -> int:
    fields = (trace.t, trace.dt, trace.error, trace.stiffness, trace.y, trace.dt_taken)
    return sum(x.untyped_storage().nbytes() for x in fields if isinstance(x, torch.Tensor))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--targets", default="20,50,100,200", help="step counts to aim for")
    args = p.parse_args()
    f = Rotation()
    y0 = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))
    tol = {"rtol": 1e-5, "atol": 1e-5}
    # calibrate: steps grow ~linearly with the span
    probe = regnde.solve(f, y0, torch.tensor([0.0, 1.0]), **tol, trace="summary")
    per_unit = probe.stats.n_steps
    configs = {
        "direct + GlobalError, trace=full": ("direct", R.GlobalError(), "full"),
        "direct, no regularizer, trace=summary": ("direct", None, "summary"),
        "adjoint + LocalError, trace=summary": ("adjoint", R.LocalError(), "summary"),
    }
    rows: dict[str, list[tuple[int, int]]] = {k: [] for k in configs}
    for target in (int(x) for x in args.targets.split(",")):
        span = 1.1 * target / per_unit  # step density varies a little with the span
        t = torch.tensor([0.0, span])
        for name, (sens, reg, trace) in configs.items():
            def run(sens: str = sens, reg: object = reg, trace: str = trace,
                    t: torch.Tensor = t) -> object:
                sol = regnde.solve(f, y0, t, sensitivity=sens, regularizer=reg, key=0,
                                   trace=trace, max_steps=100_000, **tol)
                loss = sol.ys[-1].square().mean()
                return sol, (loss if sol.reg is None else loss + sol.reg)

            nbytes, (sol, loss) = saved_bytes(run)  # type: ignore[misc]
            total = nbytes + trace_bytes(sol.trace)
            loss.backward()  # the graph is usable: what was counted is what backward needs
            rows[name].append((sol.stats.n_steps, total))
    print("| configuration | " + " | ".join(f"N={n}" for n, _ in next(iter(rows.values())))
          + " | N_max / N_min |")
    print("|---|" + "---|" * (len(next(iter(rows.values()))) + 1))
    for name, vals in rows.items():
        cells = " | ".join(f"{b / 2**20:.2f} MiB" for _, b in vals)
        print(f"| {name} | {cells} | {vals[-1][1] / vals[0][1]:.2f}x |")
    adj = rows["adjoint + LocalError, trace=summary"]
    flat = adj[-1][1] / adj[0][1]
    print(f"\nadjoint + local + summary from N={adj[0][0]} to N={adj[-1][0]}: {flat:.3f}x "
          f"(target <= 1.1x: {'ok' if flat <= 1.1 else 'MISSED'})")


if __name__ == "__main__":
    main()
