"""``torch.distributed`` for :mod:`regnde.distributed`: joining a ``torchrun`` process group
and the all-reduce that :func:`regnde.distributed.reduce_stats` uses.

Process-group backend by device: ``gloo`` for CPU tensors, ``nccl`` for CUDA (one GPU per
process, ``cuda:LOCAL_RANK``). A timeout bounds every collective so that a rank that died or
stalls makes the others fail instead of waiting forever:

- gloo: a collective that does not complete within ``timeout`` raises ``RuntimeError`` in the
  waiting ranks (a peer that exits closes its connections, which fails them at once).
- nccl: collectives are asynchronous; the watchdog aborts them after ``timeout``.
  ``TORCH_NCCL_ASYNC_ERROR_HANDLING=1`` (set here unless already set) makes it then tear the
  process down, so that ``torchrun`` sees a failure and stops the remaining workers.

``torchrun`` itself stops every worker of a node as soon as one exits with an error; the
timeout covers what it cannot see (a stalled rank, a worker on another node).
"""

from __future__ import annotations

import gc
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from regnde.distributed import check_batch, shard

#: Environment variables a launcher (``torchrun``) sets for every worker.
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
#: Default bound on any collective (and on joining the group).
DEFAULT_TIMEOUT = timedelta(minutes=10)


class NotLaunchedError(RuntimeError):
    """:func:`setup` ran outside a launcher: ``torchrun``'s environment variables are missing."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group (returned by :func:`setup`).

    Attributes:
        rank, world_size: global rank and number of processes.
        local_rank: rank on this machine (selects the GPU).
        device: where this rank's model and data live (``cpu`` or ``cuda:LOCAL_RANK``).
        backend: ``"gloo"`` or ``"nccl"``.
        timeout: bound on each collective.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout: timedelta

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs and saves)."""
        return self.rank == 0

    def wrap(self, module: torch.nn.Module, **ddp_options: Any) -> torch.nn.Module:
        """``module`` (already on :attr:`device`) as ``DistributedDataParallel``."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids, **ddp_options)

    def shard(self, batch_size: int) -> slice:
        """This rank's slice of a global batch (see :func:`regnde.distributed.shard`)."""
        return shard(batch_size, self.world_size, self.rank)

    def close(self) -> None:
        """Leave the process group.

        Collects garbage first: a ``DistributedDataParallel`` that is no longer referenced but
        sits in a reference cycle would otherwise keep gloo's worker threads until interpreter
        shutdown, where tearing them down can abort the process."""
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> DistContext:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _as_timedelta(timeout: float | timedelta) -> timedelta:
    if isinstance(timeout, timedelta):
        t = timeout
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        t = timedelta(seconds=float(timeout))
    else:
        raise ValueError(f"timeout must be seconds (a number) or a timedelta, got {timeout!r}.")
    if t.total_seconds() <= 0:
        raise ValueError(f"timeout must be positive, got {t.total_seconds()} s.")
    return t


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an int.") from None


def setup(
    device: str | torch.device | None = None,
    backend: str | None = None,
    timeout: float | timedelta = DEFAULT_TIMEOUT,
    batch_size: int | None = None,
) -> DistContext:
    """Join the process group ``torchrun`` prepared and return this rank's :class:`DistContext`.

    Args:
        device: ``"cpu"``, ``"cuda"`` (becomes ``cuda:LOCAL_RANK``) or a device; ``None``:
            CUDA if available, else CPU.
        backend: process-group backend; ``None`` picks by device: ``"nccl"`` for CUDA,
            ``"gloo"`` for CPU.
        timeout: seconds or a ``timedelta`` bounding every collective (and joining).
        batch_size: if given, checked against the world size before joining, so that an uneven
            batch fails on every rank with the same clear error.

    Raises:
        NotLaunchedError: not launched by ``torchrun`` (its environment variables are missing).
        ValueError: bad ``timeout``, or ``batch_size`` not divisible by the world size.
    """
    missing = [v for v in LAUNCHER_ENV if v not in os.environ]
    if missing:
        raise NotLaunchedError(
            f"regnde.distributed.setup needs the environment torchrun sets; missing "
            f"{', '.join(missing)}. Launch with `torchrun --nproc_per_node=N script.py ...` "
            f"(see docs/distributed.md)."
        )
    t = _as_timedelta(timeout)
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    if batch_size is not None:
        check_batch(batch_size, world)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if backend is None:
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=t, rank=rank, world_size=world)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=dev,
                       backend=str(dist.get_backend()), timeout=t)


def all_reduce_sum_max(values: Sequence[float], group: Any = None
                       ) -> tuple[list[float], list[float], int]:
    """Sums and maxima of ``values`` over the ranks of ``group`` (default: the whole world),
    and the number of ranks. Without an initialized process group: this process's own values.

    On nccl the values travel through this rank's current CUDA device."""
    if not dist.is_available() or not dist.is_initialized():
        return list(values), list(values), 1
    nccl = dist.get_backend(group) == "nccl"
    dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    x = torch.tensor(list(values), dtype=torch.float64, device=dev)
    total, top = x.clone(), x.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    return total.tolist(), top.tolist(), dist.get_world_size(group)
