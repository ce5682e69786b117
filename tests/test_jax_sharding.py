"""JAX data-parallel training: ``regnde.distributed.data_parallel`` over a 2-device mesh.

``XLA_FLAGS=--xla_force_host_platform_device_count=2`` must be set before JAX starts, so the
sharded run is ``examples/jax_sharded_train.py`` in a subprocess (bounded by a time limit) that
saves its final parameters and logs. The reference runs here, on one device: each shard solved
separately with that shard's key ``rank_key(seed, shard, backend="diffrax").fold(step)``,
gradients averaged, the same Adam update — the semantics ``data_parallel`` documents.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from regnde import distributed as D

jax.config.update("jax_enable_x64", True)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "jax_sharded_train.py"
WORLD = 2
STATS = ("nfe", "nfe_reg")
LIMIT = 50  # seconds for one subprocess
COMMON = ["--steps", "2", "--batch-size", "8", "--hidden", "6", "--dtype", "float64",
          "--tol", "1e-6", "--lr", "0.05", "--lam", "1.0"]


@cache
def example() -> dict[str, Any]:
    """The example's functions (its ``main`` does not run)."""
    return runpy.run_path(str(SCRIPT))


def _env() -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={WORLD}",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "JAX_PLATFORMS": "cpu"}


def start(args: list[str]) -> subprocess.Popen[str]:
    """The example on a 2-device mesh, in the background (the reference runs meanwhile)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """``(exit code, stdout, stderr)``; kills the run at the time limit."""
    try:
        out, err = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the sharded run did not finish within {LIMIT} s:\n{out}{err}")
    return proc.returncode, out, err


@cache
def compiled(argv: tuple[str, ...]) -> tuple[Any, Any]:
    """The reference's jitted per-shard gradient and Adam update (compiled once per run)."""
    ex = example()
    args = ex["parse_args"](list(argv))
    loss_fn = ex["make_loss"](args)

    def plain(params: Any, batch: Any, key: Any) -> tuple[Any, dict[str, Any]]:
        objective, log = loss_fn(params, batch, key)  # Stats is no pytree: its fields
        return objective, {**log, "stats": tuple(getattr(log["stats"], f) for f in STATS)}

    grad = eqx.filter_jit(eqx.filter_value_and_grad(plain, has_aux=True))
    return grad, jax.jit(ex["make_update"](args.lr))


def reference(argv: list[str], keys: Any = None) -> tuple[list[np.ndarray], list[list[float]]]:
    """One device: per step, each shard's loss and gradient with that shard's key, gradients
    averaged, one Adam step. ``keys(shard, step)`` replaces the keys."""
    ex = example()
    args = ex["parse_args"](argv)
    x, y = ex["make_data"](args.batch_size, args.seed + 1)
    x, y = jnp.asarray(x), jnp.asarray(y)
    params = ex["make_model"](args)
    state = ex["init_adam"](params)
    grad, update = compiled(tuple(argv))
    history = []
    for step in range(args.steps):
        grads, logs = [], []
        for r in range(WORLD):
            key = (D.rank_key(args.seed, r, backend="diffrax").fold(step).key if keys is None
                   else keys(r, step))
            part = D.shard(args.batch_size, WORLD, r)
            (_, log), g = grad(params, (x[part], y[part]), key)
            grads.append(g)
            logs.append(log)
        mean = jax.tree.map(lambda *g: sum(g[1:], g[0]) / WORLD, *grads)
        params, state = update(params, state, mean)
        regs = [np.nan if v["reg"] is None else float(v["reg"]) for v in logs]
        nfes = [float(v["stats"][0]) for v in logs]
        history.append([float(np.mean([float(v["loss"]) for v in logs])), float(np.mean(regs)),
                        float(np.mean(nfes)), max(nfes),
                        float(np.mean([float(v["stats"][1]) for v in logs]))])
    return [np.asarray(v) for v in jax.tree.leaves(params)], history


