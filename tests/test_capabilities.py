"""What the core knows of a backend comes from the capabilities it declares, never from its name:
the core's source names no built-in backend, and a third-party backend gets every feature a
built-in one has (the default backend of a framework, install hints, distributed helpers, the
drop-in's error message); plugins' hooks are called through pluggy's hook registry."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import regnde
from regnde import distributed as D
from regnde.adapters import BUILTIN, Builtin
from regnde.errors import PluginError
from regnde.plugins import Registry, set_registry

from .helpers import MLP, fake_backend_class, plugin_module, times, y0_for

ROOT = Path(__file__).resolve().parents[1]

#: The core: everything outside regnde/adapters and regnde/experiments.
CORE = sorted([*ROOT.glob("regnde/*.py"), *ROOT.glob("regnde/plugins/*.py")])

#: Core files allowed to name a backend, and why.
EXEMPT = {
    # the documented public import path of diffrax's drop-in (regnde.diffrax.Regularized): a
    # lazy shim over regnde.adapters.jax.diffrax_dropin, a backend's own module by nature
    "regnde/diffrax.py",
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (of modules, classes, functions, and
    attribute docstrings: every bare string statement)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def _words(tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, text)`` of every string constant that is not a docstring and every name the code
    uses (identifiers, attributes, definitions, arguments, keywords, imports). f-strings are
    covered by their constant parts; comments are not in the tree."""
    skip = _docstrings(tree)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            found.append((line, node.value))
        elif isinstance(node, ast.Name):
            found.append((line, node.id))
        elif isinstance(node, ast.Attribute):
            found.append((line, node.attr))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append((line, node.name))
        elif isinstance(node, ast.arg):
            found.append((line, node.arg))
        elif isinstance(node, ast.keyword) and node.arg:
            found.append((line, node.arg))
        elif isinstance(node, ast.alias):
            found += [(line, node.name), (line, node.asname or "")]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((line, node.module))
    return found


def _backend_names_in(source: str) -> list[str]:
    names = {b.backend for b in BUILTIN.values()}
    hits = []
    for line, text in _words(ast.parse(source)):
        # a name as a word: "regnde.adapters.jax.diffrax", "torchdiffeq_backend", "torchsde" hit;
        # "torch" or "jax" (frameworks, not backends) do not
        if set(re.split(r"[^A-Za-z0-9]+", text)) & names:
            hits.append(f"line {line}: {text!r}")
    return hits


def test_the_scan_finds_backend_names_outside_docstrings() -> None:
    source = '''
"""Module docstring naming torchdiffeq is fine."""
import regnde.adapters.torch.torchsde
X = "diffrax"  # a comment naming torchdiffeq is fine


def f(torchdiffeq_backend):
    """So is a function's."""
    return f"uses {torchdiffeq_backend}" + "torch and jax are frameworks"
'''
    hits = _backend_names_in(source)
    assert len(hits) == 4, hits
    assert {h.split(": ", 1)[1] for h in hits} == {
        "'regnde.adapters.torch.torchsde'", "'diffrax'", "'torchdiffeq_backend'"}


def test_the_exemptions_are_core_files() -> None:
    assert EXEMPT <= {str(p.relative_to(ROOT)) for p in CORE}


