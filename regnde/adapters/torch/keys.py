"""What every torch adapter shares (each imports only its own solver library): randomness,
:class:`TorchKey` (a :class:`regnde.backend.Key`) and :func:`make_key`, and the check of a
vector field's output."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from regnde.errors import vector_field_output


def check_field_output(out: Any, y: torch.Tensor) -> None:
    """``ValueError`` unless ``out`` (a vector field's value at ``y``) is shaped like ``y``."""
    if not isinstance(out, torch.Tensor):
        raise ValueError(vector_field_output("type", type(out).__name__, "torch.Tensor"))
    if out.shape != y.shape:
        raise ValueError(vector_field_output("shape", tuple(out.shape), tuple(y.shape)))
    if out.dtype != y.dtype:
        raise ValueError(vector_field_output("dtype", out.dtype, y.dtype))


class TorchKey:
    """A :class:`regnde.backend.Key` over torch: an int seed (pure: same key, same draws), a
    ``torch.Generator`` (stateful), or ``None`` (torch's global generator)."""

    def __init__(self, seed: int | None = None, generator: torch.Generator | None = None,
                 path: tuple[int, ...] = ()):
        self.seed, self.generator, self.path = seed, generator, path

    def uniform(self, like: torch.Tensor) -> torch.Tensor:
        if self.seed is not None:
            # the path's length closes the entropy: SeedSequence pads with zeros, so without it
            # fold(0) would draw what the key itself draws ([s, 0] and [s] hash alike)
            entropy = [self.seed % 2**63, *self.path, len(self.path)] if self.path else [
                self.seed % 2**63]
            state = np.random.SeedSequence(entropy).generate_state(2)
            g = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
            u = torch.rand((), generator=g, dtype=torch.float64)
        elif self.generator is not None:
            u = torch.rand((), generator=self.generator, dtype=torch.float64,
                           device=self.generator.device)
        else:
            u = torch.rand((), dtype=torch.float64)
        return u.to(dtype=like.dtype, device=like.device)

    def _generator(self, salt: int, device: Any) -> torch.Generator | None:
        if self.seed is not None:
            seq = np.random.SeedSequence([self.seed % 2**63, *self.path, salt])
            state = seq.generate_state(2)
            return torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
        return self.generator

    def normal(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like ``like`` (same key, same noise)."""
        g = self._generator(1, like.device)
        dev = g.device if g is not None else like.device
        e = torch.randn(like.shape, generator=g, dtype=torch.float64, device=dev)
        return e.to(dtype=like.dtype, device=like.device)

    def rademacher(self, like: torch.Tensor) -> torch.Tensor:
        """``+-1`` noise shaped like ``like`` (same key, same noise)."""
        g = self._generator(2, like.device)
        dev = g.device if g is not None else like.device
        bits = torch.randint(0, 2, like.shape, generator=g, device=dev)
        return (2 * bits - 1).to(dtype=like.dtype, device=like.device)

    def fold(self, index: int) -> TorchKey:
        if self.seed is not None:
            return TorchKey(self.seed, path=(*self.path, index))
        # a stateful source: draw a fresh seed, and keep ``index`` so that keys folded from
        # identically seeded generators (one per rank, say) still differ by index
        gen = self.generator
        seed = torch.randint(0, 2**62, (), generator=gen, device=gen.device if gen else "cpu")
        return TorchKey(int(seed), path=(index,))

    def __repr__(self) -> str:
        return f"TorchKey(seed={self.seed}, path={self.path})"


def make_key(key: Any) -> TorchKey:
    if isinstance(key, TorchKey):
        return key
    if key is None:
        return TorchKey()
    if isinstance(key, torch.Generator):
        return TorchKey(generator=key)
    if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
        return TorchKey(int(key))
    raise ValueError(
        f"key must be an int seed, a torch.Generator or None on torch backends, got {key!r}."
    )