@pytest.mark.parametrize("name", ["local-error", "global-error"])
def test_sharded_step_equals_per_shard_reference(tmp_path: Path, name: str) -> None:
    out = tmp_path / "final.npz"
    argv = [*COMMON, "--regularizer", name]
    proc = start([*argv, "--save", str(out)])
    params, history = reference(argv)
    rc, stdout, stderr = finish(proc)
    assert rc == 0, stdout[-2000:] + stderr[-3000:]
    assert f"{WORLD} devices (cpu), 4 rows each" in stdout
    saved = np.load(out)
    assert int(saved["world_size"]) == WORLD
    got = [saved[f"arr_{i}"] for i in range(len(saved.files) - 2)]

    initial = jax.tree.leaves(example()["make_model"](example()["parse_args"](argv)))
    assert len(got) == len(params) == len(initial)
    for g, p, p0 in zip(got, params, initial, strict=True):
        assert g.dtype == np.float64
        assert not np.allclose(p, p0), "did not train"
        np.testing.assert_allclose(g, p, rtol=1e-10, atol=1e-12)
    # the logs are the mean (and max) over shards
    np.testing.assert_allclose(saved["history"], np.asarray(history), rtol=1e-10)
    assert (saved["history"][:, 4] > 0).all() == name.startswith("local")  # the extra step

    if name == "local-error":  # the comparison notices shards that share one key
        wrong, _ = reference(argv, keys=lambda r, step: D.rank_key(
            0, 0, backend="diffrax").fold(step).key)
        assert any(not np.allclose(g, w, rtol=1e-10, atol=1e-12)
                   for g, w in zip(got, wrong, strict=True))


def test_batch_not_divisible_by_the_devices_is_a_clear_error(tmp_path: Path) -> None:
    out = tmp_path / "final.npz"
    rc, _, stderr = finish(start([*COMMON, "--batch-size", "15", "--save", str(out)]))
    assert rc == 2
    assert "batch size 15 is not divisible by the world size 2 (devices)" in stderr
    assert "14 or 16" in stderr and "number of devices" in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_the_step_checks_the_batch_itself() -> None:
    mesh = D.make_mesh(jax.devices()[:1] * 1)
    with pytest.raises(ValueError, match="same leading"):
        D.shard_batch((jnp.zeros((4, 2)), jnp.zeros((3, 2))), mesh)
    with pytest.raises(ValueError, match="no axis 'model'"):
        D.data_parallel(lambda p, b, k: (0.0, None), lambda p, s, g: (p, s), mesh, axis="model")


def test_shard_key_is_the_rank_key_folded_with_the_step() -> None:
    from regnde.adapters.jax import distributed as J

    mesh = D.make_mesh(jax.devices()[:1])
    draw = jax.jit(jax.shard_map(
        lambda k, s: jax.random.key_data(J.shard_key(k, s))[None],
        mesh=mesh, in_specs=(jax.sharding.PartitionSpec(),) * 2,
        out_specs=jax.sharding.PartitionSpec("data")))
    got = draw(J.base_key(5), jnp.asarray(3, jnp.uint32))[0]
    want = jax.random.key_data(D.rank_key(5, 0, backend="diffrax").fold(3).key)
    np.testing.assert_array_equal(got, want)


def test_single_process_helpers() -> None:
    import regnde
    from regnde.adapters.jax import distributed as J

    got = D.reduce_stats(regnde.Stats(nfe=14, nfe_reg=7, n_steps=2, n_rejected=1),
                         loss=jnp.asarray(0.25), framework="jax")
    assert (got.world_size, got.loss, got.reg, got.stats.nfe) == (1, 0.25, None, 14.0)
    mesh = J.setup(distributed=False)
    assert mesh.axis_names == ("data",) and mesh.size == len(jax.devices())
    with pytest.raises(ValueError, match="jax.distributed.initialize"):
        J.setup(distributed=False, num_processes=2)
