"""The experiment runner: training with a progress bar, checkpoints, resume, results, plots.

Layout of a run directory (``--out``, default ``runs/<experiment>/<regularizer>/seed<seed>``):

- ``checkpoint.pt``: model, optimizer, random generators, iteration, history and training time
  (see :mod:`regnde.experiments.checkpoint`); written every ``checkpoint_every`` iterations,
  when interrupted (Ctrl-C), and at the end. Running the same command again resumes from it.
- ``results.json``: metrics on train/val/test, evaluation NFE, training time, prediction time
  per batch, configuration, seed and library versions (written atomically at the end).
- ``history.json`` and ``training.png``: per-iteration loss, regularizer, coefficients and NFE.

With several coefficient candidates (``--lam 1,3,10``, or ``--sweep-lam``: the default
coefficient times 0.1, 1 and 10) every candidate trains in its own subdirectory ``lam=<value>``;
the one with the lowest validation NFE among those whose validation metric is within the
experiment's tolerance of the vanilla run's (one point of accuracy, 5% of an MSE or NLL) is
chosen, and only it is evaluated on the test split (:func:`select`). ``--sweep-lam`` adds up to
two candidates where its three do not bracket the choice (:func:`regnde.experiments.specs.
next_factor`): ten times the strongest one within the tolerance while it still lowers NFE,
else the geometric mean of that one and the next stronger one, outside the tolerance. The
vanilla run is read from ``--baseline DIR``, by default ``../../none/seed<seed>`` beside the
run directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import platform
import re
import signal
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm.auto import tqdm

from regnde.experiments import base, checkpoint, specs
from regnde.experiments.checkpoint import CHECKPOINT, CheckpointError

RESULTS = "results.json"
HISTORY = "history.json"
PLOT = "training.png"
RESULTS_FORMAT = "regnde-experiment-results/1"


class RunInterrupted(KeyboardInterrupt):
    """Training stopped on request; the message says where and how to resume."""


@dataclasses.dataclass
class RunSpec:
    """Everything ``regnde run`` takes (see ``regnde run --help``)."""

    experiment: str
    regularizer: str = "none"
    backend: str | None = None
    full: bool = False
    seed: int = 0
    out: Path | None = None
    iters: int | None = None
    data: str | None = None
    lam: str | None = None
    overrides: dict[str, str] = dataclasses.field(default_factory=dict)
    checkpoint_every: int = 50
    progress: bool = True
    force: bool = False
    sweep: bool = False
    baseline: Path | None = None


Callback = Callable[[int], None]


def default_out(spec: RunSpec) -> Path:
    """``runs/<experiment>/<regularizer>/seed<seed>``."""
    return Path("runs") / spec.experiment / spec.regularizer / f"seed{spec.seed}"


def run(spec: RunSpec, callback: Callback | None = None) -> dict[str, Any]:
    """Train (or resume) and evaluate one experiment; returns the results written to
    ``results.json``.

    Args:
        spec: what to run.
        callback: called with the number of finished iterations after each one (and after the
            checkpoint of that iteration, if any); raising ``KeyboardInterrupt`` from it
            interrupts the run like Ctrl-C does.

    Raises:
        ValueError: unknown experiment, backend, regularizer or setting; bad data path.
        CheckpointError: the run directory holds a corrupted checkpoint or one of another run.
        RunInterrupted: interrupted; the checkpoint holds every finished iteration.
    """
    cls, backend = base.get(spec.experiment, spec.backend)
    specs.parse_regularizer(spec.regularizer)  # unknown names fail before any work
    config = base.make_config(cls, spec.full, spec.iters, spec.overrides)
    lam_text = spec.lam if spec.lam is not None else specs.default_lam(spec.regularizer,
                                                                      cls.lam_defaults)
    base_lam = lam_text
    if spec.sweep:
        lam_text = specs.sweep_lam(spec.regularizer, lam_text)
    candidates = [c.strip() for c in lam_text.split(",") if c.strip()]
    if spec.regularizer == "none":
        candidates = ["0"]
    if not candidates:
        raise ValueError(f"--lam {spec.lam!r} names no coefficient.")
    for c in candidates:  # validate every candidate before training any
        specs.ScheduledRegularizer(spec.regularizer, c, config.iters)
    out = Path(spec.out) if spec.out is not None else default_out(spec)
    done = finished(out, spec, backend, config, candidates)
    if done is not None and not spec.force:
        return done
    out.mkdir(parents=True, exist_ok=True)

    trained: list[dict[str, Any]] = []

    def candidate(lam: str) -> None:
        where = out if len(candidates) == 1 else candidate_dir(out, lam)
        exp, history, seconds = train(cls, config, backend, spec, lam, where, callback)
        trained.append({"lam": lam, "dir": str(where), "val": exp.evaluate("val"),
                        "training_seconds": seconds, "exp": exp, "history": history})

    for lam in candidates:
        candidate(lam)
    reference = baseline_metric(spec, out) if len(trained) > 1 else None
    ref_metric = None if reference is None else reference["metric"]
    if spec.sweep and specs.refinable(spec.regularizer):
        factors = dict(zip(candidates, specs.SWEEP_FACTORS, strict=True))
        while len(trained) < len(candidates) + specs.SWEEP_EXTRA:
            ok = tolerated(trained, cls, ref_metric)
            points = [(factors[t["lam"]], good, t["val"]["nfe"])
                      for t, good in zip(trained, ok, strict=True)]
            factor = specs.next_factor(points)
            if factor is None:
                break
            lam = specs.scale_lam(base_lam, factor)
            factors[lam] = factor
            candidate(lam)
    chosen = select(trained, cls, ref_metric)
    exp = chosen["exp"]
    results = {
        "format": RESULTS_FORMAT,
        "kind": "run",
        "experiment": spec.experiment,
        "regularizer": spec.regularizer,
        "backend": backend,
        "seed": spec.seed,
        "full": spec.full,
        "data": spec.data or "builtin",
        "lam": chosen["lam"],
        "selection": selection_note(cls, reference, len(trained)),
        "sweep": specs.SWEEP_RULE if spec.sweep else None,
        "lam_candidates": [{"lam": t["lam"], "dir": t["dir"], "val": t["val"],
                            "training_seconds": t["training_seconds"]} for t in trained],
        "metric": cls.metric,
        "higher_is_better": cls.higher_is_better,
        "iterations": config.iters,
        "config": dataclasses.asdict(config),
        "train": exp.evaluate("train"),
        "val": chosen["val"],
        "test": exp.evaluate("test"),
        "training_seconds": chosen["training_seconds"],
        "train_nfe_final": _tail_mean(chosen["history"], "nfe"),
        "train_seconds_per_iter_median": _median_seconds(chosen["history"]),
        "train_warmup_seconds": (chosen["history"][0]["seconds"] if chosen["history"]
                                 else None),
        "versions": exp.versions(),
        "platform": platform.platform(),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    results["eval_nfe"] = results["test"]["nfe"]
    results["prediction_seconds_per_batch"] = results["test"]["seconds_per_batch"]
    checkpoint.write_json(out / RESULTS, results)
    return results


def finished(out: Path, spec: RunSpec, backend: str, config: base.Config,
             candidates: list[str]) -> dict[str, Any] | None:
    """The results of the same run (experiment, backend, regularizer, coefficients, seed,
    data, size, every setting of the configuration) if ``out`` holds them
    (``results["complete"]`` is then True), else ``None`` (then training resumes or starts,
    and a checkpoint of another run is refused)."""
    path = out / RESULTS
    if not path.exists():
        return None
    stored = json.loads(path.read_text())
    want = {"experiment": spec.experiment, "backend": backend, "regularizer": spec.regularizer,
            "seed": spec.seed, "full": spec.full, "data": spec.data or "builtin",
            "iterations": config.iters,
            "config": json.loads(json.dumps(dataclasses.asdict(config)))}  # as stored
    same = {k: stored.get(k) for k in want}
    lams = [c["lam"] for c in stored.get("lam_candidates", [])]
    if spec.sweep:  # the sweep's own candidates follow from the first ones by its rule
        same_lams = lams[:len(candidates)] == candidates and \
            stored.get("sweep") == specs.SWEEP_RULE
    else:
        same_lams = lams == candidates
    if same != want or not same_lams:  # another run: its checkpoint says so when loaded
        return None
    return {**stored, "complete": True}


def select(trained: list[dict[str, Any]], cls: type[base.Experiment],
           reference: float | None = None) -> dict[str, Any]:
    """The candidate with the lowest validation NFE among those whose validation metric is no
    worse than ``reference`` (the vanilla run's validation metric; ``None``: the best
    candidate's) by more than the experiment's tolerance (:attr:`base.Experiment.
    select_tolerance`, relative with ``select_relative``); of several at that NFE, the weakest
    coefficient (a stronger one buys no NFE and only biases the model further; their validation
    metrics differ by the split's noise). If none qualifies, the one with the best validation
    metric. Never looks at the test split."""
    sign = 1.0 if cls.higher_is_better else -1.0
    ok = [t for t, good in zip(trained, tolerated(trained, cls, reference), strict=True)
          if good]
    if not ok:
        return max(trained, key=lambda t: (sign * t["val"]["metric"], -t["val"]["nfe"]))
    return min(ok, key=lambda t: (t["val"]["nfe"], strength(t["lam"]),
                                  -sign * t["val"]["metric"]))


def strength(lam: str) -> tuple[float, ...]:
    """The coefficients in a ``--lam`` candidate, in order (``"cos:1:2+0.01"`` -> ``(1, 2,
    0.01)``): candidates of one sweep are scaled alike, so this orders them by strength."""
    return tuple(float(x) for x in re.findall(r"[-+]?\d*\.?\d+(?:[eE][-+]?\d+)?", lam))


def tolerated(trained: list[dict[str, Any]], cls: type[base.Experiment],
              reference: float | None = None) -> list[bool]:
    """Per candidate, whether its validation metric is within the experiment's tolerance of
    ``reference`` (``None``: of the best candidate's); see :func:`select`."""
    sign = 1.0 if cls.higher_is_better else -1.0
    ref = max(sign * t["val"]["metric"] for t in trained) if reference is None \
        else sign * reference
    slack = cls.select_tolerance * (abs(ref) if cls.select_relative else 1.0)
    return [sign * t["val"]["metric"] >= ref - slack for t in trained]


def baseline_metric(spec: RunSpec, out: Path) -> dict[str, Any] | None:
    """The vanilla run's validation metric and where it came from: ``spec.baseline`` or the
    run directory's sibling ``../../none/seed<seed>``; ``None`` if there is no finished vanilla
    run of the same experiment, backend and seed there."""
    where = spec.baseline if spec.baseline is not None else \
        out.parent.parent / "none" / f"seed{spec.seed}"
    path = Path(where) / RESULTS
    if not path.exists():
        if spec.baseline is not None:
            raise ValueError(f"--baseline {where}: no {RESULTS} there; run the vanilla model "
                             f"first (regnde run {spec.experiment} --seed {spec.seed} --out "
                             f"{where}).")
        return None
    stored = json.loads(path.read_text())
    if stored.get("regularizer") != "none" or stored.get("experiment") != spec.experiment:
        raise ValueError(f"--baseline {where} holds a {stored.get('experiment')} run with "
                         f"regularizer {stored.get('regularizer')!r}; it must be a vanilla "
                         f"(regularizer none) run of {spec.experiment}.")
    return {"metric": stored["val"]["metric"], "dir": str(where)}


def selection_note(cls: type[base.Experiment], reference: dict[str, Any] | None,
                   n: int) -> dict[str, Any]:
    """How the coefficient was chosen, for ``results.json``."""
    if n == 1:
        return {"rule": "single candidate"}
    tol = (f"{cls.select_tolerance:.0%} of" if cls.select_relative
           else f"{cls.select_tolerance:g} of")
    against = "the vanilla run's" if reference is not None else "the best candidate's (no " \
        "vanilla run found)"
    return {"rule": f"lowest validation NFE within {tol} {against} validation {cls.metric}; "
                    f"of equal NFE the weakest coefficient",
            "reference": reference}


def identity(cls: type[base.Experiment], config: base.Config, backend: str, spec: RunSpec,
             lam: str) -> dict[str, Any]:
    """What makes two runs the same run (a checkpoint must match it to be resumed)."""
    return {"experiment": cls.name, "backend": backend, "regularizer": spec.regularizer,
            "lam": lam, "seed": spec.seed,
            "data": None if spec.data is None else str(Path(spec.data).resolve()),
            "config": dataclasses.asdict(config)}


def train(cls: type[base.Experiment], config: base.Config, backend: str, spec: RunSpec,
          lam: str, where: Path, callback: Callback | None = None
          ) -> tuple[base.Experiment, list[dict[str, Any]], float]:
    """Train one coefficient candidate in ``where``, resuming from its checkpoint.

    Returns the trained experiment, the per-iteration history and the training time in
    seconds (summed over resumed sessions; checkpoints and evaluation excluded).
    """
    where.mkdir(parents=True, exist_ok=True)
    ident = identity(cls, config, backend, spec, lam)
    exp = cls(config, backend, spec.seed, spec.data)
    ckpt = where / CHECKPOINT
    saved = None
    if ckpt.exists():
        saved = checkpoint.load(ckpt)
        check_identity(ckpt, saved[1].get("identity"), ident)
    exp.setup()
    history: list[dict[str, Any]] = []
    start, seconds = 0, 0.0
    if saved is not None:
        state, meta = saved
        try:
            exp.load_state(state)
            history, start, seconds = meta["history"], int(meta["iteration"]), \
                float(meta["training_seconds"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"checkpoint {ckpt} does not match this run ({exc}); "
                                  f"delete it to start over.") from None
    schedule = specs.ScheduledRegularizer(spec.regularizer, lam, config.iters)
    if saved is not None and "schedules" in saved[1]:
        schedule.load_state_dict(saved[1]["schedules"])

    saved_at = start if saved is not None else None

    def save(iteration: int) -> None:
        nonlocal saved_at
        meta = {"identity": ident, "iteration": iteration, "training_seconds": seconds,
                "history": history, "finished": iteration >= config.iters,
                "schedules": schedule.state_dict()}
        checkpoint.save(ckpt, exp.state(), meta)
        saved_at = iteration

    it, in_step = start, False
    bar = tqdm(total=config.iters, initial=start, disable=not spec.progress, leave=False,
               desc=f"{cls.name} {spec.regularizer} seed={spec.seed} lam={lam}")
    try:
        with _StopOnSignal() as stop:
            while it < config.iters:
                in_step = True
                t0 = time.perf_counter()
                try:
                    record: dict[str, Any] = exp.train_step(it, schedule.at(it))
                except Exception as exc:
                    kept = (f"nothing was saved yet (a checkpoint is written every "
                            f"{spec.checkpoint_every} iterations)" if saved_at is None else
                            f"{ckpt} holds iteration {saved_at}; rerunning resumes there")
                    exc.add_note(f"({cls.name}, {spec.regularizer}: failed at iteration {it}; "
                                 f"{kept})")
                    raise
                step_seconds = time.perf_counter() - t0
                if not math.isfinite(record["loss"]):
                    raise FloatingPointError(
                        f"{cls.name}: the loss is {record['loss']} at iteration {it}; lower "
                        f"the learning rate or the coefficient (--lam).")
                seconds += step_seconds
                record.update(iteration=it, seconds=step_seconds,
                              lam=schedule.coefficients(it))
                schedule.observe(record["nfe"])
                history.append(record)
                it += 1
                in_step = False
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3g}", nfe=int(record["nfe"]))
                if it % max(spec.checkpoint_every, 1) == 0 or it == config.iters:
                    save(it)
                if callback is not None:
                    callback(it)
                if stop.requested:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if not in_step:
            save(it)
            where_msg = f"all {it} finished iterations are saved"
        else:
            where_msg = "the interrupted iteration is lost; the last checkpoint is kept"
        raise RunInterrupted(f"interrupted at iteration {it} of {config.iters}: {where_msg} "
                             f"in {ckpt}. Run the same command again to resume.") from None
    finally:
        bar.close()
    if start < config.iters or not (where / HISTORY).exists():
        checkpoint.write_json(where / HISTORY, history)
        plot_history(history, where / PLOT, f"{cls.name}, {spec.regularizer}, seed {spec.seed}")
    return exp, history, seconds


def check_identity(path: Path, found: Any, expected: dict[str, Any]) -> None:
    """Refuse a checkpoint that belongs to another run, naming what differs."""
    if not isinstance(found, dict):
        raise CheckpointError(f"checkpoint {path} does not say which run it belongs to; "
                              f"delete it to start over, or use another --out.")
    if found.get("experiment") != expected["experiment"]:
        raise CheckpointError(
            f"run directory {path.parent} holds a checkpoint of experiment "
            f"{found.get('experiment')!r} (regularizer {found.get('regularizer')!r}, seed "
            f"{found.get('seed')!r}), not {expected['experiment']!r}. Use another --out, or "
            f"delete {path} to discard that run.")
    diff = []
    for key in expected:
        if key == "config":
            a, b = found.get("config") or {}, expected["config"]
            diff += [f"{k}: {a.get(k)!r} there, {b[k]!r} here" for k in b if a.get(k) != b[k]]
        elif found.get(key) != expected[key]:
            diff.append(f"{key}: {found.get(key)!r} there, {expected[key]!r} here")
    if diff:
        raise CheckpointError(
            f"run directory {path.parent} holds a checkpoint of a different "
            f"{expected['experiment']} run ({'; '.join(diff)}). Use another --out, or delete "
            f"{path} to discard it.")


class _StopOnSignal:
    """Turns the first Ctrl-C into a request to stop after the current iteration (which is
    then checkpointed); a second Ctrl-C interrupts at once. Only in the main thread."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> _StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def candidate_dir(out: Path, lam: str) -> Path:
    """Where a sweep in ``out`` trains its candidate ``lam``: ``out/lam=<value>``."""
    return out / f"lam={re.sub(r'[^0-9A-Za-z.:+_-]', '_', lam)}"


def _median_seconds(history: list[dict[str, Any]]) -> float | None:
    """Median seconds per training iteration, the first (warm-up, JAX compile) left out."""
    seconds = [h["seconds"] for h in history[1:]] or [h["seconds"] for h in history]
    return statistics.median(seconds) if seconds else None


def _tail_mean(history: list[dict[str, Any]], key: str, n: int = 10) -> float:
    tail = [h[key] for h in history[-n:]]
    return float(sum(tail) / len(tail)) if tail else float("nan")


def plot_history(history: list[dict[str, Any]], path: Path, title: str) -> None:
    """Two panels over iterations: NFE (forward, and with the regularizer's) and loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    FigureCanvasAgg(fig)
    ax_nfe, ax_loss = fig.subplots(1, 2)
    its = [h["iteration"] + 1 for h in history]
    ax_nfe.plot(its, [h["nfe"] for h in history], label="forward NFE")
    if any(h["nfe_reg"] for h in history):
        ax_nfe.plot(its, [h["nfe"] + h["nfe_reg"] for h in history], label="+ regularizer",
                    alpha=0.7)
    ax_nfe.set_xlabel("iteration")
    ax_nfe.set_ylabel("NFE")
    ax_nfe.legend()
    ax_loss.plot(its, [h["task_loss"] for h in history], label="task loss")
    if any(h["reg"] for h in history):
        ax_loss.plot(its, [h["loss"] for h in history], label="total loss", alpha=0.7)
    ax_loss.set_xlabel("iteration")
    ax_loss.set_ylabel("loss")
    if all(h["task_loss"] > 0 for h in history):
        ax_loss.set_yscale("log")
    ax_loss.legend()
    fig.suptitle(title)
    fig.tight_layout()
    checkpoint.atomic_write(path, lambda fh: fig.savefig(fh, format="png", dpi=100),
                            binary=True)
