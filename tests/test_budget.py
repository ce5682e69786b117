"""``regnde.schedules.NFEBudget``: the coefficient chosen online to hit a target NFE."""

from __future__ import annotations

import math
import random
import warnings

import pytest
import torch
import torchdiffeq

import regnde
from regnde import regularizers as R
from regnde.schedules import NFEBudget, floor_nfe

F64 = torch.float64


def plant(budget: NFEBudget, *, gain: float, lag: float, noise: float = 0.1, n: int = 600,
          seed: int = 0) -> tuple[list[float], list[float]]:
    """A model whose NFE drifts (rate ``lag``) toward ``20 + 100 / (1 + gain * lam)``:
    vanilla training would end at 120, the regularizer's strength is ``gain``."""
    rnd = random.Random(seed)
    nfe, nfes, lams = 80.0, [], []
    for k in range(n):
        lam = budget(k)
        nfe += lag * (20 + 100 / (1 + gain * lam) - nfe)
        budget.update(max(nfe * (1 + noise * rnd.gauss(0, 1)), 1.0))
        nfes.append(nfe)
        lams.append(lam)
    return nfes, lams


@pytest.mark.parametrize("target", [40, 60, 84])
@pytest.mark.parametrize("gain", [0.3, 3.0, 30.0])
@pytest.mark.parametrize("lag", [0.02, 0.2])
def test_settles_within_ten_percent_without_sustained_oscillation(target, gain, lag):
    nfes, lams = plant(NFEBudget(target), gain=gain, lag=lag)
    tail, lam_tail = nfes[-200:], lams[-200:]
    assert all(abs(x - target) / target < 0.1 for x in tail)
    # no sustained oscillation: lam varies only with the 10 % measurement noise at the end
    assert max(lam_tail) / min(lam_tail) < 2.0
    assert min(lams) >= 0


def test_lambda_decays_to_zero_below_target():
    b = NFEBudget(100)
    for _ in range(400):
        b.update(30)
    assert b.value == 0.0


def test_target_ratio_measures_the_start_then_aims_below_it():
    b = NFEBudget(target_ratio=0.5, warmup=5)
    assert b.target is None and b(0) == 0.0
    for _ in range(5):
        b.update(80)
    assert b.target == pytest.approx(40)
    nfes, _ = plant(b, gain=3.0, lag=0.1)
    assert abs(sum(nfes[-100:]) / 100 - 40) / 40 < 0.1


def test_state_dict_resumes_exactly():
    a = NFEBudget(50)
    for nfe in (90, 85, 80, 70):
        a.update(nfe)
    b = NFEBudget(50)
    b.load_state_dict(a.state_dict())
    for nfe in (66, 60):
        assert a.update(nfe) == b.update(nfe)


def test_reduce_averages_across_ranks_before_the_update():
    seen = []

    def mean_of_two_ranks(x: float) -> float:
        seen.append(x)
        return (x + 100.0) / 2  # the other rank measured 100

    a = NFEBudget(50, reduce=mean_of_two_ranks)
    b = NFEBudget(50)
    assert a.update(60) == b.update(80) and seen == [60.0]


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"target_nfe": 0}, "target_nfe must be a finite number > 0"),
    ({"target_nfe": -5}, "target_nfe must be a finite number > 0"),
    ({"target_nfe": math.nan}, "target_nfe must be a finite number > 0"),
    ({}, "exactly one of target_nfe"),
    ({"target_nfe": 40, "target_ratio": 0.5}, "exactly one of target_nfe"),
    ({"target_ratio": 0.0}, "target_ratio must be a finite number > 0"),
    ({"target_nfe": 40, "beta": 1.0}, "beta"),
    ({"target_nfe": 40, "warmup": 0}, "warmup"),
])
def test_bad_input_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        NFEBudget(**kwargs)


def test_update_refuses_a_non_positive_nfe():
    with pytest.raises(ValueError, match="measured NFE"):
        NFEBudget(40).update(0)


def test_a_target_below_the_methods_floor_warns_once_and_aims_at_the_floor():
    dopri5 = regnde.plugins.registry().backend("torchdiffeq").native_methods()["dopri5"]
    floor = floor_nfe(dopri5)
    assert floor == 2 + 7
    with pytest.warns(UserWarning, match="below the least this method can take") as caught:
        b = NFEBudget(3, floor_nfe=floor)
    assert len(caught) == 1 and b.target == floor
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b.update(50)


