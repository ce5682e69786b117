"""The experiment runner: every experiment end to end in a tiny configuration, resume after an
interrupt, safe checkpoints, data loaders on files written in the real formats, reports."""

from __future__ import annotations

import dataclasses
import gzip
import itertools
import json
import os
import pathlib
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import regnde
from regnde import regularizers as R
from regnde.experiments import checkpoint, data, runner, specs
from regnde.experiments import report as report_mod
from regnde.experiments.checkpoint import CheckpointError
from regnde.experiments.cli import main
from regnde.experiments.report import report

TINY = {
    "digits-node": ["hidden=8", "n_train=64", "n_eval=32", "batch_size=32"],
    "toy-cubic": ["hidden=8", "n_train=32", "n_val=16", "n_test=16", "batch_size=16"],
    "cnf-2d": ["hidden=8", "n_train=64", "n_val=32", "n_test=32", "batch_size=32"],
    "latent-ode": ["hidden=8", "rnn=8", "latent=3", "n_train=16", "n_val=8", "n_test=8",
                   "n_points=5", "batch_size=8"],
    "spiral-sde": ["hidden=8", "paths=8", "n_true=20", "n_times=5"],
    "digits-nsde": ["hidden=8", "n_train=64", "n_eval=32", "batch_size=32"],
    "mnist1d-node": ["hidden=8", "latent=4", "n_train=64", "n_eval=32", "batch_size=32"],
    "mnist1d-nsde": ["hidden=8", "latent=4", "n_train=64", "n_eval=32", "batch_size=32"],
}


pytestmark = pytest.mark.usefixtures("one_thread_float32")


def tiny_args(experiment: str, out: Path, regularizer: str = "none", *extra: str) -> list[str]:
    args = ["run", experiment, "--regularizer", regularizer, "--iters", "2", "--out", str(out),
            "--no-progress"]
    for item in TINY[experiment]:
        args += ["--set", item]
    return args + list(extra)


def tiny_spec(experiment: str, out: Path, regularizer: str = "none", iters: int = 2,
              **kw) -> runner.RunSpec:
    overrides = dict(item.split("=") for item in TINY[experiment])
    return runner.RunSpec(experiment=experiment, regularizer=regularizer, out=out, iters=iters,
                          overrides=overrides, progress=False, **kw)


