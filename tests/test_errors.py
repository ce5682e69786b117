"""Bad input: each raises an error whose message says what was given and what is allowed."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

import regnde
from regnde.plugins import ENV_DISABLE, Registry
from regnde.regularizers import GlobalError

from .helpers import (
    F64,
    MLP,
    Counted,
    fake_backend_class,
    fake_entry_points,
    plugin_module,
    times,
    y0_for,
)


def _solve(**kw):
    f = kw.pop("f", MLP())
    y0 = kw.pop("y0", y0_for())
    t = kw.pop("t", times(1))
    return regnde.solve(f, y0, t, **kw)


@pytest.fixture
def fake_backend(registry: Registry) -> Registry:
    cls = fake_backend_class()

    def regnde_register_backends(register):
        register("fakenp", cls)

    registry.add(plugin_module("fb", regnde_register_backends=regnde_register_backends),
                 name="fakeplugin")
    return registry


def test_unknown_backend_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        _solve(backend="torchdifeq")
    msg = str(info.value)
    assert "'torchdifeq'" in msg and "torchdiffeq" in msg.split("'torchdifeq'")[1]


def test_unknown_backend_of_a_known_suite_says_how_to_install() -> None:
    from regnde.plugins import DEFAULT_PLUGINS, set_registry

    without_jax = tuple(p for p in DEFAULT_PLUGINS if p != "regnde.adapters.jax.diffrax")
    old = set_registry(Registry(builtins=without_jax, autoload=False))
    try:
        with pytest.raises(ValueError,
                           match=r"unknown backend 'diffrax'.*pip install regnde\[jax\]"):
            _solve(backend="diffrax")
    finally:
        set_registry(old)


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(ValueError) as info:
        _solve(method="dopri6")
    msg = str(info.value)
    assert "'dopri6'" in msg
    for m in ("bosh3", "dopri5", "dopri8", "fehlberg2", "heun", "tsit5"):
        assert m in msg
    with pytest.raises(ValueError, match="dopri5"):
        regnde.step(MLP(), 0.0, y0_for(), method="rk4")


def test_method_of_another_backend_names_that_backend(fake_backend: Registry) -> None:
    with pytest.raises(ValueError) as info:
        _solve(method="kvaerno5")
    msg = str(info.value)
    assert "'kvaerno5'" in msg and "backend 'torchdiffeq'" in msg
    assert "It is a method of backend(s): fakenp" in msg


def test_backend_that_does_not_take_y0(fake_backend: Registry) -> None:
    with pytest.raises(ValueError) as info:
        _solve(backend="fakenp")
    msg = str(info.value)
    assert "backend 'fakenp' takes numpy arrays" in msg and "torch.Tensor" in msg
    assert "backend='torchdiffeq' fits y0" in msg


def test_backend_cannot_be_inferred_from_y0() -> None:
    with pytest.raises(ValueError, match=r"cannot infer a backend.*numpy\.ndarray.*torchdiffeq"):
        regnde.solve(lambda t, y: -y, np.zeros(2), np.array([0.0, 1.0]))


def test_t_and_y0_of_different_dtype() -> None:
    with pytest.raises(ValueError) as info:
        _solve(t=times(1).float())
    msg = str(info.value)
    assert "torch.float32" in msg and "torch.float64" in msg and "convert t" in msg


def test_t_and_y0_of_different_framework() -> None:
    with pytest.raises(ValueError, match=r"t is a numpy\.ndarray but y0 is a torch\.Tensor"):
        _solve(t=np.array([0.0, 1.0]))


@pytest.mark.parametrize("t", [[0.0, 1.0, 0.5], [0.0, 0.0, 1.0], [1.0, 0.0, 0.5]])
def test_non_monotonic_t(t: list[float]) -> None:
    with pytest.raises(ValueError, match="strictly increasing or strictly decreasing"):
        _solve(t=torch.tensor(t, dtype=F64))


@pytest.mark.parametrize("t", [torch.tensor([0.0], dtype=F64), torch.zeros(2, 2, dtype=F64),
                               torch.tensor(1.0, dtype=F64)])
def test_t_not_a_1d_array_of_two_or_more(t: torch.Tensor) -> None:
    with pytest.raises(ValueError, match=r"1-D array of at least two output times.*shape"):
        _solve(t=t)


def test_non_finite_t() -> None:
    with pytest.raises(ValueError, match="finite"):
        _solve(t=torch.tensor([0.0, 1.0, math.inf], dtype=F64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_y0(bad: float) -> None:
    y0 = y0_for()
    y0[1, 2] = bad
    with pytest.raises(ValueError, match="y0 contains NaN or Inf"):
        _solve(y0=y0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        regnde.step(MLP(), 0.0, y0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_vector_field_producing_nan(bad: float) -> None:
    def f(t, y):
        return -y + (bad if float(t) > 0.5 else 0.0)

    with pytest.raises(regnde.NonFiniteError) as info:
        _solve(f=Counted(f), y0=torch.ones(2, dtype=F64),
               t=torch.tensor([0.0, 1.0], dtype=F64))
    msg = str(info.value)
    assert "NaN or Inf" in msg
    t_bad = float(msg.split("at t=")[1].split(";")[0])
    assert 0.0 <= t_bad <= 0.5 + 1e-12
    assert isinstance(info.value, regnde.SolverError)
    assert isinstance(info.value, FloatingPointError)


def test_step_size_underflow_is_raised_fast() -> None:
    f = Counted(lambda t, y: 1 / (1 - t) ** 2 + 0 * y)
    start = time.perf_counter()
    with pytest.raises(regnde.StepSizeUnderflow) as info:
        _solve(f=f, y0=torch.ones(1, dtype=F64), t=torch.tensor([0.0, 2.0], dtype=F64),
               rtol=1e-3, atol=1e-3)
    assert time.perf_counter() - start < 5
    msg = str(info.value)
    assert "step size underflow at t=1" in msg and "cannot make progress" in msg
    assert f.n < 4096 * 6


def test_max_steps_exceeded() -> None:
    with pytest.raises(regnde.MaxStepsExceeded) as info:
        _solve(max_steps=2, rtol=1e-9, atol=1e-9)
    msg = str(info.value)
    assert "max_steps=2" in msg and "reached t=" in msg and "t_end=1.5" in msg


@pytest.mark.parametrize("max_steps", [0, -3, 2.5, True, "10"])
def test_invalid_max_steps(max_steps) -> None:
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        _solve(max_steps=max_steps)


@pytest.mark.parametrize(("kw", "pattern"), [
    (dict(sensitivity="backsolve"), r"unknown sensitivity 'backsolve'.*adjoint, direct"),
    (dict(trace="states"), r"unknown trace mode 'states'.*full, summary"),
    (dict(rtol=-1.0), r"rtol must be a finite number >= 0"),
    (dict(atol=math.nan), r"atol must be a finite number >= 0"),
    (dict(rtol=0.0, atol=0.0), r"rtol and atol cannot both be 0"),
    (dict(key="seed"), r"key must be an int seed, a torch.Generator or None"),
])
def test_invalid_options(kw: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        _solve(**kw)


def test_invalid_tableau() -> None:
    with pytest.raises(ValueError) as info:
        regnde.Tableau("rk_typo", order=4, c=(0, 0.5, 1), a=((), (0.5,), (0.0, 1.0)),
                       b=(1 / 6, 2 / 3, 1 / 6), b_error=(0.1, 0.0, -0.2))
    msg = str(info.value)
    assert "'rk_typo'" in msg and "sum(b_error) must be 0" in msg


def test_plugin_raising_on_import(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DISABLE, raising=False)
    fake_entry_points(monkeypatch, {"rk_extras": ImportError("cannot import name 'jit'")})
    regnde.plugins.set_registry(Registry())
    assert _solve().trace.n_steps > 0  # everything else works
    with pytest.raises(ValueError) as info:
        _solve(method="rk_extra_method")
    msg = str(info.value)
    assert "plugin 'rk_extras' failed to import" in msg and "cannot import name 'jit'" in msg


def test_unknown_torchdiffeq_option() -> None:
    with pytest.raises(ValueError) as info:
        _solve(firststep=0.1)
    msg = str(info.value)
    assert "unknown torchdiffeq option(s) ['firststep']" in msg
    assert "first_step" in msg and "max_steps" in msg


def test_adjoint_options_need_the_adjoint() -> None:
    with pytest.raises(ValueError, match=r"\['adjoint_rtol'\] need sensitivity='adjoint'"):
        _solve(adjoint_rtol=1e-3)


def test_adjoint_with_a_plain_function() -> None:
    f = Counted(lambda t, y: -y)
    with pytest.raises(ValueError) as info:
        _solve(f=f, sensitivity="adjoint")
    msg = str(info.value)
    assert "sensitivity='adjoint' needs f to be a torch.nn.Module" in msg
    assert "adjoint_params" in msg
    assert f.n == 0
    # with explicit adjoint_params it works
    sol = _solve(f=f, sensitivity="adjoint", adjoint_params=())
    assert sol.trace.n_steps > 0


def test_f_not_callable() -> None:
    with pytest.raises(ValueError, match="f must be a callable"):
        _solve(f=3.0)


def test_global_regularizer_with_the_adjoint_says_what_works() -> None:
    with pytest.raises(ValueError) as info:
        _solve(sensitivity="adjoint", regularizer=GlobalError())
    msg = str(info.value)
    assert "sensitivity='direct'" in msg and "LocalError" in msg


def test_unknown_regularizer_name() -> None:
    with pytest.raises(ValueError, match=r"unknown regularizer 'ernode'.*global-error"):
        _solve(regularizer="ernode")
