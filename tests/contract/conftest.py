"""The backend contract suite: every test runs on every registered backend that solves ODEs
(built-in or from an installed plugin), with its default method and with ``ralston2``, the
method of the example plugin package (``examples/regnde-ralston-plugin``), on every backend that
runs registered tableaus. A new backend is covered by registering it: nothing here names one.

Fixtures:
    case: a :class:`Case` per (ODE backend, method) -- the checks that depend on the method.
    backend_case: a :class:`Case` per ODE backend with its default method -- the checks of the
        backend itself (errors, keys, step limits).

Backends that solve SDEs only, or whose framework has no array helper (``frameworks.py``),
are listed as skipped, with the reason.
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
from dataclasses import dataclass
from typing import Any

import pytest

from regnde.plugins import Registry, set_registry

from . import frameworks

frameworks.setup()

PLUGIN_DIR = pathlib.Path(__file__).parents[2] / "examples" / "regnde-ralston-plugin"
PLUGIN_METHOD = "ralston2"


def _plugin_module() -> Any:
    """The example plugin's module ``regnde_ralston``, loaded from its source (once)."""
    name = "regnde_ralston"
    if name not in sys.modules:
        path = PLUGIN_DIR / name / "__init__.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None, path
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def contract_registry() -> Registry:
    """Built-ins, installed entry-point plugins, and the example plugin (as ``ralston``)."""
    reg = Registry(autoload=True)
    reg.add(_plugin_module(), name="ralston")
    return reg.load()


@pytest.fixture(autouse=True)
def registry() -> Registry:
    """Overrides tests/conftest.py's registry (built-ins only): the one the cases come from."""
    fresh = contract_registry()
    old = set_registry(fresh)
    try:
        yield fresh
    finally:
        set_registry(old)


@dataclass(frozen=True)
class Case:
    backend: str
    method: str
    framework: str

    def __str__(self) -> str:
        return f"{self.backend}-{self.method}"


def ode_methods(b: Any, reg: Registry) -> list[str]:
    """The methods ``b`` solves ODEs with (empty for an SDE-only backend)."""
    if b.sde and b.sde_methods() is None:
        return []  # its native methods are its SDE methods (torchsde's kind)
    names = set(b.native_methods())
    if b.runs_tableaus:
        names |= set(reg.tableaus())
    return sorted(names)


def _cases(per_method: bool) -> list[Any]:
    reg = contract_registry()
    out = []
    for name in reg.names("backend"):
        try:
            b = reg.backend(name)
        except Exception as exc:  # a broken plugin: say so, next to the others
            out.append(pytest.param(Case(name, "?", "?"), id=name, marks=pytest.mark.skip(
                reason=f"backend {name!r} could not be constructed: {exc}")))
            continue
        methods = ode_methods(b, reg)
        if not methods:
            out.append(pytest.param(Case(name, "-", b.framework), id=name,
                                    marks=pytest.mark.skip(
                                        reason=f"backend {name!r} solves SDEs only "
                                               f"(sde=True, no separate ODE methods)")))
            continue
        default = b.default_method if b.default_method in methods else methods[0]
        chosen = [default]
        if per_method and PLUGIN_METHOD in methods and PLUGIN_METHOD != default:
            chosen.append(PLUGIN_METHOD)
        marks = []
        if frameworks.helper(b.framework) is None:
            marks.append(pytest.mark.skip(
                reason=f"backend {name!r}: no array helper for framework {b.framework!r} in "
                       f"tests/contract/frameworks.py"))
        for m in chosen:
            case = Case(name, m, b.framework)
            out.append(pytest.param(case, id=str(case), marks=marks))
    return out


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", _cases(per_method=True))
    if "backend_case" in metafunc.fixturenames:
        metafunc.parametrize("backend_case", _cases(per_method=False))


@pytest.fixture
def fw(request: pytest.FixtureRequest) -> Any:
    """The array helper of the case's framework."""
    case = request.node.callspec.params.get("case") or request.node.callspec.params[
        "backend_case"]
    return frameworks.helper(case.framework)
