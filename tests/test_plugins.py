"""The plugin machinery: built-ins, entry points (faked), failures reported by plugin name, the
autoload switch, and one test per hook (checked by a meta-test)."""

from __future__ import annotations

import inspect
import sys

import numpy as np
import pytest
import torch

import regnde
from regnde.plugins import ENTRY_POINT_GROUP, ENV_DISABLE, HOOKS, Registry, hookspecs
from regnde.regularizers import LocalError, Regularizer
from regnde.samplers import Sampler

from .helpers import (
    F64,
    MLP,
    fake_backend_class,
    fake_entry_points,
    heun_euler,
    plugin_module,
    times,
    y0_for,
)

#: The backends regnde registers itself (built-in plugins).
BUILTIN_BACKENDS = ["diffrax", "torchdiffeq", "torchode", "torchsde"]

BUILTIN_METHODS = ["bosh3", "dopri5", "dopri8", "fehlberg2", "heun", "tsit5"]


def solvers_plugin(name: str, *tableaus) -> object:
    def regnde_register_solvers(register):
        for tab in tableaus:
            register(tab)

    return plugin_module(name, regnde_register_solvers=regnde_register_solvers)


@pytest.fixture
def autoload_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_DISABLE, raising=False)


# -- built-ins, listing ---------------------------------------------------------------------------
def test_builtins_load_and_are_listed(registry: Registry) -> None:
    assert regnde.backends() == BUILTIN_BACKENDS
    assert regnde.methods("torchdiffeq") == BUILTIN_METHODS
    assert registry.names("sampler") == ["biased", "unbiased"]
    assert {"global-error", "global-stiffness"} <= set(registry.names("regularizer"))
    assert registry.failures == {}
    # built-ins are plugins like any other, named by their module
    assert registry.entry("method", "dopri5").plugin == "regnde.solvers"
    assert registry.entry("backend", "torchdiffeq").plugin == "regnde.adapters.torch.torchdiffeq"


def test_unknown_backend_for_methods_lists_backends() -> None:
    with pytest.raises(ValueError, match=r"unknown backend 'diffraxx'.*torchdiffeq"):
        regnde.methods("diffraxx")


def test_registry_loads_lazily(monkeypatch: pytest.MonkeyPatch, autoload_env: None) -> None:
    asked = fake_entry_points(monkeypatch, {})
    reg = Registry()
    assert asked == [] and reg.pm.get_plugins() == set()
    reg.names("method")
    assert asked == [ENTRY_POINT_GROUP]
    reg.names("backend")
    assert asked == [ENTRY_POINT_GROUP]  # once


