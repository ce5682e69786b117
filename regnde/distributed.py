"""Data-parallel training: rank-aware keys, batch shards and statistics reduced across ranks.

Backend-neutral: nothing here imports a framework or names a backend. The pieces a framework
must provide live in the module a backend declares as its ``distributed`` capability
(:attr:`regnde.backend.Backend.distributed`; for the built-in torch backends
``regnde.adapters.torch.distributed``, for JAX ``regnde.adapters.jax.distributed``), imported on
first use; a third-party backend that declares one gets all of this too.

- :func:`rank_key`: each rank draws its own sampled times from ``key.fold(rank)``; the same
  seed and world size give the same draws on every run.
- :func:`shard`: the slice of a global batch a rank owns; a batch the world size does not divide
  is an error (data-parallel gradients are the mean over equal shards).
- :func:`reduce_stats`: loss, regularizer value and :class:`regnde.Stats` of one training step,
  averaged (and maximised) over ranks for logging.
- :func:`mean_across_ranks`: one scalar averaged over ranks (an NFE budget's ``reduce``, so
  that every rank uses the same coefficient).

Typical torch loop (``torchrun --nproc_per_node=2 train.py``)::

    from regnde import distributed as D

    ctx = D.setup()                          # gloo on CPU, nccl on GPU; timeouts set
    model = ctx.wrap(Model().to(ctx.device)) # DistributedDataParallel
    xs = x[D.shard(len(x), ctx.world_size, ctx.rank)]
    for step in range(steps):
        key = D.rank_key(seed, ctx.rank).fold(step)
        loss, reg, stats = model(xs, key)    # regnde.solve / regnde.regularize inside
        (loss + lam * reg).backward()        # DDP averages the gradients
        log = D.reduce_stats(stats, loss=loss, reg=reg)
        if ctx.rank == 0:
            print(log)

JAX (``jax.shard_map`` over a 1-D device mesh; the same per-shard semantics)::

    mesh = D.make_mesh()                               # axis "data" over jax.devices()
    step = D.data_parallel(loss_fn, update, mesh)      # loss_fn(params, shard, key)
    params, opt_state, logs = step(params, opt_state, D.shard_batch(batch, mesh), seed, i)
    print(logs.reduced())
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from regnde.errors import batch_not_divisible, choices
from regnde.trace import Stats
from regnde.validate import framework_of

#: Fields of :class:`regnde.Stats`, in the order they travel between ranks.
STAT_FIELDS = ("nfe", "nfe_reg", "n_steps", "n_rejected")

AllReduce = Callable[[Sequence[float]], tuple[Sequence[float], Sequence[float], int]]


# -- helper modules -----------------------------------------------------------------------------
def helper_modules() -> dict[str, str]:
    """``framework -> module path`` of the distributed helpers the registered backends declare
    (:attr:`regnde.backend.Backend.distributed`), in preference order: for each framework the
    first backend's (built-ins first, then in registration order). Imports nothing."""
    from regnde.plugins.manager import registry

    reg = registry()
    found: dict[str, str] = {}
    for name in reg.in_order():
        path = reg.capability(name, "distributed")
        if path:
            found.setdefault(str(reg.capability(name, "framework")), str(path))
    return found


def helpers(framework: str | None = None, needs: str = "all_reduce_sum_max",
            what: str = "distributed helpers") -> Any:
    """The distributed helper module of ``framework`` (``None``: the first framework whose
    module has ``needs``), imported. ``what`` names the caller in errors."""
    modules = helper_modules()
    if framework is not None:
        if framework not in modules:
            raise ValueError(choices(f"framework for {what}", framework, modules,
                                     "Or pass all_reduce=... for another communication layer."
                                     if needs == "all_reduce_sum_max" else ""))
        modules = {framework: modules[framework]}
    for path in modules.values():
        module = importlib.import_module(path)
        if hasattr(module, needs):
            return module
    offered = ", ".join(f"{fw} ({path})" for fw, path in helper_modules().items()) or "none"
    raise ValueError(f"{what} needs a backend whose distributed helpers provide {needs}(), and "
                     f"no registered one declares such a module (Backend.distributed); "
                     f"declared: {offered}.")


