"""Data-parallel training: ``regnde.distributed`` and ``examples/ddp_train.py`` under torchrun.

The torchrun checks launch two CPU processes (gloo, one thread each) as a subprocess with a
time limit, in their own process group that is killed if the limit is hit. ``--standalone``
makes torchrun bind free ports itself. Their reference is one process that solves each rank's
shard with that rank's key and averages the gradients, which is what DDP computes (adaptive
steps depend on the batch, so one solve of the whole batch would be a different computation).
"""

from __future__ import annotations

import os
import runpy
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch

import regnde
from regnde import distributed as D
from regnde.adapters.torch.keys import TorchKey, make_key
from regnde.schedules import NFEBudget

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "ddp_train.py"
WORLD = 2
LIMIT = 50  # seconds for one torchrun; every test here stays under a minute
#: a small float64 run, so that the DDP run and the reference agree to rounding
COMMON = ["--steps", "3", "--batch-size", "16", "--hidden", "8", "--dtype", "float64",
          "--tol", "1e-6", "--lr", "0.05", "--lam", "1.0", "--timeout", "30"]
COMMON_SEED = 0  # the example's default --seed


@cache
def example() -> dict[str, Any]:
    """The example's functions (its ``main`` does not run: ``__name__`` is not ``__main__``)."""
    return runpy.run_path(str(SCRIPT))


