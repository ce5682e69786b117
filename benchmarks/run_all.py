"""The whole performance suite in one command; prints every table and can write BENCHMARKS.md.

    python benchmarks/run_all.py [--quick] [--write BENCHMARKS.md] [--skip NAME ...]

Sections (each a script in this folder, run in its own process, one after the other so they do
not compete for cores):

- adapter and regularizer overhead per backend (`bench_torchdiffeq`, `bench_diffrax`,
  `bench_torchsde`, `bench_torchode`): ratios against the plain backend, interleaved repeats,
  medians;
- regularizer and recording overhead as the batch grows from 1 to 2048 (`bench_batch`);
- memory as the number of steps grows (`bench_memory`);
- TayNODE's training slowdown against the error regularizers (`bench_taylor`,
  `bench_taylor_jax`);
- NFE ratio and prediction speed-up of each regularizer against vanilla on `digits-node` and
  `latent-ode` (the experiment runner, one seed; `regnde report` over several seeds gives mean
  and std).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

SCRIPTS = {
    "torchdiffeq": ["bench_torchdiffeq.py"],
    "diffrax": ["bench_diffrax.py"],
    "torchsde": ["bench_torchsde.py"],
    "torchode": ["bench_torchode.py"],
    "batch": ["bench_batch.py"],
    "memory": ["bench_memory.py"],
    "taylor": ["bench_taylor.py"],
    "taylor-jax": ["bench_taylor_jax.py"],
}
QUICK_ARGS = {"torchdiffeq": ["--repeats", "5"], "diffrax": ["--repeats", "5"],
              "torchsde": ["--repeats", "9"], "torchode": ["--quick"], "batch": ["--quick"],
              "memory": ["--targets", "20,200"],
              "taylor": ["--repeats", "3"], "taylor-jax": ["--repeats", "3"]}
EXPERIMENTS = {
    "digits-node": ["none", "local-error-unbiased", "local-error-biased", "local-error-reference",
                    "global-error", "global-stiffness"],
    "latent-ode": ["none", "local-error-unbiased", "global-error"],
}


def run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t0


def machine() -> str:
    import torch

    return (f"{platform.platform()}, Python {platform.python_version()}, {os.cpu_count()} "
            f"CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer repeats and iterations")
    p.add_argument("--write", metavar="PATH", help="also write the report to PATH")
    p.add_argument("--skip", nargs="*", default=[], help="sections to skip")
    args = p.parse_args()
    env = dict(os.environ, PYTHONPATH=str(HERE.parent), PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    cmdline = "python benchmarks/run_all.py" + (" --quick" if args.quick else "")
    out = [f"# Benchmarks\n\nCommand: `{cmdline}`  \nDate: {datetime.date.today()}  \n"
           f"Machine: {machine()}\n"]
    failed = []
    for name, script in SCRIPTS.items():
        path = HERE / script[0]
        if name in args.skip or not path.exists():
            continue
        extra = QUICK_ARGS.get(name, []) if args.quick else []
        print(f"== {name}: {script[0]} {' '.join(extra)}", flush=True)
        rc, text, seconds = run([sys.executable, str(path), *extra], env)
        print(text, flush=True)
        out.append(f"## {name} (`benchmarks/{script[0]}`, {seconds:.0f} s)\n\n{text.strip()}\n")
        if rc:
            failed.append(name)
    if "experiments" not in args.skip:
        iters = "150" if args.quick else "600"
        with tempfile.TemporaryDirectory() as tmp:
            for exp, regs in EXPERIMENTS.items():
                dirs = []
                for reg in regs:
                    d = Path(tmp) / exp / reg
                    cmd = [sys.executable, "-m", "regnde.experiments.cli", "run", exp,
                           "--regularizer", reg, "--out", str(d), "--no-progress", "--threads",
                           "1"] + (["--iters", iters] if exp == "digits-node" else [])
                    if args.quick and exp != "digits-node":
                        cmd += ["--iters", "60"]
                    print(f"== {exp} {reg}", flush=True)
                    rc, text, _ = run(cmd, env)
                    if rc:
                        print(text, flush=True)
                        failed.append(f"{exp}/{reg}")
                    else:
                        dirs.append(str(d))
                rc, text, _ = run([sys.executable, "-m", "regnde.experiments.cli", "report",
                                   *dirs], env)
                print(text, flush=True)
                out.append(f"## {exp}: NFE and prediction time against vanilla (1 seed)\n\n"
                           f"{text.strip()}\n")
    report = "\n".join(out)
    if args.write:
        Path(args.write).write_text(report)
        print(f"wrote {args.write}")
    if failed:
        print(f"FAILED sections: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
