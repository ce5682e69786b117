"""JAX data-parallel training for :mod:`regnde.distributed`: one training step sharded over a
1-D device mesh with ``jax.shard_map``.

Semantics (the same as PyTorch DDP and the torch half of :mod:`regnde.distributed`): the global
batch is split into equal shards along the mesh axis (``"data"``); **each shard is its own
system** — its own adaptive steps, its own error norm, its own sampled ``tau`` for local
regularizers, drawn from the shard's key ``rank_key(seed, shard_index,
backend="diffrax").fold(step)``. Gradients, and the logged loss, regularizer value and counts,
are averaged over shards with ``jax.lax.pmean`` / ``psum`` (and maximised with ``pmax``). A
solve of the whole batch as one system would share its steps over all shards: a different
computation, with different digits and NFE.

Multi-host: after ``jax.distributed.initialize()`` on every process, a mesh over
``jax.devices()`` spans all hosts and the same step runs unchanged (see
``docs/distributed.md``); each process then passes its local rows through
:func:`shard_batch`.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from regnde.distributed import STAT_FIELDS, Reduced, check_batch, reduced
from regnde.trace import Stats

#: The default name of the mesh axis that the batch is split along.
AXIS = "data"

#: ``loss_fn(params, batch, key) -> (objective, logs)``; ``logs`` a mapping with any of
#: ``"loss"``, ``"reg"`` (scalars) and ``"stats"`` (a :class:`regnde.Stats`).
LossFn = Callable[[Any, Any, jax.Array], tuple[jax.Array, Any]]
#: ``update(params, opt_state, grads) -> (params, opt_state)`` (e.g. an optax update).
UpdateFn = Callable[[Any, Any, Any], tuple[Any, Any]]


_PATCH_LOCK = threading.RLock()


@contextlib.contextmanager
def _closure_convert_ignores_sharding() -> Iterator[None]:
    """While tracing a sharded step: let equinox's closure-conversion check compare shapes and
    dtypes only.

    Inside ``shard_map`` JAX attaches the manual mesh to the abstract values of some arrays
    (``sharding=NamedSharding(AbstractMesh(..., Manual), P())``) and not to others, so the
    backward pass of diffrax's checkpointed while loop (``RecursiveCheckpointAdjoint``) fails
    equinox's check "Closure-converted function called with different dynamic arguments"
    although shapes and dtypes agree (diffrax issue #765; equinox pull request #1261 fixes the
    check). Here equinox's ``_strip_weak_dtype`` (used on both sides of that check only) drops
    the sharding for the duration of the trace; equinox versions without it are left alone.
    """
    try:
        from equinox import _ad
    except ImportError:  # pragma: no cover - a future equinox layout
        yield
        return
    original = getattr(_ad, "_strip_weak_dtype", None)
    if original is None:  # pragma: no cover - fixed or refactored upstream
        yield
        return

    def strip(tree: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)

    with _PATCH_LOCK:
        _ad._strip_weak_dtype = strip
        try:
            yield
        finally:
            _ad._strip_weak_dtype = original


def make_mesh(devices: Sequence[Any] | None = None, axis: str = AXIS) -> Mesh:
    """A 1-D :class:`jax.sharding.Mesh` named ``axis`` over ``devices`` (default: all of
    ``jax.devices()``, on every host after ``jax.distributed.initialize``)."""
    devs = list(jax.devices() if devices is None else devices)
    if not devs:
        raise ValueError("make_mesh needs at least one device.")
    return Mesh(np.asarray(devs, dtype=object), (axis,))


def _world(mesh: Mesh, axis: str) -> int:
    if axis not in mesh.shape:
        raise ValueError(f"mesh has no axis {axis!r} (axes: {tuple(mesh.shape)}).")
    return int(mesh.shape[axis])


def check_sharded_batch(batch: Any, mesh: Mesh, axis: str = AXIS) -> int:
    """The per-shard batch size; every array leaf of ``batch`` must have the same leading
    size, divisible by the number of devices along ``axis``
    (:func:`regnde.distributed.check_batch`'s ``ValueError`` otherwise)."""
    world = _world(mesh, axis)
    sizes = {int(jnp.shape(x)[0]) if jnp.ndim(x) else -1 for x in jax.tree.leaves(batch)}
    if not sizes:
        raise ValueError("the batch has no arrays to shard.")
    if len(sizes) != 1 or -1 in sizes:
        raise ValueError(f"every array of the batch needs the same leading (batch) axis; got "
                         f"leading sizes {sorted(sizes)} (-1: a scalar).")
    return check_batch(sizes.pop(), world, unit="devices")


def shard_batch(batch: Any, mesh: Mesh, axis: str = AXIS) -> Any:
    """``batch`` (a pytree of arrays with a leading batch axis) placed on ``mesh``, split
    along ``axis`` (``NamedSharding(mesh, P(axis))``): device ``i`` holds rows
    ``regnde.distributed.shard(len, n_devices, i)``. Checks the batch size first."""
    check_sharded_batch(batch, mesh, axis)
    sharding = NamedSharding(mesh, PartitionSpec(axis))
    return jax.tree.map(lambda x: jax.device_put(x, sharding), batch)


def base_key(seed: Any) -> jax.Array:
    """A typed JAX PRNG key from an int seed (``jax.random.key``), a typed key, or raw
    ``uint32[2]`` key data — the key ``rank_key(seed, ..., backend="diffrax")`` starts from."""
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return jax.random.key(int(seed))
    if isinstance(seed, jax.Array) and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key):
        return seed
    if isinstance(seed, jax.Array) and seed.dtype == jnp.uint32 and seed.shape == (2,):
        return jax.random.wrap_key_data(seed)
    raise ValueError(f"seed must be an int or a JAX PRNG key, got {seed!r}.")


