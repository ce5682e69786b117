"""Plot the coefficient and the NFE per iteration of the NFE-budget runs (issue 16).

    python benchmarks/plot_budget.py [DIR] [--out FILE]

DIR (default benchmarks/results/budget/digits-node) holds ``budget<N>/seed<S>/history.json``
from ``benchmarks/budget.sh``; the plot shows lambda (top) and the training NFE with its
target (bottom), one line per seed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dir", nargs="?", type=Path,
                   default=Path("benchmarks/results/budget/digits-node"))
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/budget/lambda.png"))
    args = p.parse_args()
    budgets = sorted(args.dir.glob("budget*"), key=lambda d: float(d.name[6:]))
    fig, axes = plt.subplots(2, len(budgets), figsize=(5 * len(budgets), 6), squeeze=False)
    for col, bdir in enumerate(budgets):
        target = float(bdir.name[6:])
        for hist in sorted(bdir.glob("seed*/history.json")):
            h = json.loads(hist.read_text())
            it = [r["iteration"] for r in h]
            axes[0][col].plot(it, [r["lam"][0] for r in h], label=hist.parent.name, lw=1)
            axes[1][col].plot(it, [r["nfe"] for r in h], lw=0.7, alpha=0.8)
        axes[1][col].axhline(target, color="k", ls="--", lw=1, label="target")
        axes[0][col].set(title=f"budget {target:g} NFE", ylabel="lambda")
        axes[1][col].set(xlabel="iteration", ylabel="training NFE")
        axes[0][col].legend(fontsize=8)
        axes[1][col].legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
