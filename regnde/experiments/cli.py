"""The ``run`` and ``report`` subcommands of the ``regnde`` console script.

``add_parsers(subparsers)`` adds both to an ``argparse`` subparsers object; ``main(argv)`` runs
them standalone (``python -m regnde.experiments.cli run digits-node ...``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from regnde.experiments import base, specs
from regnde.experiments.checkpoint import CheckpointError
from regnde.experiments.data import DataError

#: Errors whose message tells the user what to fix: one line on stderr, exit status 2.
USER_ERRORS: tuple[type[Exception], ...] = (ValueError, CheckpointError, DataError)

RUN_EPILOG = """\
regularizers: {regs}; sums with '+' (local-error-unbiased+global-stiffness).
coefficients (--lam): X constant, X:Y exponential from X to Y over the run, cos:X:Y cosine;
  one per term joined by '+' or one for all; a comma-separated list is a sweep chosen on the
  validation split (lowest validation NFE among candidates with near-best validation metric).
  budget:N / ratio:R (or --nfe-budget N / --nfe-ratio R) choose it online so that training
  settles at N evaluations, or R times the starting NFE (docs/budget.md).
Interrupt with Ctrl-C: the run stops after the current iteration and saves a checkpoint;
running the same command again resumes exactly where it stopped.
"""


def add_parsers(subparsers: Any) -> None:
    """Add ``run`` and ``report`` to ``subparsers`` (from ``parser.add_subparsers()``)."""
    p = subparsers.add_parser(
        "run", help="train and evaluate one experiment (resumable)",
        description="Train and evaluate one experiment with one regularizer; writes "
                    "results.json, history.json, training.png and checkpoint.pt to --out.",
        epilog=RUN_EPILOG.format(regs=", ".join(specs.regularizer_names())),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment", help=f"one of: {', '.join(base.experiment_names())}")
    p.add_argument("--regularizer", default="none", metavar="NAME",
                   help="regularizer spec (default: none)")
    p.add_argument("--backend", default=None, metavar="NAME",
                   help="backend (default: the experiment's first, e.g. torchdiffeq)")
    p.add_argument("--full", action="store_true", help="the papers' sizes instead of CPU-size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="run directory (default: runs/<experiment>/<regularizer>/seed<seed>)")
    p.add_argument("--iters", type=int, default=None, metavar="N", help="training iterations")
    p.add_argument("--data", default=None, metavar="PATH",
                   help="real data instead of the built-in data (see docs/experiments.md)")
    p.add_argument("--lam", default=None, metavar="X",
                   help="regularization coefficient(s); default: the papers' schedule")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--nfe-budget", type=float, default=None, metavar="N",
                        help="choose the coefficient online so that training settles at N "
                             "function evaluations per solve (same as --lam budget:N)")
    budget.add_argument("--nfe-ratio", type=float, default=None, metavar="R",
                        help="likewise at R times the NFE of the first iterations "
                             "(--lam ratio:R)")
    p.add_argument("--sweep-lam", action="store_true", dest="sweep",
                   help="train the coefficient (--lam, or the experiment's default) times 0.1, "
                        "1 and 10 (and up to two more where these do not bracket the edge of "
                        "the tolerance: x10 past the strongest within it, or between that one "
                        "and the next stronger) "
                        "and keep the one with the lowest validation NFE within 1 point of "
                        "accuracy (5%% of MSE/NLL) of the vanilla run's")
    p.add_argument("--baseline", type=Path, default=None, metavar="DIR",
                   help="the vanilla run the sweep compares with (default: "
                        "../../none/seed<seed> beside --out)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="override a configuration field (repeatable), e.g. --set hidden=16")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads for torch, and for XLA on the JAX variants (default: "
                        "the framework's choice; 1 gives steadier timings on a shared machine)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--force", action="store_true",
                   help="evaluate (and finish training) again even if --out holds the "
                        "results of this run; without it a finished run is left unchanged")
    p.set_defaults(handler=_run)

    r = subparsers.add_parser(
        "report", help="tables (mean ± std over seeds) and a plot from run directories",
        description="Collect results.json of runs in or under DIR... into Markdown tables "
                    "(one per experiment, a row per regularizer) and a comparison plot.")
    r.add_argument("dirs", nargs="+", metavar="DIR")
    r.add_argument("--out", type=Path, default=None, metavar="FILE",
                   help="write the Markdown here (and the plot next to it as .png)")
    r.add_argument("--plot", type=Path, default=None, metavar="FILE",
                   help="where to write the plot (default: --out with suffix .png)")
    r.add_argument("--timing", nargs="+", default=None, metavar="DIR",
                   help="runs made for timing alone (one at a time, quiet machine): the time "
                        "columns come from them")
    r.set_defaults(handler=_report)


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}.")
        out[key.strip()] = value.strip()
    return out


def _run(args: argparse.Namespace) -> int:
    from regnde.experiments.runner import RunSpec, run

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(args.threads, 1))
        limit_xla_threads(max(args.threads, 1))
    lam = args.lam
    for flag, value, form in (("--nfe-budget", args.nfe_budget, "budget"),
                              ("--nfe-ratio", args.nfe_ratio, "ratio")):
        if value is not None:
            if lam is not None:
                raise ValueError(f"{flag} chooses the coefficient; drop --lam {lam!r}.")
            if args.regularizer == "none":
                raise ValueError(f"{flag} needs a regularizer (--regularizer NAME) whose "
                                 f"coefficient it can choose.")
            lam = f"{form}:{value:g}"
    spec = RunSpec(experiment=args.experiment, regularizer=args.regularizer,
                   backend=args.backend, full=args.full, seed=args.seed, out=args.out,
                   iters=args.iters, data=args.data, lam=lam,
                   overrides=_overrides(args.overrides), checkpoint_every=args.checkpoint_every,
                   progress=not args.no_progress, force=args.force, sweep=args.sweep,
                   baseline=args.baseline)
    res = run(spec)
    if res.get("complete"):
        where = spec.out or "its run directory"
        print(f"regnde run: {where} already holds this run's results (written "
              f"{res.get('created', '?')}); left unchanged. Pass --force to evaluate again.",
              file=sys.stderr)
    summary = {k: res[k] for k in ("experiment", "regularizer", "seed", "lam", "eval_nfe",
                                   "training_seconds", "prediction_seconds_per_batch")}
    summary[f"test_{res['metric']}"] = res["test"]["metric"]
    print(json.dumps(summary, indent=2))
    return 0


def limit_xla_threads(n: int) -> bool:
    """Ask XLA's CPU backend for ``n`` threads per operation (``XLA_FLAGS``; Eigen's thread pool
    off for ``n == 1``). Works only before JAX runs its first computation in this process;
    returns whether it could still take effect."""
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if getattr(xla_bridge, "_backends", None):
            return False
    flags = os.environ.get("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith(("--xla_cpu_multi_thread_eigen",
                                                    "intra_op_parallelism_threads"))]
    if n == 1:
        flags.append("--xla_cpu_multi_thread_eigen=false")
    flags.append(f"intra_op_parallelism_threads={n}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    return True


def _report(args: argparse.Namespace) -> int:
    from regnde.experiments.report import report

    text = report(args.dirs, out=args.out, plot_path=args.plot, timing=args.timing)
    if args.out is None:
        print(text)
    else:
        print(f"wrote {args.out} and {args.plot or args.out.with_suffix('.png')}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``run``/``report`` from ``argv`` as the ``regnde`` command does (user errors print
    one line and return 2, an interrupted run returns 130)."""
    from regnde.cli import main as regnde_main

    return regnde_main(argv)


if __name__ == "__main__":
    sys.exit(main())
