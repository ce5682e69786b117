"""The ``regnde`` command line: ``regnde demo``, ``regnde plugins``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


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


def _demo(args: argparse.Namespace) -> int:
    from regnde.demo import Config, run

    cfg = Config(iters=args.iters, tol=args.tol, seed=args.seed)
    run(cfg, json_path=args.json, plot_path=args.plot, progress=not args.no_progress)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="regnde", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="train a small neural ODE with and without regularization")
    d.add_argument("--iters", type=int, default=600, help="training iterations per variant")
    d.add_argument("--tol", type=float, default=1e-7, help="rtol = atol of dopri5")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--json", metavar="PATH", help="write the results as JSON")
    d.add_argument("--plot", metavar="PATH", help="write a plot of NFE over training")
    d.add_argument("--no-progress", action="store_true", help="hide progress bars")
    d.set_defaults(run=_demo)
    pl = sub.add_parser("plugins", help="list backends, methods, samplers, regularizers")
    pl.set_defaults(run=_plugins)
    try:
        from regnde.experiments.cli import add_parsers
    except ImportError:
        pass
    else:
        add_parsers(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if getattr(args, "iters", 1) is not None and getattr(args, "iters", 1) < 1:
        print("regnde: --iters must be >= 1", file=sys.stderr)
        return 2
    try:
        return int(args.run(args) or 0)
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
