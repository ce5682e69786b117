"""The hooks a regnde plugin implements. Every hook is called once, when the registry first
loads, with a ``register`` callback; a plugin calls it once per thing it provides.

A plugin is a module (or object) with functions decorated by :data:`hookimpl`, announced under
the entry-point group ``regnde``::

    [project.entry-points.regnde]
    mysolvers = "my_package.regnde_plugin"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "regnde"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def regnde_register_solvers(register: Callable[[Any], None]) -> None:
    """Register explicit Runge–Kutta methods.

    Args:
        register: call ``register(tableau)`` with a :class:`regnde.Tableau`. The tableau
            becomes a method, under ``tableau.name``, of every backend that runs tableaus.
    """


@hookspec
def regnde_register_backends(register: Callable[[str, Any], None]) -> None:
    """Register solver backends.

    Args:
        register: call ``register(name, backend)`` with a :class:`regnde.backend.Backend`
            instance (or a zero-argument callable returning one, constructed on first use).
    """


@hookspec
def regnde_register_samplers(register: Callable[[str, Any], None]) -> None:
    """Register time samplers for local regularizers.

    Args:
        register: call ``register(name, sampler_class)``; the class is instantiated without
            arguments when a regularizer names it.
    """


@hookspec
def regnde_register_regularizers(register: Callable[[str, Any], None]) -> None:
    """Register regularizers.

    Args:
        register: call ``register(name, regularizer_class)``; the name is what the command
            line and experiment runner accept.
    """


HOOKS = (
    "regnde_register_solvers",
    "regnde_register_backends",
    "regnde_register_samplers",
    "regnde_register_regularizers",
)