def shard_key(key: jax.Array, step: Any, axis: str = AXIS) -> jax.Array:
    """Inside ``shard_map``: this shard's key for ``step``, equal to
    ``rank_key(key, shard_index, backend="diffrax").fold(step).key``."""
    return jax.random.fold_in(jax.random.fold_in(key, jax.lax.axis_index(axis)), step)


def mesh_sum_max(values: Sequence[Any], axis: str = AXIS) -> tuple[jax.Array, jax.Array, Any]:
    """Inside ``shard_map``: sums and maxima of ``values`` over the shards along ``axis``, and
    the number of shards (the ``all_reduce`` contract of
    :func:`regnde.distributed.reduce_stats`, on traced arrays)."""
    x = jnp.stack([jnp.asarray(v, dtype=jnp.result_type(float)) for v in values])
    return jax.lax.psum(x, axis), jax.lax.pmax(x, axis), jax.lax.axis_size(axis)


class ShardLogs(eqx.Module):
    """One step's logged numbers, reduced over shards inside the step (device arrays; no
    host synchronisation until :meth:`reduced` is called).

    Attributes:
        sums, maxs: sums and maxima over shards of ``(*names, *STAT_FIELDS)``.
        names: which of ``"loss"``, ``"reg"`` the loss function logged.
        world_size: number of shards.
    """

    sums: jax.Array
    maxs: jax.Array
    names: tuple[str, ...] = eqx.field(static=True)
    world_size: int = eqx.field(static=True)

    def reduced(self) -> Reduced:
        """The numbers as a :class:`regnde.distributed.Reduced` (plain floats: means and
        maxima over shards), as :func:`regnde.distributed.reduce_stats` returns them."""
        return reduced(self.names, [float(v) for v in self.sums],
                       [float(v) for v in self.maxs], self.world_size)


def reduce_logs(logs: Any, axis: str = AXIS) -> ShardLogs:
    """Inside ``shard_map``: ``{"loss": .., "reg": .., "stats": Stats}`` (any of them) of this
    shard as :class:`ShardLogs` summed and maximised over all shards."""
    logs = {} if logs is None else dict(logs)
    unknown = sorted(set(logs) - {"loss", "reg", "stats"})
    if unknown:
        raise ValueError(f"logs may hold 'loss', 'reg' and 'stats'; got also {unknown}.")
    names = tuple(n for n in ("loss", "reg") if logs.get(n) is not None)
    stats = logs.get("stats") or Stats()
    values = [logs[n] for n in names] + [getattr(stats, f) for f in STAT_FIELDS]
    sums, maxs, world = mesh_sum_max(values, axis)
    return ShardLogs(sums=sums, maxs=maxs, names=names, world_size=int(world))


