"""Loading plugins and looking up what they registered.

Built-in parts are plugins too (:data:`DEFAULT_PLUGINS`): they are registered first, through the
same hooks third parties use. Third-party plugins come from the entry-point group ``regnde``;
set ``REGNDE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip them. Nothing is imported until the registry is
first used. A plugin that fails to import, raises in a hook or registers an invalid object is
recorded under its name; using what it should have provided raises :class:`PluginError` naming
it, and everything else keeps working.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pluggy

from regnde.errors import PluginError, choices, plugin_unavailable
from regnde.plugins import hookspecs
from regnde.tableau import Tableau

ENV_DISABLE = "REGNDE_DISABLE_PLUGIN_AUTOLOAD"
ENTRY_POINT_GROUP = "regnde"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "regnde.solvers",
    "regnde.samplers",
    "regnde.regularizers",
    "regnde.adapters.torchdiffeq",
    "regnde.adapters.torchsde",
    "regnde.adapters.diffrax",
    "regnde.adapters.torchode",
)

KINDS = {
    "regnde_register_solvers": "method",
    "regnde_register_backends": "backend",
    "regnde_register_samplers": "sampler",
    "regnde_register_regularizers": "regularizer",
}


@dataclass
class Entry:
    """One registered object and the plugin it came from."""

    name: str
    obj: Any
    plugin: str


@dataclass
class Registry:
    """Everything plugins registered: tableaus, backends, samplers, regularizers.

    Args:
        builtins: module paths registered first (default :data:`DEFAULT_PLUGINS`).
        autoload: load entry points of group ``regnde`` (default: unless
            ``REGNDE_DISABLE_PLUGIN_AUTOLOAD`` is set).
    """

    builtins: tuple[str, ...] = DEFAULT_PLUGINS
    autoload: bool | None = None
    pm: pluggy.PluginManager = field(init=False)
    tables: dict[str, dict[str, Entry]] = field(init=False)
    failures: dict[str, str] = field(init=False, default_factory=dict)
    _loaded: bool = field(init=False, default=False)
    _lock: threading.RLock = field(init=False, default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.tables = {kind: {} for kind in KINDS.values()}

    # -- loading -----------------------------------------------------------------------------
    def add(self, plugin: Any, name: str | None = None) -> None:
        """Register a plugin object or module by hand (tests, notebooks)."""
        with self._lock:
            name = self.pm.register(plugin, name=name)
            self.pm.check_pending()
            if self._loaded:
                self._collect_from(plugin, name or str(plugin))

    def load(self) -> Registry:
        """Import built-in and entry-point plugins and collect their registrations (once)."""
        with self._lock:
            if self._loaded:
                return self
            self._loaded = True
            for path in self.builtins:
                self._import(path, path)
            autoload = self.autoload
            if autoload is None:
                autoload = os.environ.get(ENV_DISABLE, "").strip().lower() in ("", "0", "false")
            if autoload:
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    self._import(ep.name, ep.value, ep.load)
            try:
                self.pm.check_pending()
            except pluggy.PluginValidationError as exc:
                self._fail(self.pm.get_name(exc.plugin) or str(exc.plugin),
                           f"unknown hook: {exc}")
            # built-ins first, then in registration order (get_plugins() is an unordered set),
            # so a name clash is always blamed on the later plugin, never on a built-in
            plugins = sorted(self.pm.list_name_plugin(), key=lambda p: p[0] not in self.builtins)
            for name, plugin in plugins:
                if plugin is not None:
                    self._collect_from(plugin, name)
            return self

    def _import(self, name: str, target: str, loader: Callable[[], Any] | None = None) -> None:
        try:
            plugin = loader() if loader is not None else importlib.import_module(target)
        except Exception as exc:
            self.failures[name] = f"failed to import {target!r}: {type(exc).__name__}: {exc}"
            return
        if self.pm.is_registered(plugin):
            return
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            self.failures[name] = f"could not be registered: {type(exc).__name__}: {exc}"

    def _collect_from(self, plugin: Any, plugin_name: str) -> None:
        for hook_name, kind in KINDS.items():
            impl = getattr(plugin, hook_name, None)
            if impl is None:
                continue

            def register(*args: Any, _kind: str = kind) -> None:
                self._register(_kind, plugin_name, *args)

            try:
                impl(register=register)
            except Exception as exc:
                self._fail(plugin_name, f"raised in {hook_name}: {type(exc).__name__}: {exc}")

    def _fail(self, plugin_name: str, cause: str) -> None:
        """Record a failure of ``plugin_name``, keeping earlier ones (one per hook)."""
        old = self.failures.get(plugin_name)
        self.failures[plugin_name] = cause if old is None else f"{old}; {cause}"

    def _register(self, kind: str, plugin: str, *args: Any) -> None:
        if kind == "method":
            if len(args) != 1 or not isinstance(args[0], Tableau):
                raise TypeError(
                    f"register() for solvers takes one regnde.Tableau, got {args!r}"
                )
            name, obj = args[0].name, args[0]
        else:
            if len(args) != 2 or not isinstance(args[0], str):
                raise TypeError(f"register() for {kind}s takes (name, object), got {args!r}")
            name, obj = args
            _check(kind, name, obj)
        table = self.tables[kind]
        if name in table and table[name].plugin != plugin:
            raise ValueError(
                f"{kind} {name!r} is already registered by plugin {table[name].plugin!r}"
            )
        table[name] = Entry(name, obj, plugin)

    # -- lookup ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        self.load()
        return sorted(self.tables[kind])

    def entry(self, kind: str, name: str, hint: str = "") -> Entry:
        self.load()
        table = self.tables[kind]
        if name in table:
            return table[name]
        # a plugin named after what is asked for failed: that is the cause, not a typo
        culprits = {p: why for p, why in self.failures.items()
                    if name in (p, p.rsplit(".", 1)[-1])}
        if culprits:
            raise PluginError(plugin_unavailable(kind, name, culprits, hint))
        raise ValueError(choices(kind, name, table, hint + self.failure_note()))

    def get(self, kind: str, name: str, hint: str = "") -> Any:
        return self.entry(kind, name, hint).obj

    def failure_note(self) -> str:
        if not self.failures:
            return ""
        failed = "; ".join(f"plugin {k!r} {v}" for k, v in sorted(self.failures.items()))
        return f" Some plugins failed to load and may provide it: {failed}"

    def backend(self, name: str) -> Any:
        """The backend registered as ``name`` (constructed on first use)."""
        entry = self.entry("backend", name, _BACKEND_HINTS.get(name, ""))
        obj = entry.obj
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "solve")):
            try:
                obj = obj()
            except Exception as exc:
                raise PluginError(
                    f"backend {name!r} from plugin {entry.plugin!r} could not be constructed: "
                    f"{type(exc).__name__}: {exc}"
                ) from exc
            entry.obj = obj
        return obj

    def tableaus(self) -> dict[str, Tableau]:
        self.load()
        return {k: e.obj for k, e in self.tables["method"].items()}


_BACKEND_HINTS = {
    "torchdiffeq": "Install it with `pip install regnde[torch]`.",
    "torchsde": "Install it with `pip install regnde[torchsde]`.",
    "diffrax": "Install it with `pip install regnde[jax]`.",
    "torchode": "Install it with `pip install regnde[torchode]`.",
}


def _check(kind: str, name: str, obj: Any) -> None:
    if kind == "backend":
        if not (hasattr(obj, "solve") or callable(obj)):
            raise TypeError(f"backend {name!r} must be a Backend or a factory, got {obj!r}")
    elif kind == "sampler":
        if not (isinstance(obj, type) and hasattr(obj, "sample")):
            raise TypeError(f"sampler {name!r} must be a class with a sample() method, got {obj!r}")
    elif kind == "regularizer" and not isinstance(obj, type):
        raise TypeError(f"regularizer {name!r} must be a class, got {obj!r}")


_REGISTRY: Registry | None = None
_REGISTRY_LOCK = threading.Lock()


def registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        if _REGISTRY is None:
            _REGISTRY = Registry()
    return _REGISTRY.load()


def set_registry(new: Registry | None) -> Registry | None:
    """Replace the process-wide registry (tests); returns the previous one."""
    global _REGISTRY
    with _REGISTRY_LOCK:
        old, _REGISTRY = _REGISTRY, new
    return old
