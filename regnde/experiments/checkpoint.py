"""Safe checkpoints and atomic result files.

A checkpoint is one ``torch.save`` file holding only tensors, numbers, strings, lists and dicts,
and is read back with ``torch.load(..., weights_only=True)``: loading never runs code from the
file. Its ``meta`` entry is a JSON string (identity of the run, history, counters).
Every file is written to a temporary name in the same directory and moved into place with
``os.replace``, so an interrupted write never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FORMAT = "regnde-experiment-checkpoint/1"
CHECKPOINT = "checkpoint.pt"


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: corrupted, not regnde's, or of another run."""


def atomic_write(path: Path, write: Callable[[Any], None], binary: bool = False) -> None:
    """Write ``path`` through ``write(fileobj)`` into a temporary file, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    atomic_write(path, lambda fh: json.dump(obj, fh, indent=2, sort_keys=True))


def save(path: Path, state: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically save ``state`` (nested dicts/lists of tensors and numbers) and ``meta`` (JSON)."""
    payload = {"format": FORMAT, "meta": json.dumps(meta), "state": state}
    atomic_write(path, lambda fh: torch.save(payload, fh), binary=True)


def load(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(state, meta)`` of a checkpoint written by :func:`save`.

    Raises:
        CheckpointError: the file is unreadable, corrupted, refused by the safe loader (it
            holds objects other than tensors and plain data), or not a regnde checkpoint.
    """
    path = Path(path)
    hint = f"Delete {path} to start this run from scratch, or use another --out."
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"checkpoint {path} cannot be loaded safely: it is corrupted, truncated, or holds "
            f"objects other than tensors and plain data ({type(exc).__name__}: {first[:200]}). "
            f"{hint}"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a regnde experiment checkpoint ({FORMAT}). {hint}")
    try:
        meta = json.loads(payload["meta"])
        state = payload["state"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is incomplete ({exc}). {hint}") from None
    if not isinstance(meta, dict) or not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} is malformed. {hint}")
    return state, meta
