"""What the torch backend modules share beyond keys (each imports only its own solver library):
:class:`TorchBackend`, the base of the torch backends (framework, distributed helpers, which
states they own, their keys), and :class:`StepLog`, the per-step lists every torch recorder
fills while a solve runs.
"""

from __future__ import annotations

from typing import Any

import torch

from regnde.adapters.torch.keys import TorchKey, make_key
from regnde.backend import Backend


class TorchBackend(Backend):
    """A backend whose states are torch tensors and whose keys are :class:`TorchKey`\\ s."""

    framework = "torch"
    distributed = "regnde.adapters.torch.distributed"

    def owns(self, y0: Any) -> bool:
        return isinstance(y0, torch.Tensor)

    def make_key(self, key: Any) -> TorchKey:
        return make_key(key)


class StepLog:
    """One solve's accepted steps as a recorder collects them (in the solver's own time):
    start times ``ts``, step sizes ``dts``, states at the starts ``ys`` (when kept), error
    ratios ``errors``, states at sampled times ``captured`` (by probe id), and the counts of
    step attempts and rejections."""

    def __init__(self) -> None:
        self.ts: list[torch.Tensor] = []
        self.dts: list[torch.Tensor] = []
        self.ys: list[torch.Tensor] = []
        self.errors: list[torch.Tensor] = []
        self.captured: dict[int, torch.Tensor] = {}
        self.attempts = 0
        self.rejected = 0
