"""Add local regularization to existing torchdiffeq training code without changing the solve.

    python examples/dropin_torchdiffeq.py
"""

import torch
import torchdiffeq

import regnde

torch.manual_seed(0)


class ODEFunc(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(),
                                       torch.nn.Linear(64, 2))

    def forward(self, t, y):
        return self.net(y)


func = ODEFunc()
opt = torch.optim.Adam(func.parameters(), lr=1e-2)
x = torch.randn(128, 2)
target = torch.stack([x[:, 1], -x[:, 0]], 1)  # a quarter turn
t = torch.tensor([0.0, 1.0])
lam = 0.1
for it in range(50):
    with regnde.regularize(regnde.regularizers.LocalError(), key=it) as reg:
        ys = torchdiffeq.odeint_adjoint(func, x, t, rtol=1e-6, atol=1e-6)  # unchanged call
    loss = (ys[-1] - target).square().mean()
    opt.zero_grad()
    (loss + lam * reg.value).backward()
    opt.step()
    if it % 10 == 0 or it == 49:
        print(f"it {it:3d}  loss {loss.item():.4f}  reg {reg.value.item():.3e}  "
              f"NFE {reg.stats.nfe} (+{reg.stats.nfe_reg} for the regularizer)")