def test_entry_point_plugins_are_loaded(monkeypatch: pytest.MonkeyPatch,
                                        autoload_env: None) -> None:
    asked = fake_entry_points(monkeypatch, {"mysolvers": solvers_plugin("m", heun_euler())})
    reg = Registry()
    assert "heun_euler" in reg.tableaus()
    assert reg.entry("method", "heun_euler").plugin == "mysolvers"
    assert asked == ["regnde"]
    assert "dopri5" in reg.tableaus()  # built-ins too
    regnde.plugins.set_registry(reg)
    assert "heun_euler" in regnde.methods("torchdiffeq")


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_env_var_disables_autoload(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    asked = fake_entry_points(monkeypatch, {"mysolvers": solvers_plugin("m", heun_euler())})
    monkeypatch.setenv(ENV_DISABLE, value)
    reg = Registry()
    assert "heun_euler" not in reg.tableaus()
    assert asked == []
    # built-ins still load
    assert sorted(n for n in reg.tableaus()) == ["bosh3", "dopri5", "fehlberg2", "heun", "tsit5"]
    assert reg.names("backend") == BUILTIN_BACKENDS
    regnde.plugins.set_registry(reg)
    sol = regnde.solve(MLP(), y0_for(), times(1))
    assert sol.trace.n_steps > 0


@pytest.mark.parametrize("value", ["0", "false", ""])
def test_env_var_off_values_keep_autoload(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    fake_entry_points(monkeypatch, {"mysolvers": solvers_plugin("m", heun_euler())})
    monkeypatch.setenv(ENV_DISABLE, value)
    assert "heun_euler" in Registry().tableaus()


def test_registry_add_by_hand_after_loading(registry: Registry) -> None:
    registry.load()
    registry.add(solvers_plugin("late", heun_euler()), name="late")
    assert registry.entry("method", "heun_euler").plugin == "late"
    assert "heun_euler" in regnde.methods("torchdiffeq")


def test_set_registry_returns_the_previous_one(registry: Registry) -> None:
    other = Registry(autoload=False)
    assert regnde.plugins.set_registry(other) is registry
    assert regnde.plugins.registry() is other
    assert regnde.plugins.set_registry(registry) is other


# -- failures are reported by plugin name -------------------------------------------------------
def test_plugin_failing_on_import_is_reported_by_name(monkeypatch: pytest.MonkeyPatch,
                                                      autoload_env: None) -> None:
    fake_entry_points(monkeypatch, {
        "brokenplug": ModuleNotFoundError("No module named 'missing_dependency'"),
        "goodplug": solvers_plugin("g", heun_euler()),
    })
    reg = Registry()
    regnde.plugins.set_registry(reg)
    # nothing else breaks: built-ins and the good plugin work
    assert regnde.backends() == BUILTIN_BACKENDS
    sol = regnde.solve(MLP(), y0_for(), times(1), method="heun_euler")
    assert sol.trace.n_steps > 0
    assert "brokenplug" in reg.failures and "goodplug" not in reg.failures
    # looking up what it may have provided names it and the cause
    with pytest.raises(ValueError) as info:
        regnde.solve(MLP(), y0_for(), times(1), method="kutta_from_broken_plugin")
    msg = str(info.value)
    assert "'brokenplug'" in msg and "ModuleNotFoundError" in msg
    assert "missing_dependency" in msg
    assert "dopri5" in msg  # the valid methods are still listed


def test_plugin_raising_in_a_hook_is_reported_and_others_work(
        monkeypatch: pytest.MonkeyPatch, autoload_env: None) -> None:
    def regnde_register_solvers(register):
        raise RuntimeError("boom in hook")

    fake_entry_points(monkeypatch, {
        "raiser": plugin_module("r", regnde_register_solvers=regnde_register_solvers),
        "goodplug": solvers_plugin("g", heun_euler()),
    })
    reg = Registry()
    assert "heun_euler" in reg.tableaus()
    assert "raised in regnde_register_solvers" in reg.failures["raiser"]
    with pytest.raises(ValueError, match=r"'raiser'.*boom in hook"):
        reg.get("method", "nope")


def test_plugin_registering_an_invalid_tableau_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                           autoload_env: None) -> None:
    def regnde_register_solvers(register):
        register(regnde.Tableau("rk_bad", order=2, c=(0, 1), a=((), (1,)), b=(0.5, 0.6),
                                b_error=(0.5, -0.5)))

    fake_entry_points(monkeypatch, {
        "badtableau": plugin_module("b", regnde_register_solvers=regnde_register_solvers)})
    reg = Registry()
    regnde.plugins.set_registry(reg)
    assert "rk_bad" not in reg.tableaus()
    with pytest.raises(ValueError) as info:
        regnde.solve(MLP(), y0_for(), times(1), method="rk_bad")
    msg = str(info.value)
    assert "'badtableau'" in msg and "'rk_bad'" in msg and "sum(b) must be 1" in msg
    # built-in methods still work
    assert regnde.solve(MLP(), y0_for(), times(1), method="tsit5").trace.n_steps > 0


def test_plugin_registering_a_non_tableau_as_solver_is_reported(
        monkeypatch: pytest.MonkeyPatch, autoload_env: None) -> None:
    def regnde_register_solvers(register):
        register({"name": "rk_dict"})

    fake_entry_points(monkeypatch, {
        "dictsolver": plugin_module("d", regnde_register_solvers=regnde_register_solvers)})
    reg = Registry()
    with pytest.raises(ValueError, match=r"'dictsolver'.*TypeError.*regnde\.Tableau"):
        reg.get("method", "rk_dict")


def test_plugin_registering_a_non_class_sampler_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                            autoload_env: None) -> None:
    def regnde_register_samplers(register):
        register("middle", lambda trace, t0, t1, key: (t0 + t1) / 2)

    fake_entry_points(monkeypatch, {
        "badsampler": plugin_module("s", regnde_register_samplers=regnde_register_samplers)})
    reg = Registry()
    regnde.plugins.set_registry(reg)
    assert reg.names("sampler") == ["biased", "unbiased"]
    with pytest.raises(ValueError) as info:
        LocalError(sampler="middle")
    msg = str(info.value)
    assert "'badsampler'" in msg and "must be a class with a sample() method" in msg
    assert LocalError(sampler="unbiased") is not None


