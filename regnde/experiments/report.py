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
from regnde.experiments.runner import HISTORY, RESULTS, RESULTS_FORMAT, candidate_dir

#: Key added to each found result: the directory of its ``results.json`` (and history).
RUN_DIR = "run_dir"


def find_results(dirs: list[str | Path]) -> list[dict[str, Any]]:
    """Every ``results.json`` of a run in or under ``dirs`` (candidate subdirectories of a
    coefficient sweep are part of their parent run and are skipped), each with its directory
    under :data:`RUN_DIR`."""
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
                found[p.resolve()] = {**res, RUN_DIR: str(p.parent)}
    if not found:
        raise ValueError(f"report: no {RESULTS} of a finished run under "
                         f"{', '.join(map(str, dirs))}.")
    return list(found.values())


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    values = [v * scale for v in values]
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def method(r: dict[str, Any]) -> str:
    """A table row's name: the regularizer, with its target where the coefficient was chosen
    online (``local-error-unbiased (budget:40)``), so that two budgets make two rows."""
    budget = _budget(str(r.get("lam", "")))
    return r["regularizer"] if budget is None else f"{r['regularizer']} ({budget})"


def group(results: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, list[dict]]]:
    """``{(experiment, backend): {row name (:func:`method`): [results of each seed]}}``."""
    out: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in results:
        out[(r["experiment"], r["backend"])][method(r)].append(r)
    return out


#: The seed papers' NFE ratios (regularized / vanilla) for the setting an experiment scales
#: down: MNIST NODE and MNIST NSDE (local regularization paper, Pal et al. 2023),
#: PhysioNet latent ODE (same paper). Shown beside ours; ``–`` where a paper has none.
PAPER_NFE_RATIOS: dict[tuple[str, str], str] = {
    ("mnist1d-node", "local-error-unbiased"): "0.619x (MNIST)",
    ("mnist1d-node", "local-error-biased"): "0.602x (MNIST)",
    ("digits-node", "local-error-unbiased"): "0.619x (MNIST)",
    ("digits-node", "local-error-biased"): "0.602x (MNIST)",
    ("mnist1d-nsde", "local-error-unbiased"): "0.729-0.733x (MNIST)",
    ("mnist1d-nsde", "local-error-biased"): "0.729-0.733x (MNIST)",
    ("latent-ode", "local-error-unbiased"): "0.556-0.610x (PhysioNet)",
    ("latent-ode", "local-error-biased"): "0.556-0.610x (PhysioNet)",
}


def _pred_seconds(r: dict[str, Any]) -> float:
    """Prediction seconds per test batch: the median without warm-up where recorded."""
    return float(r["test"].get("seconds_per_batch_median", r["prediction_seconds_per_batch"]))


def _ratio(value: float, base: float | None, invert: bool = False) -> str:
    if not base or not value:
        return "–"
    return f"{(base / value if invert else value / base):.2f}x"


