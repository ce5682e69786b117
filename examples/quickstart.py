"""Solve a small neural ODE with regnde, print the solver's trace, and regularize it.

    python examples/quickstart.py
"""

import torch

import regnde
from regnde import regularizers as R

torch.manual_seed(0)
field = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2))


def f(t, y):
    return field(y)


y0 = torch.randn(16, 2)
t = torch.linspace(0.0, 2.0, 5)

sol = regnde.solve(f, y0, t, method="tsit5", rtol=1e-6, atol=1e-6,
                   regularizer=R.LocalError() + 0.1 * R.GlobalStiffness(), key=0)
tr = sol.trace
print(f"ys: {tuple(sol.ys.shape)}   reg: {sol.reg.item():.3e}   stats: {sol.stats}")
print(" step      t         dt      error   stiffness")
for j in range(tr.n_steps):
    print(f"{j:5d}  {tr.t[j].item():8.4f}  {tr.dt[j].item():8.4f}  {tr.error[j].item():8.3e}"
          f"  {tr.stiffness[j].item():9.3f}")
sol.reg.backward()  # gradients reach the parameters of f
print("grad norm of the first layer:", field[0].weight.grad.norm().item())
print("methods on torchdiffeq:", ", ".join(regnde.methods("torchdiffeq")))