def test_a_regularizer_that_cannot_lower_the_nfe_warns_once_naming_the_fix():
    """A solve whose NFE does not answer lam (fixed steps): lam climbs to lam_max, pins there,
    and after ``patience`` updates the budget says why and what to do, once."""
    b = NFEBudget(20, lam_max=10.0, patience=5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(200):
            b.update(50)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "cannot lower this solve's NFE" in msgs[0]
    assert "adaptive method" in msgs[0] and "raise the target" in msgs[0]
    assert b.value == 10.0
    # a solve that does answer lam never pins long enough to warn
    b = NFEBudget(20, lam_max=10.0, patience=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        nfe = 50.0
        for _ in range(200):
            nfe = max(20.0, nfe - 0.5 * b.update(nfe))


def test_a_ratio_of_one_or_more_warns():
    with pytest.warns(UserWarning, match="ratio below 1"):
        NFEBudget(target_ratio=1.2)


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(),
                                       torch.nn.Linear(32, 2))

    def forward(self, t, y):
        return self.net(y) * 3.0


def test_drives_a_torch_training_loop_in_the_drop_in():
    """A tiny model fit to a fast rotation: vanilla's NFE rises; the budget holds it down."""
    f = Field()
    opt = torch.optim.Adam(f.parameters(), lr=1e-2)
    y0 = torch.randn(16, 2, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0, 1, 5)
    angle = 6.0 * t
    target_traj = torch.stack([torch.stack([torch.cos(a) * y0[:, 0] - torch.sin(a) * y0[:, 1],
                                            torch.sin(a) * y0[:, 0] + torch.cos(a) * y0[:, 1]],
                                           -1) for a in angle])
    budget = NFEBudget(40, lam0=1.0)
    for it in range(30):
        with regnde.regularize(R.LocalError(), key=it) as reg:
            ys = torchdiffeq.odeint(f, y0, t, rtol=1e-6, atol=1e-6)
        loss = (ys - target_traj).square().mean() + budget(it) * reg.value
        opt.zero_grad()
        loss.backward()
        opt.step()
        budget.update(reg.stats.nfe)
    assert len(budget.history) == 30 and all(lam >= 0 for _, lam in budget.history)
    assert budget.history[-1][1] != budget.history[0][1]  # the coefficient moved


def test_jax_training_step_compiles_once_with_lambda_as_input():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    traces = []

    def f(params, y):
        return jnp.tanh(y @ params)

    @jax.jit
    def step(params, lam, key):
        traces.append(1)

        def loss(p):
            sol = regnde.solve(lambda t, y: f(p, y), jnp.ones((4, 2)), jnp.linspace(0, 1, 3),
                               regularizer=R.LocalError(), key=key)
            return jnp.mean(sol.ys[-1] ** 2) + lam * sol.reg, sol.stats.nfe

        (_, nfe), grads = jax.value_and_grad(loss, has_aux=True)(params)
        return params - 0.1 * grads, nfe

    params = jnp.eye(2)
    budget = NFEBudget(30)
    for it in range(4):
        params, nfe = step(params, jnp.asarray(budget(it)), jax.random.PRNGKey(it))
        budget.update(int(nfe))
    assert len(traces) == 1 and len(budget.history) == 4


# -- the runner ------------------------------------------------------------------------------
def test_runner_nfe_budget_records_lambda_and_nfe_and_resumes(tmp_path):
    import json

    from regnde.experiments import runner
    from regnde.experiments.cli import main

    out = tmp_path / "b"
    argv = ["run", "toy-cubic", "--regularizer", "local-error-unbiased", "--nfe-budget", "20",
            "--iters", "6", "--out", str(out), "--no-progress", "--checkpoint-every", "3"]
    assert main(argv) == 0
    history = json.loads((out / "history.json").read_text())
    assert len(history) == 6 and all(len(h["lam"]) == 1 and h["lam"][0] >= 0 for h in history)
    assert json.loads((out / "results.json").read_text())["lam"] == "budget:20"
    # the same run in two sessions (stopped after 3 iterations) gives the same coefficients
    spec = runner.RunSpec("toy-cubic", regularizer="local-error-unbiased", lam="budget:20",
                          iters=6, out=tmp_path / "c", progress=False, checkpoint_every=3)

    def stop_after_three(it):
        if it == 3:
            raise KeyboardInterrupt

    with pytest.raises(runner.RunInterrupted):
        runner.run(spec, callback=stop_after_three)
    runner.run(spec)
    resumed = json.loads((tmp_path / "c" / "history.json").read_text())
    assert [h["lam"] for h in resumed] == [h["lam"] for h in history]

    # `regnde report` plots the coefficient and the NFE per iteration of budget runs
    assert main(["report", str(out), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r-budget.png").read_bytes()[:4] == b"\x89PNG"


def test_report_writes_no_budget_plot_without_budget_runs(tmp_path):
    from regnde.experiments.cli import main

    out = tmp_path / "plain"
    assert main(["run", "toy-cubic", "--iters", "2", "--out", str(out), "--no-progress"]) == 0
    assert main(["report", str(out), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r.png").exists() and not (tmp_path / "r-budget.png").exists()


@pytest.mark.parametrize(("extra", "match"), [
    (["--nfe-budget", "0"], "target_nfe must be a finite number > 0"),
    (["--nfe-ratio", "0.6", "--lam", "1"], "drop --lam"),
])
def test_runner_budget_bad_input(tmp_path, capsys, extra, match):
    from regnde.experiments.cli import main

    argv = ["run", "toy-cubic", "--regularizer", "local-error-unbiased", "--iters", "2",
            "--out", str(tmp_path / "x"), "--no-progress", *extra]
    assert main(argv) == 2
    assert match in capsys.readouterr().err


def test_runner_budget_needs_a_regularizer(tmp_path, capsys):
    from regnde.experiments.cli import main

    assert main(["run", "toy-cubic", "--nfe-budget", "30", "--iters", "2", "--out",
                 str(tmp_path / "x"), "--no-progress"]) == 2
    assert "needs a regularizer" in capsys.readouterr().err
