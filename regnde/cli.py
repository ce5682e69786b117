"""The ``regnde`` command line: ``demo``, ``plugins``, and (with the experiment runner's
dependencies installed) ``run`` and ``report``.

Every subcommand sets ``handler``; :func:`main` runs it and turns the errors a user can fix
into one line on stderr and exit status 2 (an interrupted run: 130), never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
from collections.abc import Sequence
from pathlib import Path

# What ``regnde demo`` needs, and the install line that brings it (the demo's own requirement,
# declared by the experiments package, which imports nothing itself).
from regnde.experiments import DEMO_INSTALL as DEMO_INSTALL
from regnde.experiments import DEMO_NEEDS as DEMO_NEEDS

DESCRIPTION = (
    "regnde: regularizers that make neural differential equations cheap to solve, on any "
    "solver suite."
)
EXPERIMENTS_MISSING = (
    "run and report (the experiment runner) need its dependencies: "
    'pip install "regnde[experiments]" (or "regnde[all]").'
)
#: What the experiment runner needs beyond the core (the ``experiments`` extra).
EXPERIMENT_MODULES = ("tqdm", "matplotlib", "sklearn")


class UsageError(ValueError):
    """A command-line value out of range: printed as one line, exit status 2."""


def _plugins(args: argparse.Namespace) -> int:
    import regnde
    from regnde.plugins.manager import registry

    reg = registry()
    print("backends:")
    for name in reg.names("backend"):
        entry = reg.entry("backend", name)
        try:
            methods = ", ".join(regnde.methods(name))
        except Exception as exc:  # a broken backend is reported, not fatal
            methods = f"unavailable: {type(exc).__name__}: {exc}"
        print(f"  {name:12s} (plugin {entry.plugin})  methods: {methods}")
    for kind, title in (("method", "tableaus"), ("sampler", "samplers"),
                        ("regularizer", "regularizers")):
        print(f"{title}:")
        for name in reg.names(kind):
            print(f"  {name:20s} (plugin {reg.entry(kind, name).plugin})")
    if reg.failures:
        print("plugins that failed to load:")
        for name, why in sorted(reg.failures.items()):
            print(f"  {name}: {why}")
    return 0


def _missing(modules: Sequence[str]) -> list[str]:
    """The modules of ``modules`` that cannot be imported (the demo imports them anyway)."""
    import importlib

    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def _demo(args: argparse.Namespace) -> int:
    if args.iters < 1:
        raise UsageError(f"--iters must be >= 1, got {args.iters}.")
    if not (math.isfinite(args.tol) and 0 < args.tol < 1):
        raise UsageError(f"--tol must be a number in (0, 1) (rtol = atol of dopri5), got "
                         f"{args.tol}; the demo's default is 1e-7.")
    missing = _missing(DEMO_NEEDS)
    if missing:
        raise UsageError(f"regnde demo trains a torch model and needs {', '.join(missing)}, "
                         f"which this install lacks: {DEMO_INSTALL}.")
    from regnde.experiments.demo import Config, demo

    cfg = Config(iters=args.iters, tol=args.tol, seed=args.seed, out=args.out)
    demo(cfg, json_path=args.json, plot_path=args.plot, progress=not args.no_progress)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regnde", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    d = sub.add_parser("demo", help="train a small neural ODE with and without regularization "
                                    "and compare NFE, loss and time (the digits-node "
                                    "experiment)")
    d.add_argument("--iters", type=int, default=600, help="training iterations per variant")
    d.add_argument("--tol", type=float, default=1e-7, help="rtol = atol of dopri5")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="PATH", help="write the results as JSON")
    d.add_argument("--plot", metavar="PATH", help="write a plot of NFE over training")
    d.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="keep the runs (regnde run directories) here; default: a temporary "
                        "directory")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(handler=_demo)
    pl = sub.add_parser("plugins", help="list backends, methods, samplers, regularizers")
    pl.set_defaults(handler=_plugins)
    try:
        from regnde.experiments.cli import add_parsers
    except ImportError as exc:
        p.epilog = EXPERIMENTS_MISSING
        for name in ("run", "report"):  # present, and saying what to install
            stub = sub.add_parser(name, help=f"unavailable here ({exc.name} is not installed)")
            stub.add_argument("args", nargs=argparse.REMAINDER)
            stub.set_defaults(handler=functools.partial(_unavailable, str(exc.name)))
    else:
        add_parsers(sub)
    return p


def _unavailable(missing: str, args: argparse.Namespace) -> int:
    raise UsageError(f"the experiment runner needs {missing}, which this install lacks: "
                     f'pip install "regnde[torch,experiments]".')


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; returns the exit status."""
    args = parser().parse_args(argv)
    try:
        from regnde.experiments.cli import USER_ERRORS
        from regnde.experiments.runner import RunInterrupted
    except ImportError:  # the experiment runner is not installed
        RunInterrupted, USER_ERRORS = KeyboardInterrupt, ()  # type: ignore[misc,assignment]
    handled: tuple[type[BaseException], ...] = (UsageError, *USER_ERRORS)
    try:
        return int(args.handler(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0
    except RunInterrupted as exc:
        print(f"regnde: {exc}", file=sys.stderr)
        return 130
    except handled as exc:
        print(f"regnde {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name not in EXPERIMENT_MODULES:
            raise
        print(f"regnde {args.command}: error: it needs {exc.name}, which this install lacks: "
              f'pip install "regnde[experiments]".', file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
