"""Scoped recording for torch backends that have no hook for it (torchdiffeq, torchsde).

A backend swaps its solver classes for recording subclasses while any regnde context is open
(reference-counted, process-wide), and each thread keeps its own stack of open contexts: a
solver constructed on a thread with no open context, or during a backward pass (the adjoint's
solves), behaves exactly like the original.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def called_from(code: Any, depth: int = 40) -> bool:
    """Whether a frame of ``code`` is among the caller's ``depth`` enclosing frames (how an
    adapter tells a solve run by the host's adjoint from a plain one)."""
    frame: Any = sys._getframe(2)
    for _ in range(depth):
        if frame is None:
            return False
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False


class RecordingScope:
    """Per-thread stacks of open contexts plus a patch installed while any is open.

    Args:
        install: puts the recording solver classes in place (called when the first context
            opens). restore: puts the originals back (called when the last one closes).
    """

    def __init__(self, install: Callable[[], None], restore: Callable[[], None]):
        self._install, self._restore = install, restore
        self._local = threading.local()
        self._lock = threading.Lock()
        self._depth = 0

    def _stack(self) -> list[Any]:
        if not hasattr(self._local, "stack"):
            self._local.stack = []
        return self._local.stack

    def active(self) -> Any:
        """The innermost open context of this thread, or ``None`` (also in a backward pass)."""
        stack = self._stack()
        if not stack or torch._C._current_autograd_node() is not None:
            return None
        return stack[-1]

    @contextmanager
    def patched(self) -> Iterator[None]:
        """The recording classes are installed for the duration (reference-counted)."""
        with self._lock:
            if self._depth == 0:
                self._install()
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._restore()

    @contextmanager
    def opened(self, ctx: Any) -> Iterator[Any]:
        """Open ``ctx`` on this thread (innermost) with the recording classes installed."""
        stack = self._stack()
        stack.append(ctx)
        try:
            with self.patched():
                yield ctx
        finally:
            stack.remove(ctx)