def test_two_plugins_registering_one_name_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                      autoload_env: None) -> None:
    fake_entry_points(monkeypatch, {"first": solvers_plugin("a", heun_euler()),
                                    "second": solvers_plugin("b", heun_euler())})
    reg = Registry()
    assert reg.entry("method", "heun_euler").plugin == "first"
    assert "already registered by plugin 'first'" in reg.failures["second"]


def test_plugin_with_an_unknown_hook_is_reported(monkeypatch: pytest.MonkeyPatch,
                                                 autoload_env: None) -> None:
    def regnde_register_solverz(register):
        pass

    fake_entry_points(monkeypatch, {
        "typo": plugin_module("t", regnde_register_solverz=regnde_register_solverz)})
    reg = Registry()
    reg.load()
    assert "unknown hook" in reg.failures["typo"]  # recorded under the plugin's name
    assert "regnde_register_solverz" in reg.failures["typo"]
    assert "dopri5" in reg.tableaus()


def test_a_plugin_failing_in_two_hooks_reports_both(monkeypatch: pytest.MonkeyPatch,
                                                    autoload_env: None) -> None:
    def regnde_register_solvers(register):
        raise RuntimeError("solvers broke")

    def regnde_register_samplers(register):
        register("half", 0.5)

    fake_entry_points(monkeypatch, {"twice": plugin_module(
        "t", regnde_register_solvers=regnde_register_solvers,
        regnde_register_samplers=regnde_register_samplers)})
    reg = Registry()
    with pytest.raises(ValueError) as info:
        reg.get("sampler", "half")
    msg = str(info.value)
    assert "solvers broke" in msg and "sampler 'half' must be a class" in msg


# -- one test per hook ---------------------------------------------------------------------------
def test_hook_regnde_register_solvers(registry: Registry) -> None:
    """A tableau registered by a plugin becomes a torchdiffeq method usable by regnde.solve."""
    registry.add(solvers_plugin("mine", heun_euler()), name="mine")
    assert "heun_euler" in regnde.methods("torchdiffeq")
    f, y0, t = MLP(), y0_for(), times(1)
    sol = regnde.solve(f, y0, t, method="heun_euler", rtol=1e-5, atol=1e-5)
    assert sol.ys.shape == (len(t), *y0.shape)
    assert sol.trace.n_steps > 2 and sol.trace.stiffness is None
    # compare with a tight reference solve
    ref = regnde.solve(f, y0, t, method="dopri5", rtol=1e-10, atol=1e-10).ys
    assert (sol.ys - ref).abs().max() < 1e-3
    # the same method through the plain torchdiffeq API under its own name
    import torchdiffeq

    # (inside a regnde context; torchdiffeq's own table is restored once it closes)
    with regnde.regularize(LocalError(), key=0):
        ys = torchdiffeq.odeint(f, y0, t, method="heun_euler", rtol=1e-5, atol=1e-5)
    assert torch.equal(ys, sol.ys)
    with pytest.raises(ValueError, match="heun_euler"):
        torchdiffeq.odeint(f, y0, t, method="heun_euler")


