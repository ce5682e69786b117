"""What a new user meets first: the installed console script, plugin failures, and bad input
answered with a clear error before any solve starts (issue 12)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import regnde
from regnde import regularizers as R
from regnde import samplers as S
from regnde.plugins import Registry

from .helpers import fake_entry_points

F64 = torch.float64


def console_script() -> list[str]:
    """The installed ``regnde`` executable (next to this interpreter)."""
    exe = Path(sys.executable).with_name("regnde")
    assert exe.exists(), f"the console script is not installed next to {sys.executable}"
    return [str(exe)]


def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
                "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([*console_script(), *args], cwd=cwd, env=full_env, text=True,
                          capture_output=True, timeout=timeout)


# -- the console script ----------------------------------------------------------------------
def test_console_script_run_then_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli("run", "toy-cubic", "--iters", "2", "--out", str(out), "--no-progress",
                   "--threads", "1", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["experiment"] == "toy-cubic" and summary["eval_nfe"] > 0
    for name in ("results.json", "history.json"):
        assert (out / name).exists()
    report = run_cli("report", str(out), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "toy-cubic" in report.stdout and "| none |" in report.stdout

    # a finished run is left alone unless --force
    before = (out / "results.json").read_bytes()
    again = run_cli("run", "toy-cubic", "--iters", "2", "--out", str(out), "--no-progress",
                    cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already holds this run's results" in again.stderr and "--force" in again.stderr
    assert (out / "results.json").read_bytes() == before
    forced = run_cli("run", "toy-cubic", "--iters", "2", "--out", str(out), "--no-progress",
                     "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "results.json").read_text())["created"] >= json.loads(before)[
        "created"]


def test_console_script_help_is_plain_and_lists_every_command(tmp_path: Path) -> None:
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert "``" not in done.stdout and ":func:" not in done.stdout
    for command in ("demo", "plugins", "run", "report"):
        assert command in done.stdout


@pytest.mark.parametrize("args", [["--tol", "-1"], ["--tol", "nan"], ["--tol", "2"],
                                  ["--iters", "0"]])
def test_console_script_demo_refuses_bad_numbers_in_one_line(tmp_path: Path, args) -> None:
    done = run_cli("demo", *args, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert args[0] in done.stderr


def test_console_script_demo_without_torch_says_what_to_install(tmp_path: Path) -> None:
    """A JAX-only install: torch cannot be imported."""
    blocker = tmp_path / "site"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "torchdiffeq", "torchsde"):
                    raise ModuleNotFoundError(f"No module named {name!r}")
                return None
        sys.meta_path.insert(0, _Block())
    """))
    pythonpath = os.pathsep.join([str(blocker), str(Path(__file__).resolve().parents[1])])
    done = run_cli("demo", "--iters", "1", cwd=tmp_path, env={"PYTHONPATH": pythonpath})
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "torch" in done.stderr and "pip install" in done.stderr


@pytest.mark.parametrize(("crash_at", "says"), [
    (0, "nothing was saved yet"), (3, "holds iteration 2"),
])
def test_a_crash_says_what_the_checkpoint_holds(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                crash_at: int, says: str) -> None:
    from regnde.experiments import base
    from regnde.experiments.runner import RunSpec, run

    cls, _ = base.get("toy-cubic", None)
    original = cls.train_step

    def train_step(self, it, lam):
        if it == crash_at:
            raise RuntimeError("boom")
        return original(self, it, lam)

    monkeypatch.setattr(cls, "train_step", train_step)
    spec = RunSpec("toy-cubic", out=tmp_path / "r", iters=5, progress=False,
                   checkpoint_every=2)
    with pytest.raises(RuntimeError, match="boom") as info:
        run(spec)
    notes = " ".join(info.value.__notes__)
    assert says in notes and f"failed at iteration {crash_at}" in notes


