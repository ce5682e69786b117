"""The built-in backends: one plugin module per solver suite, registered through the same hooks
third-party plugins use.

Everything the library core knows about a backend comes from here or from the capabilities its
:class:`regnde.backend.Backend` class declares (``default_for``, ``install_hint``,
``distributed``, ``dropin_hint``); the core itself never names a backend, so a third-party one
gets every feature a built-in one has. This module imports nothing heavy: it is read even where
a suite is not installed (to say how to install it).
"""

from __future__ import annotations

from typing import NamedTuple


class Builtin(NamedTuple):
    """What the core needs to know about a built-in backend whose module may fail to import.

    Attributes:
        backend: the name its module registers.
        extra: the ``regnde[...]`` extra that installs its suite.
        dropin: what unchanged code its drop-in (:func:`regnde.regularize`) regularizes, for the
            message when no drop-in is installed; ``""`` when it has none.
    """

    backend: str
    extra: str
    dropin: str = ""

    @property
    def install(self) -> str:
        """The install command, e.g. ``pip install regnde[torch]``."""
        return f"pip install regnde[{self.extra}]"


#: Built-in adapter modules, registered in this order (so on a tie for the default backend of a
#: framework the earlier one wins), -> what the core needs to know about each.
BUILTIN: dict[str, Builtin] = {
    "regnde.adapters.torch.torchdiffeq": Builtin(
        "torchdiffeq", "torch", "torchdiffeq.odeint / odeint_adjoint / odeint_event calls"),
    "regnde.adapters.torch.torchsde": Builtin(
        "torchsde", "torchsde", "torchsde.sdeint / sdeint_adjoint calls"),
    "regnde.adapters.jax.diffrax": Builtin("diffrax", "jax"),
    "regnde.adapters.torch.torchode": Builtin("torchode", "torchode"),
}


def builtin(module: str) -> Builtin:
    """The entry of the built-in adapter ``module`` (its ``__name__``)."""
    return BUILTIN[module]
