"""Solve one problem with a regularizer in an environment that has ONE extra installed.

Usage: python .ci/extra_smoke.py torch|torchsde|torchode|jax

Checks what a user of that extra alone meets: the backend is registered and works, the others'
libraries are absent (so nothing imported them by accident), and asking for a backend whose
library is missing names the plugin and what to install.
"""

from __future__ import annotations

import importlib.util
import sys

import regnde
from regnde import regularizers as R

#: what must NOT be installed by each extra (the experiment runner's dependencies included:
#: they belong to the ``experiments`` extra, not to the core)
RUNNER = ("tqdm", "matplotlib", "sklearn")
OTHERS = {"torch": ("torchsde", "torchode", "jax", "diffrax", *RUNNER),
          "torchsde": ("torchdiffeq", "torchode", "jax", "diffrax", *RUNNER),
          "torchode": ("torchdiffeq", "torchsde", "jax", "diffrax", *RUNNER),
          "jax": ("torch", "torchdiffeq", "torchsde", "torchode", *RUNNER)}
BACKEND = {"torch": "torchdiffeq", "torchsde": "torchsde", "torchode": "torchode",
           "jax": "diffrax"}


def main(extra: str) -> None:
    for name in OTHERS[extra]:
        assert importlib.util.find_spec(name) is None, f"{name} is installed by [{extra}]"
    assert BACKEND[extra] in regnde.backends(), regnde.backends()
    missing = next(b for b in ("torchdiffeq", "torchsde", "diffrax") if b != BACKEND[extra])
    try:
        regnde.methods(missing)
    except regnde.PluginError as exc:
        assert "unknown" not in str(exc) and "pip install" in str(exc), exc
    else:
        raise AssertionError(f"{missing} answered without its library")

    # the runner says which extra it needs, no traceback
    import subprocess
    from pathlib import Path

    exe = Path(sys.executable).with_name("regnde")
    done = subprocess.run([str(exe), "run", "toy-cubic", "--iters", "1"], capture_output=True,
                          text=True)
    assert done.returncode == 2 and "experiments]\"" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr

    if extra == "torch":
        import torch
        import torchdiffeq

        class Field(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.lin = torch.nn.Linear(3, 3)

            def forward(self, t, y):
                return torch.tanh(self.lin(y))

        f = Field()
        y0, t = torch.ones(4, 3), torch.linspace(0, 1, 3)
        sol = regnde.solve(f, y0, t, regularizer=R.LocalError() + R.GlobalError(), key=0)
        with regnde.regularize(R.LocalError(), key=0) as reg:
            ys = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-6)
        assert torch.equal(ys, sol.ys)
        value = sol.reg + reg.value
    elif extra == "torchsde":
        import torch

        class SDE(torch.nn.Module):
            noise_type, sde_type = "diagonal", "ito"

            def __init__(self) -> None:
                super().__init__()
                self.lin = torch.nn.Linear(2, 2)

            def f(self, t, y):
                return torch.tanh(self.lin(y))

            def g(self, t, y):
                return 0.1 * torch.ones_like(y)

        sol = regnde.solve(SDE(), torch.ones(8, 2), torch.linspace(0, 1, 3),
                           regularizer=R.LocalError(), key=0)
        value = sol.reg
    elif extra == "torchode":
        import torch

        lin = torch.nn.Linear(3, 3)
        sol = regnde.solve(lambda t, y: torch.tanh(lin(y)), torch.ones(4, 3),
                           torch.linspace(0, 1, 3), backend="torchode",
                           regularizer=R.LocalError() + R.GlobalError(), key=0)
        value = sol.reg
    else:
        import jax.numpy as jnp

        sol = regnde.solve(lambda t, y: -y * jnp.sin(t), jnp.ones((4, 3)),
                           jnp.linspace(0.0, 1.0, 3), regularizer=R.LocalError(), key=0)
        value = sol.reg
    v = float(value.detach()) if hasattr(value, "detach") else float(value)
    assert v == v and 0 < v < float("inf"), v  # finite and positive
    print(f"[{extra}] backend {BACKEND[extra]}: nfe={int(sol.stats.nfe)} reg={v:.3g}")


if __name__ == "__main__":
    main(sys.argv[1])