# -- keys ---------------------------------------------------------------------------------------
def rank_key(key: Any, rank: int, *, backend: str | None = None) -> Any:
    """The key of one rank: ``key`` folded with ``rank``.

    Pass the result (or ``.fold(step)`` of it, for a fresh key per training step) as ``key=`` to
    :func:`regnde.solve` or :func:`regnde.regularize`. With an int seed the draws are pure: the
    same seed, rank and world size give the same sampled times on every run, and different
    ranks draw independently.

    Args:
        key: an int seed, a key of the backend (anything with ``fold``, e.g. the result of an
            earlier ``rank_key``), or what a backend's ``make_key`` accepts (a
            ``torch.Generator``, a JAX PRNG key).
        rank: this process's rank, ``0 <= rank``.
        backend: the backend whose keys ``key`` becomes. ``None`` (the default): for a
            generator or PRNG key, the backend of its framework that accepts it (the one
            ``backend=None`` solves with, see :func:`regnde.api.default_backend`); for an int
            seed or ``None``, the first registered backend that declares itself a default
            (built-ins first: the torch keys of ``"torchdiffeq"`` where torch is installed, as
            before). Name the backend (``backend="diffrax"``) for JAX keys from an int seed.

    Returns:
        A key of the backend (it has ``fold`` and ``uniform``).
    """
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 0:
        raise ValueError(f"rank must be a non-negative int, got {rank!r}.")
    if not hasattr(key, "fold"):
        key = _make_key(key, backend)
    return key.fold(rank)


def _make_key(key: Any, backend: str | None) -> Any:
    from regnde.plugins.manager import registry

    reg = registry()
    if backend is not None:
        return reg.backend(backend).make_key(key)
    if key is None or (isinstance(key, int) and not isinstance(key, bool)):
        candidates = reg.defaults(None, "ode") or reg.defaults(None, "sde")
        if not candidates:
            raise ValueError("rank_key: no registered backend declares itself a default "
                             "(Backend.default_for); pass backend=..." + reg.failure_note())
        return reg.backend(candidates[0]).make_key(key)
    fw = framework_of(key)
    candidates = list(dict.fromkeys(
        [*reg.defaults(fw, "ode"), *reg.defaults(fw, "sde"), *reg.of_framework(fw)]))
    errors = []
    for name in candidates:
        try:
            return reg.backend(name).make_key(key)
        except Exception as exc:  # not this backend's kind of key: try the next one
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    tried = f" (tried {'; '.join(errors)})" if errors else ""
    raise ValueError(
        f"rank_key: cannot tell which backend's key {type(key).__module__}."
        f"{type(key).__name__} is: no registered backend of framework {fw!r} accepts it"
        f"{tried}. Pass an int seed, a key with fold(), or backend=...{reg.failure_note()}"
    )


