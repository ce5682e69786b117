"""Loading plugins and looking up what they registered.

Built-in parts are plugins too (:data:`DEFAULT_PLUGINS`; the built-in backends are listed in
:data:`regnde.adapters.BUILTIN`): they are registered first, through the same hooks third parties
use, and are called through pluggy's hook registry like them. Third-party plugins come from the
entry-point group ``regnde``; set ``REGNDE_DISABLE_PLUGIN_AUTOLOAD=1`` to skip them. Nothing is
imported until the registry is first used. A plugin that fails to import, raises in a hook or
registers an invalid object is recorded under its name; using what it should have provided
raises :class:`PluginError` naming it, and everything else keeps working.

Nothing here names a backend: what the core needs to know of one (the default backend of a
framework, install hints, distributed helpers) it reads from the capabilities the backend
declares (:class:`regnde.backend.Backend`) or, for a built-in whose suite is not installed,
from :data:`regnde.adapters.BUILTIN`.
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

from regnde.adapters import BUILTIN, Builtin
from regnde.backend import DEFAULT_KINDS
from regnde.errors import PluginError, choices, plugin_unavailable
from regnde.plugins import hookspecs
from regnde.tableau import Tableau

ENV_DISABLE = "REGNDE_DISABLE_PLUGIN_AUTOLOAD"
ENTRY_POINT_GROUP = "regnde"

#: Built-in plugin modules, registered first and in this order: methods, samplers,
#: regularizers, then the built-in backends (:data:`regnde.adapters.BUILTIN`).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "regnde.solvers",
    "regnde.samplers",
    "regnde.regularizers",
    *BUILTIN,
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
        """Call ``plugin``'s implementations of every hook, as pluggy registered them, each
        with a ``register`` callback that files what it registers under ``plugin_name``; a
        failure is recorded against the plugin and the other hooks and plugins still run."""
        for hook_name, kind in KINDS.items():
            caller = getattr(self.pm.hook, hook_name, None)
            impls = [] if caller is None else [
                impl for impl in caller.get_hookimpls()
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper)
            ]
            if not impls and callable(getattr(plugin, hook_name, None)):
                self._fail(plugin_name, f"defines {hook_name} without @regnde.hookimpl, "
                                        f"so it is never called")
            for impl in impls:

                def register(*args: Any, _kind: str = kind) -> None:
                    self._register(_kind, plugin_name, *args)

                given = {"register": register}
                try:
                    impl.function(**{arg: given[arg] for arg in impl.argnames})
                except Exception as exc:
                    self._fail(plugin_name,
                               f"raised in {hook_name}: {type(exc).__name__}: {exc}")

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
        entry = self.entry("backend", name, install_note(self.install_command(name)))
        obj = entry.obj
        if isinstance(obj, type) or (callable(obj) and not hasattr(obj, "solve")):
            try:
                obj = obj()
            except Exception as exc:
                hint = getattr(obj, "install_hint", "") or ""
                raise PluginError(
                    f"backend {name!r} from plugin {entry.plugin!r} could not be constructed: "
                    f"{type(exc).__name__}: {exc}" + (f". {install_note(hint)}" if hint else "")
                ) from exc
            entry.obj = obj
        return obj

    def install_command(self, backend: str) -> str:
        """The install command of the built-in backend ``backend`` (``""`` for any other)."""
        for b in BUILTIN.values():
            if b.backend == backend:
                return b.install
        return ""

    def missing_builtins(self) -> list[Builtin]:
        """The built-in backends this registry tried and could not import (suite missing)."""
        self.load()
        return [b for path, b in BUILTIN.items() if path in self.builtins
                and path in self.failures]

    def capability(self, name: str, attr: str, default: Any = None) -> Any:
        """Attribute ``attr`` of the backend registered as ``name``, read from its class where
        it was registered as one (nothing is constructed); ``default`` when it cannot be read
        (a factory that fails to construct)."""
        obj = self.entry("backend", name).obj
        if not (isinstance(obj, type) or hasattr(obj, "solve")):
            try:
                obj = self.backend(name)
            except Exception:
                return default
        return getattr(obj, attr, default)

    def in_order(self) -> list[str]:
        """Names of the registered backends in preference order: built-ins in registration
        order, then the others in registration order (:meth:`names` sorts them instead)."""
        self.load()
        return list(self.tables["backend"])  # load() collects the built-ins first

    def defaults(self, framework: str | None, kind: str) -> list[str]:
        """The backends that declare themselves the default (``Backend.default_for``) for
        ``kind`` (``"ode"`` or ``"sde"``) of ``framework`` (``None``: any), preferred first:
        built-ins in registration order, then the others in registration order."""
        if kind not in DEFAULT_KINDS:
            raise ValueError(choices("kind of default backend", kind, DEFAULT_KINDS))
        return [n for n in self.in_order()
                if kind in (self.capability(n, "default_for", ()) or ())
                and (framework is None or self.capability(n, "framework") == framework)]

    def of_framework(self, framework: str) -> list[str]:
        """The registered backends that take arrays of ``framework``, in preference order."""
        return [n for n in self.in_order()
                if self.capability(n, "framework") == framework]

    def tableaus(self) -> dict[str, Tableau]:
        self.load()
        return {k: e.obj for k, e in self.tables["method"].items()}


def install_note(command: str) -> str:
    """``"Install it with `<command>`."`` (``""`` without a command)."""
    return f"Install it with `{command}`." if command else ""


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
