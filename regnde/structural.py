"""Equality by configuration for regularizers and samplers.

Two ``GlobalError()`` built apart are the same regularizer: they compare equal and hash alike,
so a compiled solve cached on the regularizer (diffrax under ``jax.jit``: the regularizer is
part of the static configuration) is reused instead of compiled again for every new object.
An object whose configuration holds something unhashable (an array, a traced weight) falls
back to identity.
"""

from __future__ import annotations

from typing import Any

_UNHASHABLE = object()


def _freeze(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        items = tuple(_freeze(v) for v in value)
        return _UNHASHABLE if _UNHASHABLE in items else (type(value).__name__, items)
    if isinstance(value, dict):
        pairs = tuple(sorted(((k, _freeze(v)) for k, v in value.items()), key=repr))
        return _UNHASHABLE if any(v is _UNHASHABLE for _, v in pairs) else ("dict", pairs)
    if isinstance(value, (str, bytes, int, float, complex, bool, type(None), Structural)):
        return value
    return _UNHASHABLE


class Structural:
    """Mixin: ``==`` and ``hash`` from the type and the instance's attributes (``vars``)."""

    def _structure(self) -> Any:
        frozen = _freeze(vars(self))
        return _UNHASHABLE if frozen is _UNHASHABLE else (type(self), frozen)

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not type(self):
            return NotImplemented
        mine = self._structure()
        return mine is not _UNHASHABLE and mine == other._structure()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        mine = self._structure()
        return id(self) if mine is _UNHASHABLE else hash(mine)