# -- batches ------------------------------------------------------------------------------------
def check_batch(batch_size: int, world_size: int, unit: str = "processes") -> int:
    """The per-rank batch size ``batch_size // world_size``.

    ``unit`` names what the world consists of in the message (``"processes"`` for torchrun,
    ``"devices"`` for a JAX mesh).

    Raises:
        ValueError: ``batch_size`` is not a positive multiple of ``world_size``; the message
            names both and the nearest sizes that work.
    """
    for name, v in (("batch_size", batch_size), ("world_size", world_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if batch_size % world_size:
        raise ValueError(batch_not_divisible(batch_size, world_size, unit))
    return batch_size // world_size


def shard(batch_size: int, world_size: int, rank: int) -> slice:
    """The contiguous slice of a global batch that ``rank`` owns: ``x[shard(len(x), W, r)]``.

    Works for torch tensors, NumPy and JAX arrays alike; rank ``r`` owns rows
    ``r * n, ..., (r + 1) * n - 1`` with ``n = batch_size // world_size`` (see
    :func:`check_batch` for the error on uneven batches).
    """
    n = check_batch(batch_size, world_size)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}.")
    return slice(rank * n, (rank + 1) * n)


# -- statistics ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reduced:
    """One training step's numbers, reduced over all ranks (plain Python floats).

    Attributes:
        world_size: number of ranks that contributed.
        loss, reg: mean over ranks (``None`` where not given). With equal shards and DDP's mean
            of gradients this is the loss whose gradient the update follows.
        stats: mean over ranks of each :class:`regnde.Stats` count (evaluations per rank).
        stats_max: max over ranks (the slowest rank sets the pace of a synchronous step).
    """

    world_size: int
    loss: float | None
    reg: float | None
    stats: Stats = field(default_factory=Stats)
    stats_max: Stats = field(default_factory=Stats)

    def __str__(self) -> str:
        parts = []
        if self.loss is not None:
            parts.append(f"loss {self.loss:.6g}")
        if self.reg is not None:
            parts.append(f"reg {self.reg:.6g}")
        s, m = self.stats, self.stats_max
        parts.append(f"NFE {s.nfe:.1f} (max {m.nfe:g}) +{s.nfe_reg:.1f} reg")
        parts.append(f"steps {s.n_steps:.1f} rejected {s.n_rejected:.1f}")
        return f"[{self.world_size} ranks] " + ", ".join(parts)


def _scalar(x: Any) -> float:
    if hasattr(x, "detach"):  # a torch tensor: no graph, any device
        x = x.detach()
    if hasattr(x, "item"):
        return float(x.item())
    return float(x)


def reduce_stats(
    stats: Stats,
    *,
    loss: Any = None,
    reg: Any = None,
    framework: str | None = None,
    all_reduce: AllReduce | None = None,
    **options: Any,
) -> Reduced:
    """Average (and maximise) a step's loss, regularizer value and counts over all ranks.

    A collective: every rank must call it, in the same order relative to other collectives, with
    ``loss`` and ``reg`` given on all ranks or on none. Values are detached; use the result for
    logging only.

    Args:
        stats: this rank's :class:`regnde.Stats` (``sol.stats`` or the drop-in's ``reg.stats``).
        loss, reg: this rank's scalars (tensors, arrays or numbers) or ``None``.
        framework: whose collectives to use (a framework whose backend declares distributed
            helpers, :func:`helper_modules`): ``"torch"`` (``torch.distributed``; the default
            process group unless ``group=`` is passed in ``options``), or ``"jax"`` (between
            JAX processes of a multi-host job; one process: its own values). Inside a sharded
            JAX step the shards are reduced by :func:`data_parallel` itself. ``None`` (the
            default): the framework of ``loss`` or ``reg`` where they are arrays of one that
            has helpers, else the first framework that has them (built-ins first: torch where
            it is installed).
        all_reduce: instead of ``framework``, a function taking this rank's values and returning
            ``(sums, maxima, world_size)`` over ranks (for another communication layer).
        **options: passed to the framework's all-reduce (torch: ``group``).

    Returns:
        :class:`Reduced` with plain floats, identical on every rank.
    """
    given = [(name, v) for name, v in (("loss", loss), ("reg", reg)) if v is not None]
    values = [_scalar(v) for _, v in given] + [float(getattr(stats, f)) for f in STAT_FIELDS]
    sums, maxs, world = _sum_max(values, [v for _, v in given], framework, all_reduce,
                                 "reduce_stats", options)
    return reduced([n for n, _ in given], sums, maxs, world)


def _sum_max(values: list[float], arrays: Sequence[Any], framework: str | None,
             all_reduce: AllReduce | None, what: str, options: dict[str, Any]
             ) -> tuple[Sequence[float], Sequence[float], int]:
    """Sums and maxima of ``values`` over ranks and the world size, through ``all_reduce`` or
    the helpers of ``framework`` (``None``: the framework of the first of ``arrays`` that has
    helpers, else the first framework that has them)."""
    if all_reduce is not None:
        return all_reduce(values)
    if framework is None:
        offered = helper_modules()
        framework = next((fw for fw in map(framework_of, arrays) if fw in offered), None)
    module = helpers(framework, "all_reduce_sum_max", what)
    return module.all_reduce_sum_max(values, **options)  # type: ignore[no-any-return]


def mean_across_ranks(value: Any, *, framework: str | None = None,
                      all_reduce: AllReduce | None = None, **options: Any) -> float:
    """The mean of one scalar over all ranks, the same float on every rank (a collective).

    Made for :class:`regnde.schedules.NFEBudget`'s ``reduce``: with
    ``NFEBudget(40, reduce=D.mean_across_ranks)`` every rank feeds its own NFE to ``update`` and
    every rank gets the same coefficient, chosen from the NFE averaged over ranks. Outside a
    process group: ``value`` itself. ``framework``, ``all_reduce`` and ``options`` as in
    :func:`reduce_stats`."""
    sums, _, world = _sum_max([_scalar(value)], [value], framework, all_reduce,
                              "mean_across_ranks", options)
    return float(sums[0]) / int(world)


def reduced(names: Sequence[str], sums: Sequence[float], maxs: Sequence[float],
            world: int) -> Reduced:
    """:class:`Reduced` from sums and maxima over ranks of ``(*names, *STAT_FIELDS)``
    (``names``: the given ones of ``"loss"``, ``"reg"``, in that order)."""
    means = [s / world for s in sums]
    named = dict(zip(names, means, strict=False))
    k = len(names)
    return Reduced(
        world_size=int(world),
        loss=named.get("loss"),
        reg=named.get("reg"),
        stats=Stats(**dict(zip(STAT_FIELDS, means[k:], strict=True))),
        stats_max=Stats(**dict(zip(STAT_FIELDS, maxs[k:], strict=True))),
    )


# -- process groups -----------------------------------------------------------------------------
def setup(framework: str | None = None, **options: Any) -> Any:
    """Join the process group of a launcher (``torchrun``) and return the rank's context.

    ``framework``: whose ``setup`` to run, from the distributed helpers its backend declares
    (:func:`helper_modules`); ``None`` (the default): the first framework that has them
    (built-ins first: torch where it is installed).

    ``framework="torch"``: :func:`regnde.adapters.torch.distributed.setup` (gloo on CPU, nccl
    on GPU, picked by device; a timeout so that a failed rank stops the others instead of
    hanging). ``options`` go to it.

    ``framework="jax"``: :func:`regnde.adapters.jax.distributed.setup`
    (``jax.distributed.initialize(**options)`` for multi-host jobs, then the 1-D ``"data"`` mesh
    over every device of every process, which it returns).
    """
    return helpers(framework, "setup", "setup").setup(**options)


# -- JAX ----------------------------------------------------------------------------------------
def data_parallel(loss_fn: Callable[..., Any], update: Callable[..., Any], mesh: Any,
                  **options: Any) -> Callable[..., Any]:
    """A jitted JAX training step sharded over a 1-D device ``mesh`` (``jax.shard_map``): each
    shard its own system with its own key ``rank_key(seed, i, backend="diffrax").fold(step)``,
    gradients averaged with ``jax.lax.pmean``. See
    :func:`regnde.adapters.jax.distributed.data_parallel` (imports JAX on first use; the
    first backend whose distributed helpers have ``data_parallel`` provides it)."""
    return helpers(None, "data_parallel", "data_parallel").data_parallel(loss_fn, update, mesh,
                                                                         **options)


def make_mesh(devices: Sequence[Any] | None = None, axis: str = "data") -> Any:
    """A 1-D JAX device mesh named ``axis`` (default: every device of every host); see
    :func:`regnde.adapters.jax.distributed.make_mesh`."""
    return helpers(None, "make_mesh", "make_mesh").make_mesh(devices, axis)


def shard_batch(batch: Any, mesh: Any, axis: str = "data") -> Any:
    """A JAX batch placed on ``mesh``, split along ``axis`` (checked with
    :func:`check_batch`); see :func:`regnde.adapters.jax.distributed.shard_batch`."""
    return helpers(None, "shard_batch", "shard_batch").shard_batch(batch, mesh, axis)