def test_hook_regnde_register_backends(registry: Registry) -> None:
    cls = fake_backend_class()

    def regnde_register_backends(register):
        register("fakenp", cls)  # a class: constructed on first use

    registry.add(plugin_module("fb", regnde_register_backends=regnde_register_backends),
                 name="fakeplugin")
    assert regnde.backends() == sorted(["fakenp", *BUILTIN_BACKENDS])
    assert regnde.methods("fakenp") == ["kvaerno5"]  # runs_tableaus=False: no RK tableaus
    y0, t = np.zeros(2), np.array([0.0, 1.0])
    request = regnde.solve(lambda t, y: -y, y0, t, backend="fakenp", rtol=1e-3, dt=0.1).ys
    assert request.method == "kvaerno5" and request.tableau is None
    assert request.rtol == 1e-3 and request.options == {"dt": 0.1}
    assert isinstance(registry.backend("fakenp"), cls)
    assert registry.backend("fakenp") is registry.backend("fakenp")  # constructed once


def test_hook_regnde_register_samplers(registry: Registry) -> None:
    calls = []

    class Midpoint(Sampler):
        name = "midpoint"
        needs_trace = True

        def sample(self, trace, t0, t1, key):
            calls.append((float(t0), float(t1)))
            return (t0 + t1) / 2

    def regnde_register_samplers(register):
        register("midpoint", Midpoint)

    registry.add(plugin_module("sp", regnde_register_samplers=regnde_register_samplers),
                 name="sampler_plugin")
    assert "midpoint" in registry.names("sampler")
    reg = LocalError(sampler="midpoint")
    assert isinstance(reg.sampler, Midpoint)
    sol = regnde.solve(MLP(), y0_for(), times(1), regularizer=reg, key=0)
    assert calls == [(0.0, 1.5)]
    assert sol.reg is not None and float(sol.reg.detach()) > 0


def test_hook_regnde_register_regularizers(registry: Registry) -> None:
    class StepCount(Regularizer):
        name = "step-count"

        def value(self, run, key, presampled):
            return run.trace.error.new_tensor(float(run.trace.n_steps))

    def regnde_register_regularizers(register):
        register("step-count", StepCount)

    registry.add(plugin_module("rp", regnde_register_regularizers=regnde_register_regularizers),
                 name="reg_plugin")
    assert registry.get("regularizer", "step-count") is StepCount
    sol = regnde.solve(MLP(), y0_for(), times(1), regularizer="step-count")
    assert float(sol.reg) == sol.stats.n_steps


def test_every_hook_has_a_test() -> None:
    """Each hook in HOOKS has a ``test_hook_<name>`` here, and HOOKS lists every hookspec."""
    specs = {name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction)
             if hasattr(fn, "regnde_spec")}
    assert specs == set(HOOKS)
    tests = {name for name in dir(sys.modules[__name__]) if name.startswith("test_hook_")}
    missing = {f"test_hook_{hook}" for hook in HOOKS} - tests
    assert not missing, f"hooks without a test: {sorted(missing)}"


def test_hookspecs_are_documented() -> None:
    for hook in HOOKS:
        doc = getattr(hookspecs, hook).__doc__
        assert doc and "register" in doc, hook


def test_float64_is_default_here() -> None:
    assert torch.get_default_dtype() == F64


def test_a_plugin_cannot_shadow_a_builtin_method(monkeypatch: pytest.MonkeyPatch,
                                                 autoload_env: None) -> None:
    fake = regnde.Tableau("dopri5", order=2, c=(0, 1), a=((), (1,)), b=(0.5, 0.5),
                          b_error=(0.5, -0.5))
    for _ in range(5):  # the winner must not depend on set ordering
        fake_entry_points(monkeypatch, {"shadow": solvers_plugin("s", fake)})
        reg = Registry()
        assert reg.entry("method", "dopri5").plugin == "regnde.solvers"
        assert reg.tableaus()["dopri5"].order == 5
        assert "already registered by plugin 'regnde.solvers'" in reg.failures["shadow"]


def test_a_plugin_added_by_hand_before_loading_cannot_shadow_a_builtin(
        registry: Registry) -> None:
    fake = regnde.Tableau("dopri5", order=2, c=(0, 1), a=((), (1,)), b=(0.5, 0.5),
                          b_error=(0.5, -0.5))
    registry.add(solvers_plugin("early", fake), name="early")  # before the registry loads
    assert registry.entry("method", "dopri5").plugin == "regnde.solvers"
    assert "regnde.solvers" not in registry.failures
    assert "already registered by plugin 'regnde.solvers'" in registry.failures["early"]
