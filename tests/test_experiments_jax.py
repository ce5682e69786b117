"""``digits-node`` on ``--backend diffrax`` (regnde.experiments.jax_node): end to end in a tiny
configuration, the same results layout as the torch variant, the same start (weights, batch),
one compilation per run, and exact resume from the runner's safe checkpoints. Compilation
dominates the time: each test compiles the training step at most once."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffrax")
pytest.importorskip("equinox")

from regnde.experiments import base, checkpoint, jax_node, runner
from regnde.experiments.cli import main

TINY = {"hidden": "8", "n_train": "64", "n_eval": "32", "batch_size": "32"}


pytestmark = pytest.mark.usefixtures("one_thread_float32")


def spec(out: Path, regularizer: str = "none", iters: int = 2, backend: str = "diffrax",
         **kw) -> runner.RunSpec:
    return runner.RunSpec(experiment="digits-node", regularizer=regularizer, backend=backend,
                          out=out, iters=iters, overrides=dict(TINY), progress=False, **kw)


def layout(obj: object) -> object:
    """The keys of nested dicts (values replaced by their layout); lists by their first item."""
    if isinstance(obj, dict):
        return {k: layout(v) for k, v in obj.items() if k not in ("versions", "config")}
    if isinstance(obj, list):
        return [layout(obj[0])] if obj else []
    return None


def test_digits_node_runs_on_diffrax_like_on_torchdiffeq(tmp_path, capsys):
    out = tmp_path / "jax"
    args = ["run", "digits-node", "--backend", "diffrax", "--regularizer",
            "local-error-unbiased+global-stiffness", "--iters", "2", "--out", str(out),
            "--no-progress"]
    for k, v in TINY.items():
        args += ["--set", f"{k}={v}"]
    jax_node._train_step._cached.clear_cache()
    assert main(args) == 0
    # one compilation, although the coefficients change every iteration
    assert jax_node._train_step._cached._cache_size() == 1
    res = json.loads((out / "results.json").read_text())
    assert res["backend"] == "diffrax" and res["lam"] == "2.5:1.0+0.01"
    for split in ("train", "val", "test"):
        assert np.isfinite(res[split]["metric"]) and res[split]["nfe"] >= 2
    assert res["eval_nfe"] == res["test"]["nfe"] and res["prediction_seconds_per_batch"] > 0
    assert {"jax", "equinox", "diffrax"} <= set(res["versions"])
    history = json.loads((out / "history.json").read_text())
    assert all(h["reg"] > 0 and h["nfe_reg"] > 0 for h in history)
    assert len(history[0]["lam"]) == 2
    assert json.loads(capsys.readouterr().out)["eval_nfe"] == res["eval_nfe"]

    torch_res = runner.run(spec(tmp_path / "torch", "local-error-unbiased+global-stiffness",
                                backend="torchdiffeq"))
    assert layout(res) == layout(torch_res)
    assert set(res["config"]) == set(torch_res["config"])
    torch_hist = json.loads((tmp_path / "torch" / "history.json").read_text())
    assert set(history[0]) == set(torch_hist[0])
    # same initial weights and first batch: the same task loss at iteration 0
    assert history[0]["task_loss"] == pytest.approx(torch_hist[0]["task_loss"], rel=1e-5)


def _interrupt_at(k: int):
    def callback(done: int) -> None:
        if done == k:
            raise KeyboardInterrupt
    return callback


def test_resume_after_interrupt_is_exact(tmp_path):
    """Model, Adam moments and step, batch generator, history restored exactly. (Without a
    regularizer the three runs share one compilation; the regularizer's key depends only on
    seed and iteration.)"""
    iters = 4
    full = runner.run(spec(tmp_path / "full", iters=iters))
    cut = spec(tmp_path / "cut", iters=iters, checkpoint_every=100)
    with pytest.raises(runner.RunInterrupted, match="iteration 2 of 4"):
        runner.run(cut, callback=_interrupt_at(2))
    state, meta = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")  # the safe loader
    assert meta["iteration"] == 2 and state["optimizer"]["step"] == 2
    assert all(isinstance(t, torch.Tensor) for t in state["model"].values())
    resumed = runner.run(cut)
    a, meta_a = checkpoint.load(tmp_path / "full" / "checkpoint.pt")
    b, meta_b = checkpoint.load(tmp_path / "cut" / "checkpoint.pt")
    assert set(a["model"]) == {"func.layers.0.weight", "func.layers.0.bias",
                               "func.layers.1.weight", "func.layers.1.bias", "head.weight",
                               "head.bias"}
    for part in ("exp_avg", "exp_avg_sq"):
        for name, tensor in a["optimizer"][part].items():
            assert torch.equal(tensor, b["optimizer"][part][name]), (part, name)
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    assert a["optimizer"]["step"] == b["optimizer"]["step"] == iters
    assert torch.equal(a["gen"], b["gen"])
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in meta_b["history"]]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"}
                     for h in meta_a["history"]]
    assert resumed["test"]["metric"] == full["test"]["metric"]
    assert resumed["eval_nfe"] == full["eval_nfe"]


def test_checkpoint_of_the_torch_variant_is_refused(tmp_path):
    runner.run(spec(tmp_path, backend="torchdiffeq"))
    with pytest.raises(checkpoint.CheckpointError, match="backend: 'torchdiffeq' there"):
        runner.run(spec(tmp_path))


def test_adam_matches_torch():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    p0, grads = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(3, 3, 4))
    param = torch.nn.Parameter(torch.tensor(p0))
    opt = torch.optim.Adam([param], lr=1e-2)
    p, m, v = jnp.asarray(p0), jnp.zeros((3, 4)), jnp.zeros((3, 4))
    for n, g in enumerate(grads.astype(np.float32), start=1):
        param.grad = torch.tensor(g)
        opt.step()
        p, m, v = jax_node.adam_update(p, jnp.asarray(g), m, v, jnp.asarray(n), 1e-2)
    np.testing.assert_allclose(np.asarray(p), param.detach().numpy(), rtol=0, atol=1e-6)


def test_missing_jax_is_reported_when_the_backend_is_asked_for(monkeypatch):
    stand_in = base._unavailable("digits-node", "diffrax", "pip install 'regnde[jax]'")
    monkeypatch.setitem(base._EXPERIMENTS, "digits-node",
                        {**base._EXPERIMENTS["digits-node"], "diffrax": stand_in})
    monkeypatch.setattr(base, "_load_builtin", lambda: None)
    with pytest.raises(ValueError, match=r"needs JAX, equinox and diffrax: pip install"):
        base.get("digits-node", "diffrax")
    assert base.get("digits-node", None)[1] == "torchdiffeq"


def test_threads_limit_xla_only_before_jax_starts(monkeypatch):
    import jax.numpy as jnp
    from jax._src import xla_bridge

    from regnde.experiments.cli import limit_xla_threads

    jnp.zeros(1).block_until_ready()  # XLA has started: too late to change its threads
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x intra_op_parallelism_threads=4")
    assert limit_xla_threads(1) is False
    monkeypatch.setattr(xla_bridge, "_backends", {})  # as before the first computation
    assert limit_xla_threads(1) is True
    assert os.environ["XLA_FLAGS"].split() == [
        "--xla_dump_to=/tmp/x", "--xla_cpu_multi_thread_eigen=false",
        "intra_op_parallelism_threads=1"]