def markdown(results: list[dict[str, Any]], timing: list[dict[str, Any]] | None = None) -> str:
    """The tables as Markdown.

    ``timing``: runs made for timing alone (one seed per regularizer, one run at a time on a
    quiet machine, see ``benchmarks/experiments.py --timing``); where one exists for an
    experiment and regularizer at the table's coefficient and configuration, the time columns
    come from it, else from the table's runs."""
    timed = {(r["experiment"], r["backend"], method(r)): r for r in timing or []}
    lines = []
    for (experiment, backend), by_reg in sorted(group(results).items()):
        first = next(iter(by_reg.values()))[0]
        metric = first["metric"]
        pct = metric == "accuracy"
        unit = " (%)" if pct else ""
        scale = 100.0 if pct else 1.0
        digits = 2 if pct else 4

        def timed_run(reg: str, group: tuple[str, str] = (experiment, backend),
                      by_reg: dict[str, list[dict[str, Any]]] = by_reg) -> dict | None:
            """The timing run of this row, if one was made at the table's coefficient and
            configuration."""
            t = timed.get((*group, reg))
            rs = by_reg[reg]
            same = t is not None and t["lam"] in {r["lam"] for r in rs} and \
                t.get("config") == rs[0].get("config")
            return t if same else None

        def times(reg: str, by_reg: dict[str, list[dict[str, Any]]] = by_reg
                  ) -> tuple[list[float], list[float], bool]:
            t = timed_run(reg)
            rs = [t] if t is not None else by_reg[reg]
            return ([r["training_seconds"] for r in rs], [_pred_seconds(r) for r in rs],
                    t is not None)

        base_nfe = base_train = base_pred = None
        if "none" in by_reg:
            base_nfe = statistics.fmean(r["eval_nfe"] for r in by_reg["none"])
            train0, pred0, _ = times("none")
            base_train, base_pred = statistics.fmean(train0), statistics.fmean(pred0)
        lines += [f"### {experiment} ({backend})", "",
                  f"| Method | Seeds | λ | Train {metric}{unit} | Test {metric}{unit} | NFE | "
                  f"NFE ratio | Paper's NFE ratio | Train time (s) | Train time ratio | "
                  f"Prediction (ms/batch) | Prediction speed-up |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        order = sorted(by_reg, key=lambda k: (k != "none", k))
        sources = set()
        for reg in order:
            rs = by_reg[reg]
            nfe = [r["eval_nfe"] for r in rs]
            lams = sorted({r["lam"] for r in rs})
            train, pred, quiet = times(reg)
            sources.add(quiet)
            lines.append(
                f"| {reg} | {len(rs)} | {', '.join(lams) if reg != 'none' else '–'} | "
                f"{_mean_std([r['train']['metric'] for r in rs], scale, digits)} | "
                f"{_mean_std([r['test']['metric'] for r in rs], scale, digits)} | "
                f"{_mean_std(nfe, 1.0, 1)} | {_ratio(statistics.fmean(nfe), base_nfe)} | "
                f"{PAPER_NFE_RATIOS.get((experiment, reg), '–')} | "
                f"{_mean_std(train, 1.0, 1)}{'' if quiet else '*'} | "
                f"{_ratio(statistics.fmean(train), base_train)} | "
                f"{_mean_std(pred, 1e3, 2)}{'' if quiet else '*'} | "
                f"{_ratio(statistics.fmean(pred), base_pred, invert=True)} |")
        lines.append("")
        shown = {reg: timed_run(reg) or by_reg[reg][0] for reg in order}
        compared = local_vs_global(shown)
        if compared:
            lines += ["Local vs global with direct backprop (training time = iterations x "
                      "evaluations per iteration x time per evaluation; equal NFE compares the "
                      "time per evaluation): " + " ".join(compared), ""]
        if True in sources:
            lines.append("Times without `*`: one seed per method, trained again one run at a "
                         "time with one thread on a quiet machine; prediction is the median "
                         "per test batch, warm-up excluded.")
        if False in sources:
            lines.append("`*`: times of the table's own runs (mean over seeds; runs may have "
                         "shared the machine).")
        lines.append("")
    return "\n".join(lines)


#: Rows :func:`local_vs_global` compares: each local regularizer against each global one.
LOCAL = ("local-error-unbiased", "local-error-biased")
GLOBAL = ("global-error", "global-stiffness")


def training_cost(r: dict[str, Any]) -> tuple[float, float, float] | None:
    """``(training seconds, forward evaluations per iteration (solve and regularizer), ms per
    evaluation)`` from the run's ``history.json``; ``None`` where it has none."""
    if RUN_DIR not in r:
        return None
    run_dir = Path(r[RUN_DIR])  # a sweep keeps the chosen candidate's history beside it
    where = [run_dir / HISTORY] + ([candidate_dir(run_dir, r["lam"]) / HISTORY]
                                   if "lam" in r else [])
    path = next((p for p in where if p.exists()), None)
    if path is None:
        return None
    history = json.loads(path.read_text())
    evals = sum(h["nfe"] + h.get("nfe_reg", 0.0) for h in history)
    seconds = sum(h["seconds"] for h in history)
    if not history or not evals:
        return None
    return seconds, evals / len(history), 1e3 * seconds / evals


#: A factor of the training time counts as a reason only when it is this much larger: quiet
#: timing passes of one run repeat to within a few per cent.
TIMING_NOISE = 1.05


def local_vs_global(runs: dict[str, dict[str, Any]]) -> list[str]:
    """One sentence per local and global row pair of a table: training time split into
    evaluations per iteration and time per evaluation, and which of the two makes the local
    regularizer train slower where it does (the issue's "at equal NFE": the time per
    evaluation; a factor within :data:`TIMING_NOISE` of the other row's is no reason).
    ``runs``: per row, the run whose times the table shows."""
    cost = {reg: training_cost(runs[reg]) for reg in (*LOCAL, *GLOBAL) if reg in runs}
    out = []
    for loc in (r for r in LOCAL if r in cost):
        for glo in (r for r in GLOBAL if r in cost):
            a, b = cost[loc], cost[glo]
            if a is None or b is None:
                continue
            why = [w for w, worse in (
                ("more evaluations per iteration", a[1] > TIMING_NOISE * b[1]),
                ("more time per evaluation", a[2] > TIMING_NOISE * b[2])) if worse]
            noise = f"each factor within {(TIMING_NOISE - 1) * 100:.0f} %"
            verdict = "faster" if a[0] < b[0] else f"slower ({' and '.join(why) or noise})"
            out.append(f"{loc} vs {glo}: {a[0]:.1f} s vs {b[0]:.1f} s of training, "
                       f"{a[1]:.1f} vs {b[1]:.1f} evaluations per iteration at {a[2]:.2f} vs "
                       f"{b[2]:.2f} ms each: local trains {verdict}.")
    return out


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


def sweeps(results: list[dict[str, Any]]
           ) -> dict[tuple[str, str], dict[str, list[tuple[float, float, str, bool]]]]:
    """The coefficient sweeps among ``results``: ``{(experiment, backend): {regularizer:
    [(validation NFE, validation metric, lam, chosen), ...]}}``, vanilla runs as one point
    each (averaged over seeds where a coefficient was trained with several seeds' sweeps)."""
    out: dict[tuple[str, str], dict[str, list[tuple[float, float, str, bool]]]] = \
        defaultdict(lambda: defaultdict(list))
    for (experiment, backend), by_reg in group(results).items():
        for reg, rs in by_reg.items():
            points: dict[str, list[tuple[float, float]]] = defaultdict(list)
            chosen: set[str] = set()
            for r in rs:
                cands = r.get("lam_candidates") or [{"lam": r["lam"], "val": r["val"]}]
                if reg != "none" and len(cands) < 2:
                    continue
                chosen.add(r["lam"])
                for c in cands:
                    points[c["lam"]].append((c["val"]["nfe"], c["val"]["metric"]))
            for lam, ps in points.items():
                out[(experiment, backend)][reg].append(
                    (statistics.fmean(p[0] for p in ps), statistics.fmean(p[1] for p in ps),
                     lam, lam in chosen))
    return out


def pareto_plot(results: list[dict[str, Any]], path: Path) -> bool:
    """Validation NFE against the validation metric, one curve per regularizer over its
    coefficient sweep (``regnde run --sweep-lam``), the chosen coefficient circled and the
    vanilla run as a star; one panel per experiment. ``False`` (nothing written) if no run
    swept a coefficient."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = sorted((k, v) for k, v in sweeps(results).items()
                    if any(reg != "none" for reg in v))
    if not groups:
        return False
    fig = Figure(figsize=(5.5 * len(groups), 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, ((experiment, backend), by_reg) in zip(axes, groups, strict=True):
        metric = next(r["metric"] for r in results if r["experiment"] == experiment)
        for reg, pts in sorted(by_reg.items()):
            pts = sorted(pts)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if reg == "none":
                ax.scatter(xs, ys, marker="*", s=150, color="black", label="none", zorder=3)
                continue
            line = ax.plot(xs, ys, marker="o", label=reg)[0]
            for x, y, lam, chosen in pts:
                ax.annotate(lam, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
                if chosen:
                    ax.scatter([x], [y], s=160, facecolors="none",
                               edgecolors=line.get_color(), zorder=3)
        ax.set_xlabel("validation NFE")
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"{experiment} ({backend}): coefficient sweeps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100),
                            binary=True)
    return True


def _budget(lam: str) -> str | None:
    """``"budget:N"`` / ``"ratio:R"`` when every term's coefficient is chosen online, else None."""
    return lam if all(p.strip().startswith(("budget:", "ratio:")) for p in lam.split("+")) \
        else None


def budget_plot(results: list[dict[str, Any]], path: Path) -> bool:
    """The NFE-budget runs (``regnde run --nfe-budget N`` / ``--nfe-ratio R``): per experiment
    and target one column, the coefficient per iteration (top, log scale) and the training NFE
    with its target (bottom), one line per seed, from each run's ``history.json``. ``False``
    (nothing written) if no run chose its coefficient online."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    columns: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in results:
        lam = _budget(str(r.get("lam", "")))
        if lam is not None and RUN_DIR in r:
            columns[(r["experiment"], r["regularizer"], lam)].append(r)
    if not columns:
        return False
    fig = Figure(figsize=(5 * len(columns), 6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(columns), squeeze=False, sharex="col")
    for col, ((experiment, reg, lam), rs) in enumerate(sorted(columns.items())):
        top, bottom = axes[0][col], axes[1][col]
        for r in sorted(rs, key=lambda r: r["seed"]):
            history = json.loads((Path(r[RUN_DIR]) / HISTORY).read_text())
            it = [h["iteration"] for h in history]
            top.plot(it, [sum(h["lam"]) for h in history], lw=1, label=f"seed {r['seed']}")
            bottom.plot(it, [h["nfe"] for h in history], lw=0.7, alpha=0.8)
        if lam.startswith("budget:"):
            bottom.axhline(float(lam.split("+")[0][7:]), color="k", ls="--", lw=1,
                           label="target")
            bottom.legend(fontsize=8)
        top.set(title=f"{experiment}, {reg}\n{lam}", ylabel="coefficient")
        top.set_yscale("symlog", linthresh=1e-3)
        top.set_ylim(bottom=0)
        bottom.set(xlabel="iteration", ylabel="training NFE")
        top.legend(fontsize=8)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100),
                            binary=True)
    return True


def report(dirs: list[str | Path], out: Path | None = None, plot_path: Path | None = None,
           timing: list[str | Path] | None = None) -> str:
    """Markdown tables for the runs under ``dirs``; written to ``out`` if given, with the plot
    at ``plot_path`` (default: ``out`` with suffix ``.png``) and, where runs swept their
    coefficient, the Pareto plot beside it (``<plot>-pareto.png``), where runs chose their
    coefficient online (NFE budgets), the coefficient and NFE per iteration
    (``<plot>-budget.png``); ``timing``: directories of timing runs (see :func:`markdown`)."""
    results = find_results(dirs)
    text = markdown(results, find_results(timing) if timing else None)
    if out is not None:
        checkpoint.atomic_write(Path(out), lambda fh: fh.write(text))
        plot_path = plot_path or Path(out).with_suffix(".png")
    if plot_path is not None:
        plot(results, Path(plot_path))
        pareto = Path(plot_path).with_name(Path(plot_path).stem + "-pareto.png")
        pareto_plot(results, pareto)
        budget_plot(results, Path(plot_path).with_name(Path(plot_path).stem + "-budget.png"))
    return text
