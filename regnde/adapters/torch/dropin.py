"""The drop-in for torch host libraries: ``with regnde.regularize(reg, key=0) as r:`` around
unchanged ``torchdiffeq.odeint`` / ``odeint_adjoint`` / ``odeint_event`` and
``torchsde.sdeint`` / ``sdeint_adjoint`` calls.

Each torch adapter registers its :class:`regnde.adapters.torch.scope.RecordingScope` here when
it is imported (:func:`register_scope`); a block opens every registered scope, so the solver
classes of every installed host library record while it is open. A solver constructed inside
the block asks the block for a recorder, and the block asks the solver back
(``solver.regnde_dropin_recorder(block, key, sensitivity)``): the adapter builds its own
recorder, and the block keeps only what is common -- keys, sums, announcements.

See docs/dropin.md for what is regularized on each host library.
"""

from __future__ import annotations

import contextlib
import threading
import warnings
from typing import Any, ClassVar

import torch

from regnde.adapters.torch.keys import make_key
from regnde.adapters.torch.scope import RecordingScope
from regnde.errors import dropin_no_solve
from regnde.trace import Stats, Trace

_SCOPES: list[RecordingScope] = []


def register_scope(scope: RecordingScope) -> None:
    """Make a host library's recording scope open inside every drop-in block."""
    if scope not in _SCOPES:
        _SCOPES.append(scope)


class Block:
    """The drop-in block. ``r.value`` sums the regularizer over the solves inside (``None``
    until the first; a zero tensor when nothing could be regularized, which the block announces
    with a ``UserWarning`` once per cause); ``r.stats`` sums their counts; ``r.traces`` lists
    their traces; ``r.n_solves`` counts them.

    The host's behaviour is kept: outputs, exceptions (regnde's are also instances of the
    host's own type), step limits (none beyond the host's own unless ``max_steps`` is given)
    and, while ``r.value`` stays out of the loss, gradients."""

    _open_lock: ClassVar[threading.Lock] = threading.Lock()
    _open: ClassVar[dict[int, int]] = {}  # thread id -> open blocks

    def __init__(self, regularizer: Any, key: Any = None, trace: str = "summary",
                 max_steps: int | None = None):
        from regnde.regularizers import as_regularizer

        self.regularizer = as_regularizer(regularizer)
        if self.regularizer.needs_augmentation():
            raise ValueError(
                f"{self.regularizer!r} integrates along the solution as an extra state, and the "
                f"drop-in regnde.regularize cannot change the state of your solver call. Use "
                f"sol = regnde.solve(func, y0, t, regularizer=..., method=..., "
                f"sensitivity='direct' | 'adjoint') instead: sol.ys equals the host's output "
                f"and sol.reg is the regularizer."
            )
        self.key = make_key(key)
        self.trace_mode, self.max_steps = trace, max_steps
        self.value: Any = None
        self.stats = Stats()
        self.traces: list[Trace] = []
        self.n_solves = 0
        self._announced: set[str] = set()
        self._attempted = False  # a solve reached the block (even one that then raised)
        self._stack: contextlib.ExitStack | None = None

    @classmethod
    def open_elsewhere(cls) -> bool:
        """Whether a block is open on another thread and none on this one."""
        me = threading.get_ident()
        with cls._open_lock:
            return not cls._open.get(me) and any(n for t, n in cls._open.items() if t != me)

    def recorder_for(self, solver: Any) -> Any:
        """A recorder for ``solver`` (built by its adapter), keyed by the solve's index."""
        self._attempted = True
        rec = solver.regnde_dropin_recorder(self, self.key if self.n_solves == 0
                                            else self.key.fold(self.n_solves))
        self.n_solves += 1
        return rec

    def unregularizable(self, message: str) -> None:
        """A call the block cannot regularize (``message`` says which and why)."""
        self.announce(message, None)

    def announce(self, message: str, like: torch.Tensor | None) -> None:
        """Say once per block why something was not regularized; ``value`` becomes a zero
        tensor (of ``like``'s dtype and device) if nothing was regularized yet."""
        if message not in self._announced:
            self._announced.add(message)
            warnings.warn(message, UserWarning, stacklevel=5)
        if self.value is None:
            self.value = (torch.zeros((), dtype=like.dtype, device=like.device)
                          if like is not None and like.is_floating_point() else torch.zeros(()))

    def collect(self, value: Any, stats: Stats, trace: Trace) -> None:
        """Add one finished solve."""
        self.value = value if self.value is None else self.value + value
        for field in ("nfe", "nfe_reg", "n_steps", "n_rejected"):
            setattr(self.stats, field, getattr(self.stats, field) + getattr(stats, field))
        self.traces.append(trace)

    def __enter__(self) -> Block:
        from regnde.plugins.manager import registry

        registry()  # imports the installed adapters, which register their scopes
        self._stack = contextlib.ExitStack()
        for scope in _SCOPES:
            self._stack.enter_context(scope.opened(self))
        me = threading.get_ident()
        with Block._open_lock:
            Block._open[me] = Block._open.get(me, 0) + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        me = threading.get_ident()
        with Block._open_lock:
            Block._open[me] -= 1
            if not Block._open[me]:
                del Block._open[me]
        assert self._stack is not None
        self._stack.__exit__(*exc)
        if exc[0] is None and not self._attempted and self.value is None:
            self.announce(dropin_no_solve("torchdiffeq or torchsde"), None)