def read_results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# -- every experiment end to end ----------------------------------------------------------------
@pytest.mark.parametrize("experiment, regularizer", [
    ("digits-node", "local-error-unbiased+global-stiffness"),
    ("toy-cubic", "global-error"),
    ("cnf-2d", "local-error-biased"),
    ("latent-ode", "local-error-reference"),
    ("mnist1d-node", "local-error-unbiased"),
])
def test_experiment_runs_end_to_end(tmp_path, capsys, experiment, regularizer):
    out = tmp_path / "run"
    assert main(tiny_args(experiment, out, regularizer)) == 0
    res = read_results(out)
    assert res["experiment"] == experiment and res["regularizer"] == regularizer
    assert res["iterations"] == 2 and res["seed"] == 0 and res["backend"] == "torchdiffeq"
    for split in ("train", "val", "test"):
        assert np.isfinite(res[split]["metric"]) and res[split]["nfe"] >= 2
    assert res["eval_nfe"] == res["test"]["nfe"]
    assert res["training_seconds"] > 0 and res["prediction_seconds_per_batch"] > 0
    assert res["versions"]["torch"] == torch.__version__ and "regnde" in res["versions"]
    history = json.loads((out / "history.json").read_text())
    assert [h["iteration"] for h in history] == [0, 1]
    assert all(h["reg"] > 0 and h["nfe_reg"] >= 0 for h in history)
    assert (out / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*.tmp")), "temporary files left behind"
    assert json.loads(capsys.readouterr().out)["eval_nfe"] == res["eval_nfe"]


@pytest.mark.parametrize("experiment", ["spiral-sde", "digits-nsde", "mnist1d-nsde"])
def test_sde_experiments(tmp_path, capsys, experiment):
    code = main(tiny_args(experiment, tmp_path / "run", "none"))
    if "torchsde" in regnde.backends():
        assert code == 0 and read_results(tmp_path / "run")["backend"] == "torchsde"
    else:
        assert code == 2
        err = capsys.readouterr().err
        assert "torchsde" in err and "torchdiffeq" in err and "Traceback" not in err


@pytest.mark.parametrize("experiment", ["spiral-sde", "digits-nsde"])
def test_sde_experiments_with_a_stand_in_solver(tmp_path, monkeypatch, experiment):
    """The SDE models, losses and plumbing, with Euler–Maruyama standing in for the torchsde
    backend's regnde.solve (the real call is covered by test_sde_experiments once it exists)."""
    from regnde.experiments import sde
    from regnde.experiments.torch_common import TorchExperiment

    calls = []

    def stand_in(self, f, y0, t, regularizer, key, **options):
        assert options == {"adaptive": True, "dt": self.config.dt}
        assert regnde.api.is_sde(f) and (f.noise_type, f.sde_type) == ("diagonal", "ito")
        gen = torch.Generator().manual_seed(key)
        ys, y = [y0], y0
        for t0, t1 in itertools.pairwise(t):
            h = t1 - t0
            noise = torch.randn(y.shape, generator=gen) * h.sqrt()
            y = y + f.f(t0, y) * h + f.g(t0, y) * noise
            ys.append(y)
        calls.append(self.backend)
        reg = None if regularizer is None else (ys[-1] ** 2).mean()
        return regnde.Solution(ys=torch.stack(ys), reg=reg, stats=regnde.Stats(nfe=len(t) - 1))

    monkeypatch.setattr(sde, "_need_torchsde", lambda name, backend: None)
    monkeypatch.setattr(TorchExperiment, "solve", stand_in)
    res = runner.run(tiny_spec(experiment, tmp_path, "global-error"))
    assert res["backend"] == "torchsde" and set(calls) == {"torchsde"}
    from regnde.experiments import base
    assert np.isfinite(res["test"]["metric"])
    assert res["lam"] == base.get(experiment, None)[0].lam_defaults["error"]  # the default
    params = checkpoint.load(tmp_path / "checkpoint.pt")[0]["model"]
    assert any("diffusion" in k for k in params)


@pytest.mark.skipif("torchsde" not in regnde.backends(), reason="needs the torchsde backend")
def test_spiral_sde_evaluates_with_eval_paths(tmp_path, monkeypatch):
    """Training samples ``paths`` trajectories per solve, evaluation ``eval_paths`` (so the
    validation metric that picks lambda is not dominated by Monte-Carlo noise)."""
    from regnde.experiments.torch_common import TorchExperiment

    seen: list[tuple[bool, int]] = []
    solve = TorchExperiment.solve

    def recording(self, f, y0, *args, **kw):
        seen.append((self.model.training, y0.shape[0]))
        return solve(self, f, y0, *args, **kw)

    monkeypatch.setattr(TorchExperiment, "solve", recording)
    spec = tiny_spec("spiral-sde", tmp_path, "none")
    res = runner.run(dataclasses.replace(spec, overrides={**spec.overrides, "eval_paths": "24"}))
    assert [n for training, n in seen if training] == [8, 8]
    assert [n for training, n in seen if not training] == [24, 24, 24]  # train, val, test
    assert np.isfinite(res["val"]["metric"])


def test_none_ignores_coefficients_and_costs_nothing(tmp_path):
    res = runner.run(tiny_spec("toy-cubic", tmp_path, "none", lam="5,6"))
    assert res["lam"] == "0" and len(res["lam_candidates"]) == 1
    history = json.loads((tmp_path / "history.json").read_text())
    assert all(h["reg"] == 0 and h["nfe_reg"] == 0 for h in history)


# -- regularizer names and coefficients -------------------------------------------------------
def test_every_available_name_builds_a_regularizer():
    for name in ("global-error", "global-stiffness", "local-error-unbiased",
                 "local-error-biased", "local-stiffness"):
        sched = specs.ScheduledRegularizer(name, "2", 10)
        assert isinstance(sched.at(0), R.Regularizer)
    ref = specs.lookup("local-error-reference").factory()
    assert (ref.dt, ref.first_stage) == ("initial", "constant")
    both = specs.ScheduledRegularizer("local-error-unbiased+global-stiffness", "2:1+0.5", 10)
    assert [round(c, 6) for c in both.coefficients(10)] == [1.0, 0.5]
    assert [c for c, _ in both.at(0).terms()] == [2.0, 0.5]
    assert specs.ScheduledRegularizer("none", "3", 10).at(0) is None


def test_schedules_follow_the_references():
    exp = specs.parse_schedule("2.5:1.0", 100)
    assert exp(0) == pytest.approx(2.5) and exp(100) == pytest.approx(1.0)
    assert exp(50) == pytest.approx(np.sqrt(2.5))
    assert specs.parse_schedule("cos:1:0", 10)(10) == pytest.approx(0.0)
    assert specs.default_lam("global-error+local-stiffness", {"error": "2.5:1.0",
                                                              "stiffness": "0.01"}) \
        == "2.5:1.0+0.01"
    with pytest.raises(ValueError, match="X:Y"):
        specs.parse_schedule("a:b", 10)
    with pytest.raises(ValueError, match="one coefficient per term"):
        specs.ScheduledRegularizer("global-error+global-stiffness", "1+2+3", 10)


def test_unknown_regularizer_lists_valid_names(tmp_path, capsys):
    assert main(tiny_args("toy-cubic", tmp_path, "local-error-fancy")) == 2
    err = capsys.readouterr().err
    assert "local-error-fancy" in err and "local-error-unbiased" in err and "global-error" in err
    with pytest.raises(ValueError, match="cannot be summed"):
        specs.parse_regularizer("none+global-error")


def test_library_regularizers_are_looked_up_by_name(monkeypatch):
    monkeypatch.delattr(R, "TaylorDerivative", raising=False)
    with pytest.raises(ValueError, match=r"regnde\.regularizers\.TaylorDerivative"):
        specs.ScheduledRegularizer("taynode-3", "1", 10)

    class Taylor(R.GlobalError):
        def __init__(self, order: int):
            super().__init__()
            self.order = order

    monkeypatch.setattr(R, "TaylorDerivative", Taylor, raising=False)
    assert specs.ScheduledRegularizer("taynode-3", "1", 10).objects[0].order == 3
    monkeypatch.delattr(R, "KineticEnergy", raising=False)
    with pytest.raises(ValueError, match="KineticEnergy"):
        specs.ScheduledRegularizer("rnode", "1", 10)


def test_unknown_experiment_backend_and_setting(tmp_path, capsys):
    assert main(["run", "mnist-gan", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "mnist-gan" in err and "digits-node" in err and "latent-ode" in err
    assert main(["run", "digits-node", "--backend", "torchsde", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "torchdiffeq" in err and "diffrax" in err
    assert main(tiny_args("toy-cubic", tmp_path, "none", "--set", "widht=3")) == 2
    err = capsys.readouterr().err
    assert "widht" in err and "hidden" in err
    assert main(tiny_args("toy-cubic", tmp_path, "none", "--set", "hidden=wide")) == 2
    assert "int" in capsys.readouterr().err


# -- lambda chosen on validation ------------------------------------------------------------
def test_selection_uses_validation_only():
    class Cls:
        higher_is_better, select_tolerance, select_relative = True, 0.01, False

    cands = [{"lam": "a", "val": {"metric": 0.90, "nfe": 30}},
             {"lam": "b", "val": {"metric": 0.895, "nfe": 20}},
             {"lam": "c", "val": {"metric": 0.80, "nfe": 14}}]
    assert runner.select(cands, Cls)["lam"] == "b"
    Cls.higher_is_better = False  # a loss: 0.80 is best, the others are far worse
    assert runner.select(cands, Cls)["lam"] == "c"


def test_selection_compares_with_the_vanilla_run():
    class Acc:
        higher_is_better, select_tolerance, select_relative = True, 0.01, False

    class Mse:
        higher_is_better, select_tolerance, select_relative = False, 0.05, True

    cands = [{"lam": "a", "val": {"metric": 0.90, "nfe": 30}},
             {"lam": "b", "val": {"metric": 0.885, "nfe": 20}},
             {"lam": "c", "val": {"metric": 0.80, "nfe": 14}}]
    # within one point of the best candidate (0.90) would allow only a; of vanilla's 0.89: b
    assert runner.select(cands, Acc)["lam"] == "a"
    assert runner.select(cands, Acc, reference=0.89)["lam"] == "b"
    # no candidate within one point of vanilla: the most accurate one, not the cheapest
    assert runner.select(cands, Acc, reference=0.95)["lam"] == "a"
    mse = [{"lam": "a", "val": {"metric": 1.00, "nfe": 30}},
           {"lam": "b", "val": {"metric": 1.04, "nfe": 20}},
           {"lam": "c", "val": {"metric": 1.06, "nfe": 14}}]
    assert runner.select(mse, Mse, reference=1.0)["lam"] == "b"  # 5% of vanilla's MSE
    assert runner.select(mse, Mse, reference=1.02)["lam"] == "c"
    # of equal NFE (a floor), the weakest coefficient, whatever the noise in their metrics
    floor = [{"lam": "100", "val": {"metric": 0.57, "nfe": 20}},
             {"lam": "10", "val": {"metric": 0.55, "nfe": 20}},
             {"lam": "1", "val": {"metric": 0.58, "nfe": 26}}]
    assert runner.select(floor, Acc, reference=0.56)["lam"] == "10"
    assert runner.strength("cos:1:2+0.01") == (1.0, 2.0, 0.01)


def test_sweep_lam_scales_every_coefficient():
    assert specs.sweep_lam("global-error", "2.5:1.0") == "0.25:0.1,2.5:1,25:10"
    assert specs.sweep_lam("global-error+rnode", "cos:1:2+0.01") == (
        "cos:0.1:0.2+0.001,cos:1:2+0.01,cos:10:20+0.1")
    assert specs.sweep_lam("none", "1") == "0"
    assert specs.sweep_lam("steer", "0.5") == "0.1,0.5,0.9"  # a fraction in (0, 1)
    assert specs.sweep_lam("global-error+steer", "2+0.5") == "0.2+0.1,2+0.5,20+0.9"
    with pytest.raises(ValueError, match="NFE target"):
        specs.sweep_lam("global-error", "budget:40")
    with pytest.raises(ValueError, match="already lists several"):
        specs.sweep_lam("global-error", "1,2")


def test_sweep_adds_candidates_only_where_it_does_not_bracket_the_choice():
    # (factor, within tolerance, validation NFE)
    # the strongest is within the tolerance and still lowers NFE: a decade further
    assert specs.next_factor([(0.1, True, 80), (1, True, 60), (10, True, 40)]) == 100
    assert specs.next_factor([(1, True, 60)]) == 10
    # the strongest is within but NFE stopped falling (a floor): nothing to gain further up
    assert specs.next_factor([(0.1, True, 80), (1, True, 40), (10, True, 40)]) is None
    # the edge of the tolerance lies between the strongest within and the next one: middle
    mid = specs.next_factor([(0.1, True, 80), (1, False, 40), (10, False, 20)])
    assert mid == pytest.approx(0.1 * 10**0.5)
    # ... also where a weaker candidate ties the strongest within at its NFE (mnist1d-node's
    # global error: 0.1 and 1 at 26, 10 outside at 20)
    assert specs.next_factor([(0.1, True, 26), (1, True, 26), (10, False, 20)]) == \
        pytest.approx(10**0.5)
    # ... refined down to a factor SWEEP_FINEST apart, then not any more
    assert specs.next_factor([(0.1, True, 80), (0.178, False, 70)]) is None
    # a stronger candidate outside the tolerance without a lower NFE points at no edge
    assert specs.next_factor([(0.1, True, 80), (1, False, 85)]) is None
    # no candidate within the tolerance: the most accurate is reported, nothing added
    assert specs.next_factor([(0.1, False, 80), (1, False, 40)]) is None
    assert specs.refinable("global-error+rnode") and not specs.refinable("global-error+steer")
    assert specs.scale_lam("0.2", 10**0.5) == "0.632" and specs.scale_lam("2", 100) == "200"


def test_sweep_trains_the_added_candidates_and_reuses_them(tmp_path, monkeypatch):
    """The runner's loop with a stand-in for training: validation MSE and NFE as functions of
    the coefficient (the tolerance is crossed between 0.2 and 2, NFE falls throughout)."""
    trained: list[str] = []

    class Fake:
        def __init__(self, lam: str):
            self.lam = float(lam)

        def evaluate(self, split: str) -> dict:
            return {"metric": 1.0 + 0.1 * self.lam, "nfe": 100.0 / (1.0 + self.lam),
                    "seconds_per_batch": 0.0}

        def versions(self) -> dict:
            return {}

    def fake_train(cls, config, backend, spec, lam, where, callback=None):
        trained.append(lam)
        return Fake(lam), [{"nfe": 1.0, "seconds": 0.0}], 0.0

    vanilla = tmp_path / "none"
    vanilla.mkdir()
    (vanilla / "results.json").write_text(json.dumps(
        {"regularizer": "none", "experiment": "toy-cubic", "val": {"metric": 1.0}}))
    monkeypatch.setattr(runner, "train", fake_train)
    spec = tiny_spec("toy-cubic", tmp_path / "run", "global-error", lam="0.2", sweep=True,
                     baseline=vanilla)
    res = runner.run(spec)
    # 0.02 / 0.2 / 2: 0.2 chosen (2 is 20% worse, at lower NFE), so their middle 0.632; it is
    # 6.3% worse, so the middle of 0.2 and 0.632
    assert trained == ["0.02", "0.2", "2", "0.632", "0.356"]
    assert [c["lam"] for c in res["lam_candidates"]] == trained
    assert res["lam"] == "0.356"  # MSE 1.036 within 5% of 1.0, NFE 73.7 < 83.3
    trained.clear()
    assert runner.run(spec)["complete"] is True and trained == []  # reused, nothing retrained


def test_sweep_lam_from_the_command_line_picks_by_the_vanilla_run(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(tiny_args("toy-cubic", runs / "none" / "seed0")) == 0
    args = tiny_args("toy-cubic", runs / "global-error" / "seed0", "global-error",
                     "--sweep-lam", "--lam", "2")
    assert main(args) == 0
    res = read_results(runs / "global-error" / "seed0")
    lams = [c["lam"] for c in res["lam_candidates"]]
    assert lams[:3] == ["0.2", "2", "20"] and len(lams) <= 3 + specs.SWEEP_EXTRA
    assert res["sweep"] == specs.SWEEP_RULE
    # the same command again reuses the finished sweep, extra candidates included
    assert runner.run(tiny_spec("toy-cubic", runs / "global-error" / "seed0", "global-error",
                                lam="2", sweep=True))["complete"] is True
    vanilla = read_results(runs / "none" / "seed0")
    assert res["selection"]["reference"]["metric"] == vanilla["val"]["metric"]
    assert "vanilla run's validation mse" in res["selection"]["rule"]
    capsys.readouterr()
    assert main(["report", str(runs), "--out", str(tmp_path / "r.md")]) == 0
    assert (tmp_path / "r-pareto.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no results.json there"):
        runner.run(tiny_spec("toy-cubic", tmp_path / "x", "global-error", lam="1,2",
                             baseline=tmp_path / "nowhere"))


def test_coefficient_sweep_trains_each_candidate(tmp_path):
    res = runner.run(tiny_spec("toy-cubic", tmp_path, "global-error", lam="0.5,2"))
    assert [c["lam"] for c in res["lam_candidates"]] == ["0.5", "2"]
    assert res["lam"] in ("0.5", "2")
    for c in res["lam_candidates"]:
        assert (Path(c["dir"]) / "checkpoint.pt").exists() and "test" not in c
    assert (tmp_path / "lam=0.5" / "results.json").exists() is False


# -- resume ---------------------------------------------------------------------------------
def _interrupt_at(k: int):
    def callback(done: int) -> None:
        if done == k:
            raise KeyboardInterrupt
    return callback


@pytest.mark.parametrize("experiment, regularizer", [
    ("digits-node", "local-error-unbiased"),
    ("latent-ode", "local-error-biased"),  # also resumes the reparameterisation noise
])
def test_resume_after_interrupt_is_exact(tmp_path, experiment, regularizer):
    iters = 4
    full = runner.run(tiny_spec(experiment, tmp_path / "full", regularizer, iters=iters))
    spec = tiny_spec(experiment, tmp_path / "cut", regularizer, iters=iters,
                     checkpoint_every=100)
    with pytest.raises(runner.RunInterrupted, match="iteration 2 of 4"):
        runner.run(spec, callback=_interrupt_at(2))
    _, meta = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")
    assert meta["iteration"] == 2 and len(meta["history"]) == 2
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = runner.run(spec)
    a, _ = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    b, meta_b = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")
    assert meta_b["iteration"] == iters
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert torch.equal(a["gen"], b["gen"])
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in meta_b["history"]]
    _, meta_a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    assert strip == [{k: v for k, v in h.items() if k != "seconds"}
                     for h in meta_a["history"]]
    assert resumed["test"]["metric"] == full["test"]["metric"]
    assert resumed["eval_nfe"] == full["eval_nfe"]


def test_ctrl_c_stops_after_the_current_iteration(tmp_path):
    def callback(done: int) -> None:
        if done == 1:
            os.kill(os.getpid(), signal.SIGINT)

    spec = tiny_spec("toy-cubic", tmp_path, "global-error", iters=3, checkpoint_every=100)
    before = signal.getsignal(signal.SIGINT)  # pytest's default; SIG_IGN in an xdist worker
    with pytest.raises(runner.RunInterrupted, match="all 1 finished iterations are saved"):
        runner.run(spec, callback=callback)
    assert checkpoint.load(tmp_path / "checkpoint.pt")[1]["iteration"] == 1
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    assert runner.run(spec)["iterations"] == 3


def test_finished_run_is_not_retrained(tmp_path):
    spec = tiny_spec("toy-cubic", tmp_path, "global-error")
    first = runner.run(spec)
    calls = []
    second = runner.run(spec, callback=calls.append)
    assert calls == [] and second["training_seconds"] == first["training_seconds"]
    assert second["test"]["metric"] == first["test"]["metric"]


# -- checkpoints that must be refused ---------------------------------------------------------
def test_run_dir_of_another_experiment_is_refused(tmp_path, capsys):
    runner.run(tiny_spec("toy-cubic", tmp_path))
    assert main(tiny_args("digits-node", tmp_path)) == 2
    err = capsys.readouterr().err
    assert "toy-cubic" in err and "digits-node" in err and "--out" in err
    with pytest.raises(CheckpointError, match="seed: 0 there, 1 here"):
        runner.run(tiny_spec("toy-cubic", tmp_path, seed=1))


def test_a_finished_run_with_other_settings_is_not_taken_for_this_one(tmp_path):
    """A changed setting (or a changed default) is another run: not skipped as finished, and
    its checkpoint is refused by name instead of being resumed."""
    runner.run(tiny_spec("toy-cubic", tmp_path))
    spec = tiny_spec("toy-cubic", tmp_path)
    spec.overrides["hidden"] = "5"
    with pytest.raises(CheckpointError, match="hidden"):
        runner.run(spec)


class Hostile:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@pytest.mark.parametrize("kind", ["garbage", "truncated", "hostile", "foreign"])
def test_bad_checkpoint_gives_a_clear_error(tmp_path, kind):
    out = tmp_path / "run"
    spec = tiny_spec("toy-cubic", out)
    runner.run(spec)
    ckpt = out / "checkpoint.pt"
    marker = tmp_path / "pwned"
    if kind == "garbage":
        ckpt.write_bytes(b"\x00not a checkpoint" * 10)
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[:300])
    elif kind == "hostile":
        torch.save({"format": checkpoint.FORMAT, "meta": "{}", "state": Hostile(marker)}, ckpt)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    with pytest.raises(CheckpointError, match=str(ckpt)) as info:
        runner.run(dataclasses.replace(spec, force=True))  # a finished run is not reloaded
    assert "Delete" in str(info.value) or "delete" in str(info.value)
    assert not marker.exists(), "loading the checkpoint ran code from it"


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    checkpoint.write_json(target, {"a": 1})

    def broken(fh):
        fh.write('{"half": ')
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# -- data loaders -----------------------------------------------------------------------------
def write_mnist(root: Path, n_train: int = 40, n_test: int = 20, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    suffix = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        data.write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}",
                       rng.integers(0, 256, (n, 28, 28)))
        data.write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", rng.integers(0, 10, n))


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_loader(tmp_path, gz):
    write_mnist(tmp_path / "raw", gz=gz)
    mnist = data.load_mnist(tmp_path)
    x, y = mnist["train"]
    assert x.shape == (40, 784) and x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1
    assert mnist["test"][0].shape == (20, 784) and y.dtype == np.int64
    raw = gzip.open if gz else open
    with raw(tmp_path / "raw" / f"t10k-labels-idx1-ubyte{'.gz' if gz else ''}", "rb") as fh:
        assert list(mnist["test"][1]) == list(fh.read()[8:])


def test_mnist_loader_rejects_bad_paths(tmp_path):
    with pytest.raises(data.DataError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path / "nowhere")
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte"):
        data.load_mnist(tmp_path)
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as fh:
        fh.write(b"PK\x03\x04 this is a zip file")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.load_mnist(tmp_path)
    data.write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3, dtype=np.uint8))
    with pytest.raises(data.DataError, match="20 images but 3 labels"):
        data.load_mnist(tmp_path)


def test_digits_node_on_mnist_files(tmp_path):
    write_mnist(tmp_path / "mnist")
    res = runner.run(tiny_spec("digits-node", tmp_path / "run", data=str(tmp_path / "mnist")))
    assert res["data"] == str(tmp_path / "mnist") and res["config"]["n_train"] == 64
    assert res["test"]["examples"] == 20 and res["train"]["examples"] == 36


def write_physionet(root: Path, n: int = 12) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        t_len = int(rng.integers(3, 8))
        tt = torch.tensor(np.sort(rng.choice(np.arange(0, 480), t_len, replace=False)) / 10.0)
        mask = torch.tensor(rng.uniform(size=(t_len, 41)) > 0.7, dtype=torch.float32)
        vals = torch.tensor(rng.normal(80, 20, size=(t_len, 41)), dtype=torch.float32) * mask
        records.append((str(130000 + i), tt, vals, mask, torch.zeros(5)))
    path = root / "processed" / "set-a_0.1.pt"
    path.parent.mkdir(parents=True)
    torch.save(records, path)
    return path


def test_physionet_loader(tmp_path):
    path = write_physionet(tmp_path)
    recs = data.load_physionet(tmp_path)
    assert len(recs.items) == 12 and recs.dim == 41
    assert data.load_physionet(path).items[0][0] == "130000"
    for _, tt, vals, mask in recs.items:
        assert tt.max() <= 1.0 and np.all(np.diff(tt) > 0)
        assert vals[mask > 0].min() >= 0 and vals[mask > 0].max() <= 1 + 1e-12
    res = runner.run(tiny_spec("latent-ode", tmp_path / "run", data=str(tmp_path)))
    assert np.isfinite(res["test"]["metric"])


def test_physionet_loader_rejects_bad_files(tmp_path):
    with pytest.raises(data.DataError, match="set-a_"):
        data.load_physionet(tmp_path / "missing")
    with pytest.raises(data.DataError, match=r"processed/set-a_<q>\.pt"):
        data.load_physionet(tmp_path)
    (tmp_path / "processed").mkdir()
    torch.save({"not": "records"}, tmp_path / "processed" / "set-a_0.1.pt")
    with pytest.raises(data.DataError, match="list of records"):
        data.load_physionet(tmp_path)
    torch.save([("1", torch.zeros(3), torch.zeros(4, 41), torch.zeros(4, 41), None)],
               tmp_path / "processed" / "set-a_0.1.pt")
    with pytest.raises(data.DataError, match="record 0"):
        data.load_physionet(tmp_path)


def test_synthetic_series_noise_is_seeded_gaussian_on_observed_values_only():
    clean = data.irregular_series(300, 20, 3, seed=4)
    noisy = data.irregular_series(300, 20, 3, seed=4, noise=0.1)
    again = data.irregular_series(300, 20, 3, seed=4, noise=0.1)
    other = data.irregular_series(300, 20, 3, seed=5, noise=0.1)
    resid = []
    for (_, t0, v0, m0), (_, t1, v1, m1), (_, _, v2, _) in zip(
            clean.items, noisy.items, again.items, strict=True):
        # the noiseless series, times and masks do not depend on the noise
        np.testing.assert_array_equal(t0, t1)
        np.testing.assert_array_equal(m0, m1)
        np.testing.assert_array_equal(v1, v2)
        assert np.all(v1[m1 == 0] == 0)
        resid.append((v1 - v0)[m1 > 0])
    r = np.concatenate(resid)
    assert r.size > 10_000
    assert abs(r.std() - 0.1) < 0.004 and abs(r.mean()) < 0.004
    # Gaussian: about 68.3% within one standard deviation (not uniform: 57.7%)
    assert abs(np.mean(np.abs(r) < 0.1) - 0.683) < 0.02
    assert not np.array_equal(noisy.items[0][2], other.items[0][2])


def test_latent_ode_noise_setting_reaches_the_data(tmp_path, monkeypatch):
    made: list[data.Records] = []
    original = data.irregular_series

    def spy(*args, **kw):
        made.append(original(*args, **kw))
        return made[-1]

    monkeypatch.setattr(data, "irregular_series", spy)
    spec = tiny_spec("latent-ode", tmp_path / "run")
    spec.overrides["noise"] = "0.2"
    res = runner.run(spec)
    assert res["config"]["noise"] == 0.2 and len(made) == 3
    clean = original(16, 5, 3, 0)  # the training split, noiseless
    r = np.concatenate([(v - v0)[m > 0] for (_, _, v, m), (_, _, v0, _)
                        in zip(made[0].items, clean.items, strict=True)])
    assert 0.1 < r.std() < 0.3


def test_miniboone_loader(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "miniboone").mkdir()
    np.save(tmp_path / "miniboone" / "data.npy", rng.normal(3, 2, size=(200, 43)))
    parts = data.load_miniboone(tmp_path)
    assert {k: v.shape for k, v in parts.items()} == {"train": (162, 43), "val": (18, 43),
                                                      "test": (20, 43)}
    both = np.vstack([parts["train"], parts["val"]])
    assert np.allclose(both.mean(0), 0, atol=1e-5) and np.allclose(both.std(0), 1, atol=1e-4)
    res = runner.run(tiny_spec("cnf-2d", tmp_path / "run", data=str(tmp_path)))
    assert np.isfinite(res["test"]["metric"]) and res["test"]["examples"] == 20


def test_miniboone_loader_rejects_bad_files(tmp_path):
    with pytest.raises(data.DataError, match=r"data\.npy"):
        data.load_miniboone(tmp_path / "missing")
    with pytest.raises(data.DataError, match=r"miniboone/data\.npy"):
        data.load_miniboone(tmp_path)
    np.save(tmp_path / "data.npy", np.zeros((50, 7)))
    with pytest.raises(data.DataError, match=r"\(N, 43\)"):
        data.load_miniboone(tmp_path)
    (tmp_path / "data.npy").write_bytes(b"not numpy")
    with pytest.raises(data.DataError, match=r"not a \.npy"):
        data.load_miniboone(tmp_path / "data.npy")


def test_data_path_errors_reach_the_command_line(tmp_path, capsys):
    args = tiny_args("digits-node", tmp_path / "run", "none", "--data", str(tmp_path / "x"))
    assert main(args) == 2
    assert "t10k-images-idx3-ubyte" in capsys.readouterr().err


# -- report -----------------------------------------------------------------------------------
def test_report_tables_and_plot(tmp_path, capsys):
    for reg in ("none", "global-error"):
        for seed in (0, 1):
            runner.run(tiny_spec("toy-cubic", tmp_path / "runs" / reg / f"s{seed}", reg,
                                 seed=seed))
    out = tmp_path / "report.md"
    assert main(["report", str(tmp_path / "runs"), "--out", str(out)]) == 0
    text = out.read_text()
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| Method | Seeds") and "NFE ratio" in lines[0]
    assert lines[1].startswith("| none | 2 |") and "1.00x" in lines[1]
    assert lines[2].startswith("| global-error | 2 | 1.0 |") and "±" in lines[2]
    assert (tmp_path / "report.png").read_bytes()[:4] == b"\x89PNG"
    text2 = report([tmp_path / "runs" / "none"])
    assert "global-error" not in text2 and "| none | 2 |" in text2
    with pytest.raises(ValueError, match=r"no results\.json"):
        report([tmp_path / "runs" / "none" / "s0" / "history.json"])


def test_report_takes_times_from_timing_runs(tmp_path):
    for reg in ("none", "global-error"):
        runner.run(tiny_spec("toy-cubic", tmp_path / "runs" / reg / "s0", reg))
        runner.run(tiny_spec("toy-cubic", tmp_path / "timing" / reg / "s0", reg))
    res = read_results(tmp_path / "runs" / "none" / "s0")
    assert res["train_seconds_per_iter_median"] > 0 and res["train_warmup_seconds"] > 0
    assert res["test"]["seconds_per_batch_median"] > 0
    both = report([tmp_path / "runs"], timing=[tmp_path / "timing"])
    alone = report([tmp_path / "runs"])
    assert "*" not in both.split("Times without")[0] and "one run at a time" in both
    assert "| none | 1 | – |" in alone and "*" in alone and "shared the machine" in alone
    timed = read_results(tmp_path / "timing" / "global-error" / "s0")
    row = next(line for line in both.splitlines() if line.startswith("| global-error"))
    assert f"| {timed['training_seconds']:.1f} |" in row
    # a timing run at another coefficient than the table's is not this row's time
    runner.run(tiny_spec("toy-cubic", tmp_path / "timing2" / "global-error" / "s0",
                         "global-error", lam="3"))
    other = report([tmp_path / "runs"], timing=[tmp_path / "timing2"])
    row = next(line for line in other.splitlines() if line.startswith("| global-error"))
    assert "*" in row
    # ... nor one made with another configuration
    spec = tiny_spec("toy-cubic", tmp_path / "timing3" / "none" / "s0")
    runner.run(dataclasses.replace(spec, overrides={**spec.overrides, "range": "1.5"}))
    other = report([tmp_path / "runs"], timing=[tmp_path / "timing3"])
    assert "| none | 1 | – |" in other and "*" in other.split("| none | 1 | – |")[1].split("\n")[0]


def test_report_splits_local_vs_global_training_time(tmp_path):
    def run_dir(name: str, nfe: float, nfe_reg: float, seconds: float) -> dict:
        d = tmp_path / name
        d.mkdir()
        (d / "history.json").write_text(json.dumps(
            [{"nfe": nfe, "nfe_reg": nfe_reg, "seconds": seconds}] * 4))
        return {report_mod.RUN_DIR: str(d)}

    # local: 4 x 0.30 s over 4 x (20 + 10) evaluations; global: 4 x 0.25 s over 4 x 25
    runs = {"local-error-unbiased": run_dir("l", 20, 10, 0.30),
            "global-error": run_dir("g", 25, 0, 0.25), "none": run_dir("n", 30, 0, 0.2)}
    (line,) = report_mod.local_vs_global(runs)
    assert line == ("local-error-unbiased vs global-error: 1.2 s vs 1.0 s of training, 30.0 vs "
                    "25.0 evaluations per iteration at 10.00 vs 10.00 ms each: local trains "
                    "slower (more evaluations per iteration).")
    runs["global-error"] = run_dir("g2", 20, 0, 0.5)
    assert report_mod.local_vs_global(runs)[0].endswith("local trains faster.")
    # 3 % more time per evaluation is timing noise, not a reason; 10 % is one
    runs["global-error"] = run_dir("g3", 30, 0, 0.3 / 1.03)
    assert report_mod.local_vs_global(runs)[0].endswith("slower (each factor within 5 %).")
    runs["global-error"] = run_dir("g4", 30, 0, 0.3 / 1.1)
    assert report_mod.local_vs_global(runs)[0].endswith("slower (more time per evaluation).")
    del runs["global-error"]
    assert report_mod.local_vs_global(runs) == []


def test_steer_term_becomes_a_random_end_time_while_training():
    t = torch.tensor([0.0, 1.0])
    reg = 0.5 * specs.Steer() + 2.0 * R.LocalError()
    rest, b = specs.split_steer(reg, t)
    assert b == 0.5 and [c for c, _ in rest.terms()] == [2.0]
    assert specs.split_steer(0.5 * specs.Steer(), t) == (None, 0.5)
    assert specs.split_steer(None, t) == (None, None)
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        specs.split_steer(1.5 * specs.Steer(), t)
    assert "steer" in specs.regularizer_names(available_only=True)


def test_steer_runs_end_to_end_and_changes_training_only(tmp_path):
    args = ["--lam", "0.5+1.0"]
    assert main(tiny_args("digits-node", tmp_path / "s", "steer+local-error-unbiased", *args)) == 0
    assert main(tiny_args("digits-node", tmp_path / "p", "local-error-unbiased", "--lam",
                          "1.0")) == 0
    steer = json.loads((tmp_path / "s" / "history.json").read_text())
    plain = json.loads((tmp_path / "p" / "history.json").read_text())
    # same weights and batch at iteration 0: only the random end time differs
    assert steer[0]["task_loss"] != plain[0]["task_loss"]
