"""``regnde demo``: the ``digits-node`` experiment, vanilla beside the papers' regularizers.

A preset of the experiment runner (one implementation): each variant is
``regnde run digits-node --regularizer R --lam 0.3 --iters N --seed S`` from the same initial
weights on the same batches, evaluated on the held-out test split; the coefficient is fixed in
advance (never tuned on the test split). scikit-learn's handwritten digits ship with
scikit-learn, so the demo needs no download. dopri5 at tolerance 1e-7 (at 1e-5 the untrained
model already sits at the NFE floor, so no regularizer could show anything).
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from regnde.experiments.runner import RunSpec, run

#: (label, regularizer spec): the papers' variants side by side; the first is the baseline.
VARIANTS: tuple[tuple[str, str], ...] = (
    ("vanilla", "none"),
    ("global-error", "global-error"),
    ("local-error (unbiased)", "local-error-unbiased"),
    ("local-error (biased)", "local-error-biased"),
    ("local-error (reference)", "local-error-reference"),
)
LAM = "0.3"


@dataclass
class Config:
    """``iters`` per variant; ``tol``: rtol = atol of dopri5; ``out``: where the runs go
    (default: a temporary directory, removed afterwards)."""

    iters: int = 600
    tol: float = 1e-7
    seed: int = 0
    out: Path | None = None


def run_all(cfg: Config, progress: bool = True, out: Path | None = None
            ) -> list[dict[str, Any]]:
    """Train and evaluate every variant; returns their ``results.json`` contents (with
    ``label`` and ``nfe_history`` added), vanilla first."""
    base = out or cfg.out
    assert base is not None
    results = []
    for label, spec in VARIANTS:
        where = Path(base) / spec
        res = run(RunSpec("digits-node", regularizer=spec, seed=cfg.seed, out=where,
                          iters=cfg.iters, lam=None if spec == "none" else LAM,
                          overrides={"rtol": str(cfg.tol), "atol": str(cfg.tol)},
                          progress=progress, force=True))
        history = json.loads((where / "history.json").read_text())
        res.update(label=label, nfe_history=[h["nfe"] for h in history])
        results.append(res)
        print(f"  {label:24s} eval NFE {res['eval_nfe']:5.1f}  "
              f"test accuracy {100 * res['test']['metric']:.1f} %", flush=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    """A Markdown table of the results, ratios against the first (vanilla) row."""
    base = results[0]
    lines = [
        "| regularizer | lambda | test loss | accuracy | eval NFE | NFE ratio | train s | "
        "predict ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        predict = r["prediction_seconds_per_batch"]
        lines.append(
            f"| {r['label']} | {r['lam']} | {r['test']['loss']:.4f} | "
            f"{r['test']['metric']:.3f} | {r['eval_nfe']:.0f} | "
            f"{r['eval_nfe'] / base['eval_nfe']:.2f}x | {r['training_seconds']:.1f} | "
            f"{1e3 * predict:.1f} | {base['prediction_seconds_per_batch'] / predict:.2f}x |"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        ax.plot(r["nfe_history"], label=r["label"], lw=1)
    ax.set(xlabel="iteration", ylabel="NFE (forward solve)", title="NFE over training")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def demo(cfg: Config, json_path: str | None = None, plot_path: str | None = None,
         progress: bool = True) -> list[dict[str, Any]]:
    """Run every variant, print the comparison table, write JSON and plot if asked."""
    import torch

    torch.set_num_threads(1)
    if cfg.out is not None:
        results = run_all(cfg, progress)
    else:
        with tempfile.TemporaryDirectory(prefix="regnde-demo-") as tmp:
            results = run_all(cfg, progress, Path(tmp))
    print()
    print(table(results))
    if json_path:
        with open(json_path, "w") as fh:
            json.dump({"config": {"iters": cfg.iters, "tol": cfg.tol, "seed": cfg.seed},
                       "results": results}, fh, indent=1, default=str)
        print(f"wrote {json_path}")
    if plot_path:
        plot(results, plot_path)
        print(f"wrote {plot_path}")
    return results