# -- plugins that failed to load -------------------------------------------------------------
def test_a_backend_whose_plugin_failed_names_the_plugin_and_the_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REGNDE_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    fake_entry_points(monkeypatch, {
        "mysolver": ModuleNotFoundError("No module named 'mysolver_lib'"),
    })
    reg = Registry()
    regnde.plugins.set_registry(reg)
    for call in (lambda: regnde.methods("mysolver"),
                 lambda: regnde.solve(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]),
                                      backend="mysolver")):
        with pytest.raises(regnde.PluginError) as info:
            call()
        msg = str(info.value)
        assert "unknown" not in msg
        assert "'mysolver'" in msg and "mysolver_lib" in msg and "ModuleNotFoundError" in msg
    # a plain typo is still an unknown name, with the choices
    with pytest.raises(ValueError, match="torchdiffeq"):
        regnde.methods("torchdifeq")


# -- bad input, refused before any solve -----------------------------------------------------
class Counting:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.n += 1
        return -y


T = torch.tensor([0.0, 1.0], dtype=F64)
Y0 = torch.ones(3, dtype=F64)


@pytest.mark.parametrize("bad", [
    {"rtol": torch.tensor(-1.0)}, {"atol": torch.tensor(float("nan"))},
    {"rtol": np.array(-1e-3)}, {"atol": np.float64(math.inf)}, {"rtol": torch.ones(3)},
    {"rtol": "1e-6"},
], ids=["torch-negative", "torch-nan", "numpy-negative", "numpy-inf", "non-scalar", "string"])
def test_tolerances_are_validated_whatever_their_type(bad) -> None:
    f = Counting()
    with pytest.raises(ValueError, match="rtol|atol"):
        regnde.solve(f, Y0, T, **bad)
    assert f.n == 0


def test_tolerance_tensors_with_valid_values_work_as_floats() -> None:
    a = regnde.solve(lambda t, y: -y, Y0, T, rtol=torch.tensor(1e-5), atol=np.array(1e-5))
    b = regnde.solve(lambda t, y: -y, Y0, T, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.ys, b.ys)


def test_negative_or_non_finite_weights_are_refused() -> None:
    for w in (-0.5, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="weight must be finite and >= 0"):
            w * R.LocalError()
    with pytest.raises(ValueError, match="weight"):
        R.LocalError() + (-1.0) * R.GlobalError()


@pytest.mark.parametrize("w", [torch.tensor(0.5), np.array(0.5), np.float32(0.5)],
                         ids=["torch-0d", "numpy-0d", "numpy-scalar"])
def test_zero_d_array_weights_are_accepted(w) -> None:
    reg = w * R.LocalError()
    assert reg.terms()[0][0] == 0.5
    sol = regnde.solve(lambda t, y: -y, Y0, T, regularizer=reg, key=0)
    plain = regnde.solve(lambda t, y: -y, Y0, T, regularizer=R.LocalError(), key=0)
    assert torch.allclose(sol.reg, 0.5 * plain.reg)


def test_non_scalar_or_non_numeric_weights_say_what_is_accepted() -> None:
    for w in (torch.ones(2), "2", [1.0]):
        with pytest.raises(TypeError, match="0-d tensor/array"):
            w * R.LocalError()


@pytest.mark.parametrize("key", [0, 7, torch.Generator().manual_seed(3), None],
                         ids=["int0", "int7", "generator", "none"])
def test_samplers_accept_every_key_form(key) -> None:
    sol = regnde.solve(lambda t, y: -y, Y0, torch.tensor([0.0, 2.0], dtype=F64))
    t0, t1 = torch.tensor(0.0, dtype=F64), torch.tensor(2.0, dtype=F64)
    for sampler in (S.Unbiased(), S.Biased()):
        tau = sampler.sample(sol.trace, t0, t1, key)
        assert 0.0 <= float(tau) <= 2.0
    if isinstance(key, int):  # same seed, same draw
        assert S.Unbiased().sample(None, t0, t1, key) == S.Unbiased().sample(None, t0, t1, key)


def test_samplers_accept_jax_keys() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    t0, t1 = jnp.asarray(0.0), jnp.asarray(1.0)
    for key in (3, jax.random.PRNGKey(3)):
        tau = S.Unbiased().sample(None, t0, t1, key)
        assert 0.0 <= float(tau) <= 1.0