def data_parallel(loss_fn: LossFn, update: UpdateFn, mesh: Mesh, *, axis: str = AXIS,
                  check_vma: bool = False) -> Callable[..., tuple[Any, Any, ShardLogs]]:
    """A jitted data-parallel training step over the 1-D ``mesh``.

    Returns ``step(params, opt_state, batch, seed, step_index) -> (params, opt_state, logs)``:

    1. ``batch`` (a pytree of arrays with a leading batch axis; its size a multiple of the
       number of devices, else :func:`regnde.distributed.check_batch`'s ``ValueError``) is
       split along ``axis``; ``params`` and ``opt_state`` are replicated.
    2. Every shard calls ``loss_fn(params, shard, key)`` with its own key
       ``rank_key(seed, shard_index, backend="diffrax").fold(step_index).key`` and takes the
       gradient of the objective (``eqx.filter_value_and_grad``, so equinox modules work).
       Its ``regnde.solve`` calls are its own systems: own adaptive steps, own ``tau``.
    3. Gradients are averaged over shards (``jax.lax.pmean``), as DDP does, and
       ``update(params, opt_state, grads)`` runs on every device with the same mean.
    4. ``logs`` (:class:`ShardLogs`; ``logs.reduced()`` for floats) holds the mean and max over
       shards of what ``loss_fn`` returned besides the objective: a mapping with any of
       ``"loss"``, ``"reg"`` and ``"stats"`` (``sol.stats``), or ``None``.

    Args:
        loss_fn: ``(params, batch_shard, key) -> (objective, logs)``; pass ``key`` to
            ``regnde.solve(..., key=key)``.
        update: ``(params, opt_state, grads) -> (params, opt_state)``.
        mesh: a 1-D mesh (:func:`make_mesh`).
        axis: the mesh axis to split the batch along.
        check_vma: passed to ``jax.shard_map`` (off by default: the adaptive solver loops
            mix replicated and per-shard values in ways its checker does not follow).

    ``seed`` is an int or a JAX key (not traced: the same across steps); ``step_index`` an int
    or an integer array (traced: changing it does not recompile).
    """
    world = _world(mesh, axis)
    rep, split = PartitionSpec(), PartitionSpec(axis)
    replicated = NamedSharding(mesh, rep)

    @eqx.filter_jit
    def compiled(params: Any, opt_state: Any, batch: Any, key: jax.Array, index: jax.Array
                 ) -> tuple[Any, Any, ShardLogs]:
        p_dyn, p_static = eqx.partition(params, eqx.is_array)
        o_dyn, o_static = eqx.partition(opt_state, eqx.is_array)
        shapes: dict[str, Any] = {}

        def body(p_dyn: Any, o_dyn: Any, shard: Any, key: jax.Array, index: jax.Array
                 ) -> tuple[Any, Any, jax.Array, jax.Array]:
            params = eqx.combine(p_dyn, p_static)
            opt_state = eqx.combine(o_dyn, o_static)
            k = shard_key(key, index, axis)
            (_, logs), grads = eqx.filter_value_and_grad(loss_fn, has_aux=True)(params, shard, k)
            grads = jax.tree.map(lambda g: jax.lax.pmean(g, axis), grads)
            params, opt_state = update(params, opt_state, grads)
            out = reduce_logs(logs, axis)
            shapes["names"] = out.names
            return (eqx.partition(params, eqx.is_array)[0],
                    eqx.partition(opt_state, eqx.is_array)[0], out.sums, out.maxs)

        mapped = jax.shard_map(body, mesh=mesh, in_specs=(rep, rep, split, rep, rep),
                               out_specs=(rep, rep, rep, rep), check_vma=check_vma)
        p_new, o_new, sums, maxs = mapped(p_dyn, o_dyn, batch, key, index)
        logs = ShardLogs(sums=sums, maxs=maxs, names=shapes["names"], world_size=world)
        return eqx.combine(p_new, p_static), eqx.combine(o_new, o_static), logs

    def step(params: Any, opt_state: Any, batch: Any, seed: Any, step_index: Any
             ) -> tuple[Any, Any, ShardLogs]:
        check_sharded_batch(batch, mesh, axis)
        index = jnp.asarray(step_index, dtype=jnp.uint32)
        # replicated on the mesh, like the step's outputs: the next call reuses the compilation
        params, opt_state = jax.tree.map(
            lambda x: jax.device_put(x, replicated) if eqx.is_array(x) else x,
            (params, opt_state))
        with _closure_convert_ignores_sharding():  # the first call traces
            return compiled(params, opt_state, batch, base_key(seed), index)

    return step


def all_reduce_sum_max(values: Sequence[float]) -> tuple[list[float], list[float], int]:
    """Host side, between JAX processes: sums and maxima of each process's ``values`` over all
    processes (``multihost_utils.process_allgather``; one process: its own values), and the
    process count. :func:`regnde.distributed.reduce_stats` uses it with ``framework="jax"``;
    inside a sharded step use :func:`reduce_logs` instead."""
    if jax.process_count() == 1:
        return [float(v) for v in values], [float(v) for v in values], 1
    from jax.experimental import multihost_utils

    x = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.float64)))
    return x.sum(0).tolist(), x.max(0).tolist(), int(x.shape[0])


def setup(*, distributed: bool = True, axis: str = AXIS, **options: Any) -> Mesh:
    """Multi-host JAX: ``jax.distributed.initialize(**options)`` on this process (with
    ``distributed=True``; ``coordinator_address``, ``num_processes``, ``process_id``, or
    auto-detected on SLURM / Open MPI / Cloud TPU), then a 1-D mesh over every device of every
    process (:func:`make_mesh`). ``regnde.distributed.setup("jax", ...)`` calls it.
    With ``distributed=False`` (one process) only the mesh."""
    if distributed:
        jax.distributed.initialize(**options)
    elif options:
        raise ValueError(f"options {sorted(options)} are for jax.distributed.initialize; "
                         f"pass distributed=True.")
    return make_mesh(axis=axis)