@pytest.mark.parametrize("path", [p for p in CORE if str(p.relative_to(ROOT)) not in EXEMPT],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_the_core_names_no_builtin_backend(path: Path) -> None:
    rel = str(path.relative_to(ROOT))
    hits = _backend_names_in(path.read_text(encoding="utf-8"))
    assert not hits, (f"{rel} names a built-in backend outside docstrings and comments; "
                      f"read it from a capability the backend declares instead: {hits}")


def test_every_builtin_declares_its_capabilities(registry: Registry) -> None:
    for path, b in BUILTIN.items():
        entry = registry.entry("backend", b.backend)
        assert entry.plugin == path
        cls = registry.backend(b.backend)
        assert cls.install_hint == b.install == f"pip install regnde[{b.extra}]"
        assert set(cls.default_for) <= {"ode", "sde"}  # a built-in need not be a default
        assert cls.distributed
    assert registry.defaults("torch", "ode")[0] == "torchdiffeq"
    assert registry.defaults("torch", "sde")[0] == "torchsde"
    assert registry.defaults("jax", "ode")[0] == registry.defaults("jax", "sde")[0] == "diffrax"


# -- a third-party backend of its own framework ---------------------------------------------------
class FakeKey:
    def __init__(self, seed: Any, path: tuple[int, ...] = ()) -> None:
        self.seed, self.path = seed, path

    def fold(self, index: int) -> FakeKey:
        return FakeKey(self.seed, (*self.path, index))

    def uniform(self, like: Any) -> Any:
        return 0.5


def fake_backend(name: str = "fakenp", framework: str = "numpy", **capabilities: Any) -> type:
    """The numpy backend of tests.helpers under ``name``, with ``capabilities`` as class
    attributes and keys that fold (``make_key`` accepts numpy generators and ints only)."""
    base = fake_backend_class()

    def make_key(self: Any, key: Any) -> FakeKey:
        if not (key is None or isinstance(key, (int, np.random.Generator))):
            raise TypeError(f"not a {name} key: {key!r}")
        return FakeKey(key)

    return type(f"Backend_{name}", (base,), {"name": name, "framework": framework,
                                              "make_key": make_key, **capabilities})


def register(registry: Registry, plugin: str, *backends: type) -> None:
    def regnde_register_backends(register):
        for cls in backends:
            register(cls.name, cls)

    registry.add(plugin_module(plugin, regnde_register_backends=regnde_register_backends),
                 name=plugin)


def test_a_third_party_default_backend_is_chosen_for_its_framework(registry: Registry) -> None:
    register(registry, "fakeplugin", fake_backend(default_for=("ode",)))
    y0, t = np.zeros(2), np.array([0.0, 1.0])
    request = regnde.solve(lambda t, y: -y, y0, t, backend=None).ys  # fakenp returns its request
    assert request.method == "kvaerno5" and request.y0 is y0
    assert regnde.api.default_backend(y0) == "fakenp"
    # torch arrays still go to the built-in
    assert regnde.api.default_backend(y0_for()) == "torchdiffeq"


def test_a_backend_without_default_for_is_not_chosen_and_the_error_names_it(
        registry: Registry) -> None:
    register(registry, "fakeplugin", fake_backend())
    with pytest.raises(ValueError) as info:
        regnde.solve(lambda t, y: -y, np.zeros(2), np.array([0.0, 1.0]))
    msg = str(info.value)
    assert "cannot infer a backend from y0 of type numpy.ndarray" in msg
    assert "default for ODEs on numpy arrays (Backend.default_for)" in msg
    assert "backends that take numpy arrays (backend=...): fakenp" in msg


def test_default_for_ode_only_does_not_take_sdes(registry: Registry) -> None:
    register(registry, "fakeplugin", fake_backend(default_for=("ode",)))

    class SDE:
        noise_type, sde_type = "diagonal", "ito"

        def f(self, t, y):
            return -y

        def g(self, t, y):
            return y

    with pytest.raises(ValueError, match=r"default for SDEs on numpy arrays.*fakenp"):
        regnde.solve(SDE(), np.zeros(2), np.array([0.0, 1.0]))


def test_on_a_tie_a_builtin_wins_then_the_first_registered(registry: Registry) -> None:
    register(registry, "first", fake_backend("faketorch", "torch", default_for=("ode",)),
             fake_backend("np1", default_for=("ode",)))
    register(registry, "second", fake_backend("np2", default_for=("ode", "sde")))
    assert registry.defaults("torch", "ode") == ["torchdiffeq", "faketorch"]
    assert regnde.api.default_backend(y0_for()) == "torchdiffeq"
    assert registry.defaults("numpy", "ode") == ["np1", "np2"]
    assert regnde.api.default_backend(np.zeros(2)) == "np1"
    assert regnde.api.default_backend(np.zeros(2), sde=True) == "np2"
    with pytest.raises(ValueError, match="unknown kind of default backend 'pde'"):
        registry.defaults("numpy", "pde")


def test_steer_infers_the_backend_from_t_by_default_for(registry: Registry) -> None:
    from regnde.steer import steer

    register(registry, "fakeplugin", fake_backend())
    with pytest.raises(ValueError, match=r"cannot infer a backend from t of type numpy"):
        steer(np.array([0.0, 1.0]), 0.1, key=0)
    register(registry, "other", fake_backend("np2", default_for=("ode",)))
    steered = steer(np.array([0.0, 1.0]), 0.1, key=0)  # the fake key's uniform is 0.5
    assert isinstance(steered, np.ndarray) and steered[-1] == pytest.approx(1.0)


def test_a_backend_that_cannot_be_constructed_says_how_to_install(registry: Registry) -> None:
    def broken(self: Any) -> None:
        raise ImportError("No module named 'fakesuite'")

    register(registry, "fakeplugin", fake_backend(install_hint="pip install regnde-fakesuite",
                                                  __init__=broken))
    with pytest.raises(PluginError, match=r"could not be constructed: ImportError.*fakesuite.*"
                                          r"Install it with `pip install regnde-fakesuite`"):
        regnde.methods("fakenp")


def test_unknown_builtin_backend_hint_comes_from_builtin_table(monkeypatch: pytest.MonkeyPatch,
                                                               registry: Registry) -> None:
    monkeypatch.setitem(BUILTIN, "regnde.adapters.nosuchsuite",
                        Builtin("nosuch", "nosuchextra", "nosuch.solve calls"))
    with pytest.raises(ValueError, match=r"unknown backend 'nosuch'.*pip install "
                                         r"regnde\[nosuchextra\]"):
        regnde.methods("nosuch")


# -- distributed helpers -------------------------------------------------------------------------
@pytest.fixture
def fake_distributed(monkeypatch: pytest.MonkeyPatch, registry: Registry) -> list[Any]:
    """A third-party numpy backend declaring a distributed helper module (``fakedist``) with
    ``all_reduce_sum_max`` over two pretend ranks and ``setup``; returns the calls it got."""
    calls: list[Any] = []
    mod = types.ModuleType("fakedist")

    def all_reduce_sum_max(values, **options):
        calls.append(("all_reduce", list(values), options))
        return [2 * v for v in values], list(values), 2

    def setup(**options):
        calls.append(("setup", options))
        return "ctx"

    mod.all_reduce_sum_max, mod.setup = all_reduce_sum_max, setup  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fakedist", mod)
    register(registry, "fakeplugin", fake_backend(distributed="fakedist", default_for=("ode",)))
    return calls


def test_distributed_helpers_are_a_backend_capability(fake_distributed: list[Any]) -> None:
    assert D.helper_modules() == {"torch": "regnde.adapters.torch.distributed",
                                  "jax": "regnde.adapters.jax.distributed",
                                  "numpy": "fakedist"}
    got = D.reduce_stats(regnde.Stats(nfe=3), loss=np.float64(0.5), framework="numpy", tag=1)
    assert got.world_size == 2 and got.loss == 0.5 and got.stats.nfe == 3.0
    assert fake_distributed == [("all_reduce", [0.5, 3.0, 0.0, 0.0, 0.0], {"tag": 1})]
    # framework=None: inferred from the loss's array type
    D.reduce_stats(regnde.Stats(), loss=np.asarray(1.0))
    assert fake_distributed[-1][0] == "all_reduce"
    assert D.setup("numpy", x=1) == "ctx" and fake_distributed[-1] == ("setup", {"x": 1})
    with pytest.raises(ValueError, match=r"unknown framework for setup 'mxnet'.*numpy"):
        D.setup("mxnet")


def test_framework_none_keeps_torch_first(fake_distributed: list[Any]) -> None:
    # no array to infer from: the first framework with helpers (the built-ins' torch) as before
    got = D.reduce_stats(regnde.Stats(nfe=4), loss=0.25)
    assert got.world_size == 1 and fake_distributed == []
    D.reduce_stats(regnde.Stats(nfe=4), loss=torch.tensor(0.25))
    assert fake_distributed == []


def test_rank_key_infers_the_backend_from_the_key(fake_distributed: list[Any]) -> None:
    from regnde.adapters.torch.keys import TorchKey

    key = D.rank_key(np.random.default_rng(1), 3)  # a numpy generator: the numpy backend's
    assert isinstance(key, FakeKey) and key.path == (3,)
    assert isinstance(D.rank_key(torch.Generator().manual_seed(1), 3), TorchKey)
    assert isinstance(D.rank_key(7, 3), TorchKey)  # an int: the first default backend, as before
    named = D.rank_key(7, 3, backend="fakenp")
    assert isinstance(named, FakeKey) and named.seed == 7
    with pytest.raises(ValueError, match=r"cannot tell which backend's key builtins\.str"):
        D.rank_key("seven", 0)


# -- the drop-in ---------------------------------------------------------------------------------
def test_dropin_error_is_built_from_what_backends_declare(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BUILTIN, "regnde.adapters.nosuchsuite",
                        Builtin("nosuch", "nosuchextra", "nosuch.solve calls"))
    reg = Registry(builtins=("regnde.solvers", "regnde.samplers", "regnde.regularizers",
                             "regnde.adapters.nosuchsuite"), autoload=False)
    register(reg, "fakeplugin", fake_backend(dropin_hint="wrap your solver in fakenp.Wrap"))
    old = set_registry(reg)
    try:
        with pytest.raises(ValueError) as info:
            regnde.regularize(regnde.regularizers.LocalError())
    finally:
        set_registry(old)
    msg = str(info.value)
    assert "needs a backend with a drop-in, and none is installed" in msg
    assert "nosuch.solve calls (pip install regnde[nosuchextra])" in msg
    assert "fakenp: wrap your solver in fakenp.Wrap." in msg


# -- hooks through pluggy's registry -------------------------------------------------------------
def test_hooks_are_called_through_pluggys_registry(registry: Registry) -> None:
    from .helpers import heun_euler

    class Plugin:
        @regnde.hookimpl(specname="regnde_register_solvers")
        def my_solvers(self, register):  # a name of its own: found by pluggy, not by getattr
            register(heun_euler())

    registry.add(Plugin(), name="byspec")
    assert registry.entry("method", "heun_euler").plugin == "byspec"
    assert "heun_euler" in regnde.methods("torchdiffeq")


def test_a_hook_without_hookimpl_is_reported(registry: Registry) -> None:
    def regnde_register_solvers(register):
        raise AssertionError("never called")

    mod = types.ModuleType("undecorated")
    mod.regnde_register_solvers = regnde_register_solvers  # type: ignore[attr-defined]
    registry.add(mod, name="undecorated")
    registry.load()
    assert "without @regnde.hookimpl" in registry.failures["undecorated"]
    assert regnde.solve(MLP(), y0_for(), times(1)).trace.n_steps > 0  # nothing else breaks


# -- the adapters' layout: each backend module imports with only its own suite installed ---------
JAX_FAMILY = ("jax", "jaxlib", "diffrax", "equinox", "optimistix", "lineax")
TORCH_COMMON = ("keys", "common", "scope", "augment", "taylor", "taylor_rules", "taylor_series",
                "dropin", "distributed")
#: Each torch backend's modules: its entry module (the plugin) first.
TORCH_BACKENDS = {"torchdiffeq": ("torchdiffeq", "td_tableau", "td_recorder", "td_solvers"),
                  "torchsde": ("torchsde", "sde_checks", "sde_step", "sde_recorder",
                               "sde_solvers"),
                  "torchode": ("torchode",)}


@pytest.mark.parametrize(("modules", "blocked"), [
    ([f"regnde.adapters.torch.{m}" for m in TORCH_BACKENDS["torchdiffeq"]],
     ("torchsde", "torchode", *JAX_FAMILY)),
    ([f"regnde.adapters.torch.{m}" for m in TORCH_BACKENDS["torchsde"]],
     ("torchdiffeq", "torchode", *JAX_FAMILY)),
    (["regnde.adapters.torch.torchode"], ("torchdiffeq", "torchsde", *JAX_FAMILY)),
    ([f"regnde.adapters.torch.{m}" for m in TORCH_COMMON],
     ("torchdiffeq", "torchsde", "torchode", *JAX_FAMILY)),
    ([f"regnde.adapters.jax.{m}" for m in
      ("common", "run", "ode_methods", "sde_terms", "sde_methods", "diffrax", "diffrax_dropin",
       "augment", "distributed")],
     ("torch", "torchdiffeq", "torchsde", "torchode")),
], ids=["torchdiffeq", "torchsde", "torchode", "torch-common", "jax"])
def test_each_adapter_imports_with_only_its_own_suite(modules: list[str],
                                                      blocked: tuple[str, ...]) -> None:
    """In a fresh interpreter whose import system refuses the other suites (as if they were not
    installed), the adapter modules import, and none of the refused modules was asked for."""
    code = textwrap.dedent(f"""
        import importlib, sys
        BLOCKED = {blocked!r}
        asked = []
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in BLOCKED:
                    asked.append(name)
                    raise ModuleNotFoundError(f"No module named {{name!r}}")
                return None
        sys.meta_path.insert(0, _Block())
        for m in {modules!r}:
            importlib.import_module(m)
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        assert not loaded and not asked, (loaded, asked)
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr


def _adapter_imports() -> dict[str, set[str]]:
    """Module -> the regnde.adapters modules it imports (anywhere in it, lazy imports too)."""
    base = ROOT / "regnde" / "adapters"
    names = {}
    for path in base.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        deps = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                raise AssertionError(f"{name}: relative import")
            targets = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                       [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if isinstance(node, ast.ImportFrom):  # from pkg import submodule
                targets += [f"{node.module}.{a.name}" for a in node.names]
            deps.update(t for t in targets if t in names and t != name)
    return graph


def test_the_adapters_import_graph_is_acyclic() -> None:
    graph = _adapter_imports()
    assert "regnde.adapters.jax.common" in graph["regnde.adapters.jax.sde_methods"]
    assert "regnde.adapters.jax.sde_methods" in graph["regnde.adapters.jax.diffrax"]
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep):], dep] if dep in path else [node, dep]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_torch_backends_share_only_common_modules() -> None:
    """A torch backend's modules import no other backend's modules (what they share is in the
    common ones), and every module of regnde/adapters/torch is a common one or a backend's."""
    graph = _adapter_imports()
    torch_modules = {n.rsplit(".", 1)[1] for n in graph if n.startswith("regnde.adapters.torch.")}
    owned = {m: b for b, ms in TORCH_BACKENDS.items() for m in ms}
    assert torch_modules == set(TORCH_COMMON) | set(owned)
    for module, backend in owned.items():
        for dep in graph[f"regnde.adapters.torch.{module}"]:
            other = owned.get(dep.rsplit(".", 1)[1])
            assert other in (None, backend), f"{module} ({backend}) imports {dep} ({other})"


@pytest.mark.parametrize("package", ["torch", "jax"])
def test_the_framework_packages_are_light(package: str) -> None:
    """``regnde.adapters.torch`` / ``.jax`` import nothing: importing one backend module never
    pulls in another suite through its package."""
    tree = ast.parse((ROOT / "regnde" / "adapters" / package / "__init__.py").read_text())
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
               and not (isinstance(n, ast.ImportFrom) and n.module == "__future__")]
    assert not imports
