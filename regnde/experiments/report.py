"""``regnde report``: several run directories as the papers' tables and a comparison plot.

Rows are regularizers, one table per experiment (and backend); cells are mean ± std over the
seeds found. Columns follow the papers (ICML 2021/2023 tables): train and test metric, training
time, prediction time per batch, evaluation NFE, and NFE relative to the unregularized runs of
the same experiment.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from regnde.experiments import checkpoint
from regnde.experiments.runner import RESULTS, RESULTS_FORMAT


def find_results(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Every ``results.json`` of a run in or under ``dirs`` (candidate subdirectories of a
    coefficient sweep are part of their parent run and are skipped)."""
    found: dict[Path, dict[str, Any]] = {}
    for d in dirs:
        root = Path(d)
        if not root.exists():
            raise ValueError(f"report: {root} does not exist.")
        paths = [root] if root.is_file() else sorted(root.rglob(RESULTS))
        for p in paths:
            try:
                res = json.loads(p.read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"report: {p} is not a results file ({exc}).") from None
            if isinstance(res, dict) and res.get("format") == RESULTS_FORMAT \
                    and res.get("kind") == "run":
                found[p.resolve()] = res
    if not found:
        raise ValueError(f"report: no {RESULTS} of a finished run under "
                         f"{', '.join(map(str, dirs))}.")
    return list(found.values())


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def group(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """``{(experiment, backend): {regularizer: [results of each seed]}}``."""
    out: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        out[(r["experiment"], r["backend"])][r["regularizer"]].append(r)
    return out


def markdown(results: list[dict[str, Any]]) -> str:
    """The tables as Markdown."""
    lines = []
    for (experiment, backend), by_reg in sorted(group(results).items()):
        first = next(iter(by_reg.values()))[0]
        metric = first["metric"]
        pct = metric == "accuracy"
        unit = " (%)" if pct else ""
        scale = 100.0 if pct else 1.0
        digits = 2 if pct else 4
        base_nfe = None
        if "none" in by_reg:
            base_nfe = statistics.fmean(r["eval_nfe"] for r in by_reg["none"])
        lines += [f"### {experiment} ({backend})", "",
                  f"| Method | Seeds | λ | Train {metric}{unit} | Test {metric}{unit} | "
                  f"Train time (s) | Prediction time (ms/batch) | NFE | NFE ratio |",
                  "|---|---|---|---|---|---|---|---|---|"]
        order = sorted(by_reg, key=lambda k: (k != "none", k))
        for reg in order:
            rs = by_reg[reg]
            nfe = [r["eval_nfe"] for r in rs]
            ratio = f"{statistics.fmean(nfe) / base_nfe:.2f}x" if base_nfe else "–"
            lams = sorted({r["lam"] for r in rs})
            lines.append(
                f"| {reg} | {len(rs)} | {', '.join(lams) if reg != 'none' else '–'} | "
                f"{_mean_std([r['train']['metric'] for r in rs], scale, digits)} | "
                f"{_mean_std([r['test']['metric'] for r in rs], scale, digits)} | "
                f"{_mean_std([r['training_seconds'] for r in rs], 1.0, 1)} | "
                f"{_mean_std([r['prediction_seconds_per_batch'] for r in rs], 1e3, 2)} | "
                f"{_mean_std(nfe, 1.0, 1)} | {ratio} |")
        lines.append("")
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path) -> None:
    """One column per experiment: test NFE (top) and test metric (bottom) per regularizer,
    bars at the mean with the standard deviation over seeds."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted(group(results).items())
    fig = Figure(figsize=(4.5 * len(groups), 6.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(groups), squeeze=False)
    for col, ((experiment, backend), by_reg) in enumerate(groups):
        regs = sorted(by_reg, key=lambda k: (k != "none", k))
        for row, (key, label) in enumerate((("eval_nfe", "test NFE"), ("metric", None))):
            ax = axes[row][col]
            vals = [[r["eval_nfe"] if key == "eval_nfe" else r["test"]["metric"]
                     for r in by_reg[g]] for g in regs]
            means = [statistics.fmean(v) for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.bar(range(len(regs)), means, yerr=errs, capsize=3)
            ax.set_xticks(range(len(regs)), regs, rotation=30, ha="right", fontsize=8)
            ax.set_ylabel(label or f"test {by_reg[regs[0]][0]['metric']}")
            if row == 0:
                ax.set_title(f"{experiment} ({backend})")
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100),
                            binary=True)


def report(dirs: list[str | Path], out: Path | None = None, plot_path: Path | None = None
           ) -> str:
    """Markdown tables for the runs under ``dirs``; written to ``out`` if given, with the plot
    at ``plot_path`` (default: ``out`` with suffix ``.png``)."""
    results = find_results(dirs)
    text = markdown(results)
    if out is not None:
        checkpoint.atomic_write(Path(out), lambda fh: fh.write(text))
        plot_path = plot_path or Path(out).with_suffix(".png")
    if plot_path is not None:
        plot(results, Path(plot_path))
    return text
