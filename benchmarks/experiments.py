"""Regenerate the experiment tables of BENCHMARKS.md from scratch (issue 15), resumably.

For each experiment: the vanilla model for every seed; then, per regularizer, a coefficient
sweep on the first seed (``regnde run --sweep-lam``: the default coefficient times 0.1, 1, 10,
plus up to two candidates where these do not bracket the choice; chosen as the lowest
validation NFE within one point of accuracy / 5% of MSE or NLL of the vanilla run's); then the
other seeds with the chosen coefficient. Runs go ``--jobs`` at a time
(``--threads 1`` each; NFE and metrics are deterministic, so running two at a time changes
only wall times, which the timing pass measures apart on a quiet machine). A run that finished
is skipped (``regnde run`` says so), so the script can be stopped and started again.

Timing (``--timing``) is a second pass, on a quiet machine: seed 0 of every method is
trained again at its chosen coefficient, one run at a time with one thread, into
``benchmarks/results/experiments-timing/``; the report's time columns then come from these
runs (total training time, its ratio to vanilla's, the median prediction time per test batch
with the warm-up left out).

    python benchmarks/experiments.py --experiments mnist1d-node --jobs 2
    python benchmarks/experiments.py --experiments mnist1d-node --timing
    python benchmarks/experiments.py --report-only

Results: ``benchmarks/results/experiments/<experiment>/<regularizer>/seed<k>/``; the tables
and plots: ``benchmarks/results/experiments/report.md`` (+ ``.png``, ``-pareto.png``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent / "results" / "experiments"
TIMING = ROOT.with_name("experiments-timing")

#: Regularizers per experiment, in the order they are run (most informative first).
METHODS = {
    "mnist1d-node": ["local-error-unbiased", "local-error-biased", "global-error",
                     "global-stiffness", "steer", "local-error-reference", "rnode", "taynode-2"],
    # SDEs: no stiffness pair in step doubling, no first stage to hold constant, and no
    # integrated extra state (RNODE, TayNODE) on torchsde
    "mnist1d-nsde": ["local-error-unbiased", "local-error-biased", "global-error", "steer"],
    "digits-node": ["local-error-unbiased", "local-error-biased", "global-error",
                    "global-stiffness", "steer", "rnode", "taynode-2", "local-error-reference"],
    "latent-ode": ["local-error-unbiased", "local-error-biased", "global-error", "taynode-2",
                   "global-stiffness", "local-error-reference", "rnode", "steer"],
    "spiral-sde": ["local-error-unbiased", "local-error-biased", "global-error", "steer"],
    # no TayNODE: the CNF's field takes torch.autograd.grad (its trace), which Taylor mode and
    # nested forward mode cannot differentiate (TaylorModeError at the first iteration)
    "cnf-2d": ["local-error-unbiased", "global-error", "rnode", "local-error-biased",
               "global-stiffness", "local-error-reference", "steer"],
    "toy-cubic": ["local-error-unbiased", "global-error", "taynode-2", "rnode",
                  "local-error-biased", "global-stiffness", "local-error-reference", "steer"],
}


def clear_if_stale(out: Path, extra: list[str]) -> None:
    """Remove a run directory trained at another coefficient than ``--lam`` in ``extra`` (the
    sweep chose another one since): its checkpoint would be refused as another run's."""
    if "--lam" not in extra or not (out / "results.json").exists():
        return
    lam = extra[extra.index("--lam") + 1]
    if json.loads((out / "results.json").read_text()).get("lam") != lam:
        print(f"clearing {out}: trained at another coefficient than {lam}", flush=True)
        shutil.rmtree(out)


def run(experiment: str, reg: str, seed: int, extra: list[str], root: Path = ROOT) -> dict:
    out = root / experiment / reg / f"seed{seed}"
    clear_if_stale(out, extra)
    cmd = [sys.executable, "-m", "regnde", "run", experiment, "--regularizer", reg,
           "--seed", str(seed), "--threads", "1", "--no-progress", "--out", str(out), *extra]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    took = time.time() - start
    if proc.returncode != 0:
        print(f"FAILED ({proc.returncode}) {' '.join(cmd)}\n{proc.stderr[-2000:]}", flush=True)
        return {}
    res = json.loads((out / "results.json").read_text())
    print(f"{took:7.0f} s  {experiment:13s} {reg:24s} seed {seed}  lam {res['lam']:>10s}  "
          f"eval NFE {res['eval_nfe']:6.1f}  test {res['metric']} {res['test']['metric']:.4f}",
          flush=True)
    return res


def experiment_jobs(experiment: str, methods: list[str], seeds: list[int], jobs: int,
                    extra: list[str]) -> None:
    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(lambda s: run(experiment, "none", s, extra), seeds))
        sweeps = list(pool.map(lambda m: (m, run(experiment, m, seeds[0],
                                                 ["--sweep-lam", *extra])), methods))
        rest = [(m, s, res["lam"]) for m, res in sweeps if res for s in seeds[1:]]
        list(pool.map(lambda a: run(experiment, a[0], a[1], ["--lam", a[2], *extra]), rest))


def timing_jobs(experiment: str, methods: list[str]) -> None:
    """Seed 0 of vanilla and of each method at its chosen coefficient, one after another."""
    load = os.getloadavg()[0]
    if load > 0.5:
        print(f"warning: load average {load:.2f} before timing; timings want a quiet machine",
              flush=True)
    for reg in ["none", *methods]:
        path = ROOT / experiment / reg / "seed0" / "results.json"
        if not path.exists():
            print(f"skipped timing of {experiment} {reg}: {path} is missing", flush=True)
            continue
        lam = json.loads(path.read_text())["lam"]
        run(experiment, reg, 0, [] if reg == "none" else ["--lam", lam], root=TIMING)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--experiments", nargs="+", default=list(METHODS))
    p.add_argument("--methods", nargs="+", default=None,
                   help="regularizers to run (default: each experiment's list)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--timing", action="store_true",
                   help="the timing pass (one run at a time; needs the table's runs)")
    args = p.parse_args()
    start = time.time()
    if not args.report_only:
        for experiment in args.experiments:
            methods = args.methods or METHODS[experiment]
            if args.timing:
                timing_jobs(experiment, methods)
            else:
                experiment_jobs(experiment, methods, args.seeds, args.jobs, [])
    print(f"runs took {time.time() - start:.0f} s", flush=True)
    timing = ["--timing", str(TIMING)] if TIMING.exists() else []
    subprocess.run([sys.executable, "-m", "regnde", "report", str(ROOT), "--out",
                    str(ROOT / "report.md"), *timing], check=True)


if __name__ == "__main__":
    main()