TAB = dict(name="bad", order=2, c=(0.0, 1.0), a=((), (1.0,)), b=(0.5, 0.5),
           b_error=(0.5, -0.5))


@pytest.mark.parametrize(("change", "match"), [
    ({"a": ((), (math.nan,))}, "a holds non-finite"),
    ({"c": (0.0, math.inf)}, "c holds non-finite"),
    ({"b": (math.nan, 0.5)}, "b holds non-finite"),
    ({"b_error": (math.inf, -0.5)}, "b_error holds non-finite"),
    ({"mid": (math.nan, 0.0)}, "mid holds non-finite"),
    ({"b_error": (0.0, 0.0)}, "b_error is all zero"),
    ({"a": ((), (0.7,))}, "row 1 of a sums to 0.7"),
])
def test_tableau_refuses_non_finite_blind_or_inconsistent(change, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        regnde.Tableau(**{**TAB, **change})
    assert "'bad'" in str(info.value)


def test_integer_state_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="y0 must be floating point"):
        regnde.solve(lambda t, y: -y, torch.ones(3, dtype=torch.int64), T)


def test_nan_in_t_is_named() -> None:
    with pytest.raises(ValueError, match="NaN or Inf"):
        regnde.solve(lambda t, y: -y, Y0, torch.tensor([0.0, math.nan, 1.0], dtype=F64))


@pytest.mark.parametrize("wrong", [lambda t, y: y[:, :2], lambda t, y: y.float()],
                         ids=["shape", "dtype"])
def test_torchdiffeq_vector_field_of_the_wrong_shape_or_dtype(wrong) -> None:
    with pytest.raises(ValueError, match="the vector field returned (shape|dtype)"):
        regnde.solve(wrong, torch.ones(4, 3, dtype=F64), T)


class WrongSDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def f(self, t, y):
        return y[:, :1]

    def g(self, t, y):
        return 0.1 * torch.ones_like(y)


def test_torchsde_drift_of_the_wrong_shape() -> None:
    with pytest.raises(ValueError, match="the vector field returned shape"):
        regnde.solve(WrongSDE(), torch.ones(4, 3, dtype=F64), T, key=0)


class SmallSDE(torch.nn.Module):
    noise_type, sde_type = "diagonal", "ito"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(2, 2)

    def f(self, t, y):
        return torch.tanh(self.lin(y))

    def g(self, t, y):
        return 0.1 * torch.ones_like(y)


def test_sde_default_tolerances_are_torchsdes_own() -> None:
    """The issue's call: adaptive Milstein at the ODE default of 1e-6 ran out of steps."""
    y0, t = torch.ones(8, 2), torch.linspace(0, 1, 5)
    sol = regnde.solve(SmallSDE(), y0, t, backend="torchsde", method="milstein", adaptive=True,
                       dt=0.05, regularizer=R.LocalError(), key=9)
    same = regnde.solve(SmallSDE(), y0, t, backend="torchsde", method="milstein",
                        adaptive=True, dt=0.05, regularizer=R.LocalError(), key=9,
                        rtol=1e-5, atol=1e-4)
    assert torch.equal(sol.ys, same.ys) and sol.stats.n_steps < 200


def test_max_steps_message_names_the_tolerances() -> None:
    with pytest.raises(regnde.MaxStepsExceeded, match=r"rtol=1e-09, atol=1e-09"):
        regnde.solve(lambda t, y: torch.sin(40 * t) * y, Y0, torch.tensor([0.0, 10.0]),
                     rtol=1e-9, atol=1e-9, max_steps=20)


def test_diffrax_vector_field_non_finite_midway_is_named() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy

    def f(t, y):
        return jnp.where(t > 0.5, jnp.inf, -y)

    with pytest.raises(regnde.NonFiniteError, match="NaN or Inf"):
        regnde.solve(f, jnp.ones(2), jnp.asarray([0.0, 1.0]))


def test_console_script_is_on_path_for_these_tests() -> None:
    assert shutil.which("regnde", path=str(Path(sys.executable).parent))