def torchrun(args: list[str], limit: float = LIMIT) -> tuple[int, str, float]:
    """Run the example under ``torchrun --standalone --nproc_per_node=2``; returns
    ``(exit code, stdout + stderr, seconds)``. Kills the whole process group on time-out."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={WORLD}", str(SCRIPT), *args]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish within {limit} s (killed):\n{out[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out, time.monotonic() - start


def reference(argv: list[str], keys: Any = None) -> tuple[dict[str, torch.Tensor], list]:
    """One process: per step, each rank's shard solved with that rank's key
    (``make_key(seed).fold(rank).fold(step)``), gradients averaged, one Adam step.

    ``argv`` as the distributed run's (with ``--dropin`` the shards run the drop-in too, whose
    gradients are plain torchdiffeq's, not ``regnde.solve``'s); ``keys(r, step)``
    replaces the keys (to show that the comparison notices a wrong one). Returns the final
    parameters and, per step, the mean of loss, reg and NFE over ranks."""
    ex = example()
    args = ex["parse_args"](argv)
    model = ex["make_model"](args)
    x, target = ex["make_data"](args.batch_size, args.seed + 1, getattr(torch, args.dtype))
    n = args.batch_size // WORLD
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    budget = None if args.nfe_budget is None else NFEBudget(args.nfe_budget)
    history = []
    for step in range(args.steps):
        lam = args.lam if budget is None else budget(step)
        grads: list[list[torch.Tensor]] = []
        logged = []
        for r in range(WORLD):
            key = make_key(args.seed).fold(r).fold(step) if keys is None else keys(r, step)
            part = slice(r * n, (r + 1) * n)
            opt.zero_grad()
            objective, loss, reg, stats = ex["loss_of"](model, x[part], target[part], key, lam)
            objective.backward()
            grads.append([p.grad.clone() for p in model.parameters()])
            logged.append((loss.item(), None if reg is None else reg.item(), stats.nfe))
        for p, *g in zip(model.parameters(), *grads, strict=True):
            p.grad = sum(g[1:], g[0]) / WORLD
        opt.step()
        regs = [v[1] for v in logged]
        history.append({"loss": sum(v[0] for v in logged) / WORLD,
                        "reg": None if regs[0] is None else sum(regs) / WORLD,
                        "nfe": sum(v[2] for v in logged) / WORLD, "lam": lam})
        if budget is not None:  # one coefficient for all ranks, from their mean NFE
            budget.update(history[-1]["nfe"])
    return {k: v.detach() for k, v in model.func.state_dict().items()}, history


# -- two processes under torchrun -------------------------------------------------------------
@pytest.mark.parametrize("extra", [
    ["--regularizer", "none"],
    ["--regularizer", "local-error"],
    ["--regularizer", "local-error", "--dropin"],
    ["--regularizer", "global-stiffness"],
    ["--regularizer", "local-stiffness", "--dropin", "--adjoint"],
    ["--regularizer", "local-error", "--nfe-budget", "20", "--steps", "6"],
], ids=["none", "local-error", "local-error-dropin", "global-stiffness",
        "local-stiffness-dropin-adjoint", "local-error-nfe-budget"])
def test_two_ranks_match_per_shard_reference(tmp_path: Path, extra: list[str]) -> None:
    out_file = tmp_path / "final.pt"
    rc, out, _ = torchrun([*COMMON, *extra, "--save", str(out_file)])
    assert rc == 0, out[-3000:]
    assert "2 ranks (gloo, cpu)" in out
    saved = torch.load(out_file, weights_only=True)
    assert saved["world_size"] == WORLD

    argv = [*COMMON, *extra]
    params, history = reference(argv)
    initial = example()["make_model"](example()["parse_args"](argv)).func.state_dict()
    assert saved["params"].keys() == params.keys()
    for name, p in params.items():
        assert not torch.allclose(p, initial[name]), f"{name} did not train"
        torch.testing.assert_close(saved["params"][name], p, rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # what rank 0 logged is the mean over both ranks
    assert len(saved["history"]) == len(history)
    for got, want in zip(saved["history"], history, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-9)
        assert got["nfe"] == want["nfe"] and got["nfe_max"] >= got["nfe"]
        assert got["lam"] == pytest.approx(want["lam"], rel=1e-12)
        if want["reg"] is None:
            assert got["reg"] is None
        else:
            assert got["reg"] == pytest.approx(want["reg"], rel=1e-9)
            assert (got["nfe_reg"] > 0) == extra[1].startswith("local")  # the extra step

    if "--nfe-budget" in extra:  # the coefficient moved, the same on both ranks (else the
        # parameters above would not match the one-coefficient reference)
        assert len({h["lam"] for h in saved["history"]}) >= 3
    if extra == ["--regularizer", "local-error"]:  # the comparison notices a rank that used
        # the wrong key
        wrong, _ = reference(argv, keys=lambda r, step: make_key(COMMON_SEED).fold(step))
        assert any(not torch.allclose(saved["params"][k], wrong[k], rtol=1e-9, atol=1e-12)
                   for k in params)


def test_batch_not_divisible_by_world_size_is_a_clear_error(tmp_path: Path) -> None:
    out_file = tmp_path / "final.pt"
    rc, out, _ = torchrun([*COMMON, "--batch-size", "15", "--save", str(out_file)])
    assert rc != 0
    assert "batch size 15 is not divisible by the world size 2" in out
    assert "14 or 16" in out
    assert not out_file.exists()


def test_a_failing_rank_stops_the_run(tmp_path: Path) -> None:
    out_file = tmp_path / "final.pt"
    rc, out, seconds = torchrun([*COMMON, "--fail-rank", "1", "--fail-step", "1",
                                 "--save", str(out_file)])
    assert rc != 0
    assert "rank 1: injected failure at step 1" in out
    assert not out_file.exists()
    assert seconds < 30  # it stopped, rather than waiting for the 30 s collective timeout


def test_a_stalled_rank_makes_the_others_time_out(tmp_path: Path) -> None:
    out_file = tmp_path / "final.pt"
    rc, out, seconds = torchrun([*COMMON, "--stall-rank", "1", "--fail-step", "1",
                                 "--timeout", "3", "--save", str(out_file)])
    assert rc != 0
    assert "Timed out" in out  # gloo's error on rank 0 after --timeout
    assert not out_file.exists()
    assert seconds < LIMIT


# -- the helpers in one process ---------------------------------------------------------------
def test_rank_key_is_the_seed_folded_with_the_rank() -> None:
    like = torch.zeros((), dtype=torch.float64)
    k0, k1 = D.rank_key(7, 0), D.rank_key(7, 1)
    assert k0.uniform(like) == make_key(7).fold(0).uniform(like)
    assert k1.uniform(like) == D.rank_key(7, 1).uniform(like)  # pure
    assert k0.uniform(like) != k1.uniform(like)
    assert k0.uniform(like) != make_key(7).uniform(like)
    assert D.rank_key(7, 1).fold(3).uniform(like) == TorchKey(7, path=(1, 3)).uniform(like)
    assert D.rank_key(make_key(7), 1).uniform(like) == k1.uniform(like)


def test_folded_int_keys_are_all_distinct() -> None:
    # numpy's SeedSequence pads entropy with zeros: fold(0) must still differ from the key
    like = torch.zeros((), dtype=torch.float64)
    paths = [(), (0,), (1,), (0, 0), (1, 0), (0, 1), (2, 0, 0)]
    draws = {TorchKey(3, path=p).uniform(like).item() for p in paths}
    assert len(draws) == len(paths)


def test_rank_key_from_identically_seeded_generators_differs_by_rank() -> None:
    like = torch.zeros((), dtype=torch.float64)
    keys = [D.rank_key(torch.Generator().manual_seed(5), r) for r in range(2)]
    assert keys[0].uniform(like) != keys[1].uniform(like)


@pytest.mark.parametrize("rank", [-1, 1.0, True, "0"])
def test_rank_key_rejects_bad_ranks(rank: Any) -> None:
    with pytest.raises(ValueError, match="rank must be a non-negative int"):
        D.rank_key(0, rank)


def test_rank_key_drives_the_sampled_time() -> None:
    f = torch.nn.Linear(2, 2, dtype=torch.float64)
    y0 = torch.ones(3, 2, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)

    def reg(key: Any) -> float:
        sol = regnde.solve(lambda t, y: f(y), y0, t,
                           regularizer=regnde.regularizers.LocalError(), key=key)
        return sol.reg.item()

    assert reg(D.rank_key(3, 1)) == reg(D.rank_key(3, 1))
    assert reg(D.rank_key(3, 0)) != reg(D.rank_key(3, 1))


def test_shard_and_check_batch() -> None:
    assert D.check_batch(12, 3) == 4
    assert [D.shard(12, 3, r) for r in range(3)] == [slice(0, 4), slice(4, 8), slice(8, 12)]
    with pytest.raises(ValueError, match=r"batch size 10 is not divisible by the world size 4 "
                                         r".*multiple of 4 \(e.g. 8 or 12\)"):
        D.shard(10, 4, 0)
    with pytest.raises(ValueError, match=r"batch size 3 .* world size 4 .*\(e.g. 4\)"):
        D.check_batch(3, 4)
    with pytest.raises(ValueError, match="rank must be an int in"):
        D.shard(12, 3, 3)
    with pytest.raises(ValueError, match="world_size must be a positive int"):
        D.check_batch(12, 0)


def test_reduce_stats_means_and_maxima() -> None:
    other = [3.0, 0.5, 30.0, 6.0, 4.0, 2.0]  # another rank's loss, reg and counts

    def all_reduce(values: Any) -> tuple[list[float], list[float], int]:
        return ([a + b for a, b in zip(values, other, strict=True)],
                [max(a, b) for a, b in zip(values, other, strict=True)], 2)

    stats = regnde.Stats(nfe=20, nfe_reg=8, n_steps=3, n_rejected=0)
    got = D.reduce_stats(stats, loss=torch.tensor(1.0, requires_grad=True),
                         reg=torch.tensor(1.5), all_reduce=all_reduce)
    assert (got.world_size, got.loss, got.reg) == (2, 2.0, 1.0)
    assert got.stats == regnde.Stats(nfe=25.0, nfe_reg=7.0, n_steps=3.5, n_rejected=1.0)
    assert got.stats_max == regnde.Stats(nfe=30.0, nfe_reg=8.0, n_steps=4.0, n_rejected=2.0)
    assert "loss 2" in str(got) and "[2 ranks]" in str(got)


def test_reduce_stats_without_a_process_group_is_this_rank() -> None:
    got = D.reduce_stats(regnde.Stats(nfe=14, nfe_reg=7, n_steps=2, n_rejected=1), loss=0.25)
    assert (got.world_size, got.loss, got.reg, got.stats.nfe) == (1, 0.25, None, 14.0)
    with pytest.raises(ValueError, match="unknown framework for reduce_stats 'mxnet'"):
        D.reduce_stats(regnde.Stats(), framework="mxnet")


def test_setup_outside_torchrun_says_how_to_launch(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        D.setup()


def test_the_example_outside_torchrun_says_how_to_launch() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, str(SCRIPT), "--steps", "1"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "Launch with `torchrun --nproc_per_node=N" in done.stderr
    assert "Traceback" not in done.stderr


def test_setup_checks_the_batch_before_joining(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "1"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="batch size 5 is not divisible by the world size 2"):
        D.setup(batch_size=5, timeout=1)
    with pytest.raises(ValueError, match="timeout must be positive"):
        D.setup(timeout=0)


def test_the_neutral_module_imports_no_framework() -> None:
    code = ("import sys, regnde, regnde.distributed; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'jax')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_mean_across_ranks_is_the_sum_over_the_world_size() -> None:
    def two_ranks(values: Any) -> tuple[list[float], list[float], int]:  # the other has 30
        return [v + 30.0 for v in values], [max(v, 30.0) for v in values], 2

    assert D.mean_across_ranks(torch.tensor(20.0), all_reduce=two_ranks) == 25.0
    assert D.mean_across_ranks(20, framework="torch") == 20.0  # no process group: itself
