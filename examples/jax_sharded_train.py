"""Data-parallel training of a neural ODE with JAX: one step sharded over a device mesh.

    XLA_FLAGS=--xla_force_host_platform_device_count=2 PYTHONPATH=. \\
        python examples/jax_sharded_train.py --steps 20 --regularizer local-error

The batch is split over the devices of a 1-D mesh (axis ``"data"``); every device solves its
shard as its own system (own adaptive steps, own ``tau`` from
``rank_key(seed, shard, backend="diffrax").fold(step)``) and the gradients are averaged with
``jax.lax.pmean`` — the same computation as ``examples/ddp_train.py`` under torchrun. On CPU
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (set before JAX starts) gives N host
devices; on GPUs the mesh spans the GPUs, on several hosts (after
``jax.distributed.initialize()``) all of them. See ``docs/distributed.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

DIM = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (all devices)")
    p.add_argument("--hidden", type=int, default=16)
    p.add_argument("--regularizer", default="local-error",
                   choices=["none", "local-error", "local-stiffness", "global-error",
                            "global-stiffness"])
    p.add_argument("--lam", type=float, default=0.1, help="regularization weight")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--tol", type=float, default=1e-5, help="rtol = atol")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--devices", type=int, default=None, help="devices to use (default: all)")
    p.add_argument("--save", default=None, help="write final parameters and logs (.npz)")
    return p.parse_args(argv)


def make_data(batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points on a circle and the same points on a rotated circle twice as large."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 2 * np.pi, batch_size)
    x = np.stack([np.cos(a), np.sin(a)], 1)
    y = 2.0 * np.stack([np.cos(a + 1.0), np.sin(a + 1.0)], 1)
    return x, y


def make_model(args: argparse.Namespace) -> Any:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    class Field(eqx.Module):
        w1: jax.Array
        b1: jax.Array
        w2: jax.Array
        b2: jax.Array

        def __call__(self, t: Any, y: jax.Array) -> jax.Array:
            return jnp.tanh(y @ self.w1 + self.b1) @ self.w2 + self.b2

    rng = np.random.default_rng(args.seed)
    dt = getattr(jnp, args.dtype)
    return Field(w1=jnp.asarray(rng.normal(0, 0.5, (DIM, args.hidden)), dt),
                 b1=jnp.zeros(args.hidden, dt),
                 w2=jnp.asarray(rng.normal(0, 0.5, (args.hidden, DIM)), dt),
                 b2=jnp.zeros(DIM, dt))


def regularizer(name: str) -> Any:
    from regnde import regularizers as R

    return {"none": None, "local-error": R.LocalError(), "local-stiffness": R.LocalStiffness(),
            "global-error": R.GlobalError(), "global-stiffness": R.GlobalStiffness()}[name]


def make_loss(args: argparse.Namespace) -> Any:
    """``loss_fn(params, (x, y), key) -> (objective, logs)`` for one shard."""
    import jax.numpy as jnp

    import regnde

    reg = regularizer(args.regularizer)
    t = jnp.asarray([0.0, 1.0], dtype=getattr(jnp, args.dtype))

    def loss_fn(f: Any, batch: Any, key: Any) -> tuple[Any, dict[str, Any]]:
        x, y = batch
        sol = regnde.solve(f, x, t, backend="diffrax", method="dopri5", rtol=args.tol,
                           atol=args.tol, regularizer=reg, key=key, trace="summary")
        loss = jnp.mean((sol.ys[-1] - y) ** 2)
        objective = loss if sol.reg is None else loss + args.lam * sol.reg
        return objective, {"loss": loss, "reg": sol.reg, "stats": sol.stats}

    return loss_fn


def init_adam(params: Any) -> Any:
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    zeros = jax.tree.map(jnp.zeros_like, eqx.filter(params, eqx.is_array))
    return zeros, zeros, jnp.asarray(0, dtype=jnp.int32)


def make_update(lr: float) -> Any:
    """Adam with torch's defaults: ``update(params, state, grads) -> (params, state)``."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def update(params: Any, state: Any, grads: Any) -> tuple[Any, Any]:
        m, v, n = state
        n = n + 1
        m = jax.tree.map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree.map(lambda v, g: 0.999 * v + 0.001 * g**2, v, grads)
        c1, c2 = 1 - 0.9**n, 1 - 0.999**n
        step = jax.tree.map(lambda m, v: -lr * (m / c1) / (jnp.sqrt(v / c2) + 1e-8), m, v)
        return eqx.apply_updates(params, step), (m, v, n)

    return update


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import jax

    if args.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from regnde import distributed as D

    devices = jax.devices()[: args.devices]
    try:  # the clear error before anything compiles
        D.check_batch(args.batch_size, len(devices), unit="devices")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mesh = D.make_mesh(devices)
    x, y = make_data(args.batch_size, args.seed + 1)
    dt = getattr(jnp, args.dtype)
    batch = D.shard_batch((jnp.asarray(x, dt), jnp.asarray(y, dt)), mesh)
    params = make_model(args)
    opt_state = init_adam(params)
    step = D.data_parallel(make_loss(args), make_update(args.lr), mesh)
    print(f"{len(devices)} devices ({devices[0].platform}), {args.batch_size // len(devices)} "
          f"rows each, regularizer {args.regularizer}")
    history = []
    start = time.perf_counter()
    for i in range(args.steps):
        params, opt_state, logs = step(params, opt_state, batch, args.seed, i)
        log = logs.reduced()
        history.append([log.loss, np.nan if log.reg is None else log.reg, log.stats.nfe,
                        log.stats_max.nfe, log.stats.nfe_reg])
        print(f"step {i:3d} {log}  {time.perf_counter() - start:.1f} s")
    if args.save:
        leaves = jax.tree.leaves(params)
        np.savez(args.save, *[np.asarray(v) for v in leaves], history=np.asarray(history),
                 world_size=len(devices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
