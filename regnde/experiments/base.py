"""What an experiment is, and the registry of experiments by name and backend.

An experiment is a class with a configuration dataclass (CPU-size defaults, paper sizes via
:meth:`Experiment.full_config`) and five operations the framework-neutral runner calls:
:meth:`setup`, :meth:`train_step`, :meth:`evaluate`, :meth:`state` and :meth:`load_state`.
Everything framework-specific (models, optimizer, random generators, the ``regnde.solve`` call)
lives in the experiment class; a JAX variant of an experiment is another class registered under
the same name with ``backends = ("diffrax",)`` (``digits-node``:
:mod:`regnde.experiments.jax_node`), and the runner does not change.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import Any, ClassVar

from regnde.errors import choices


@dataclasses.dataclass
class Config:
    """Common settings of every experiment; subclasses add their own fields."""

    iters: int = 600
    batch_size: int = 128
    lr: float = 1e-3
    rtol: float = 1e-7
    atol: float = 1e-7
    method: str = "dopri5"
    sensitivity: str = "direct"
    max_steps: int = 4096


class Experiment(ABC):
    """Base class of experiments. Subclasses set the class attributes and implement the methods.

    Attributes:
        name: the experiment's command-line name.
        backends: the backends this implementation runs on (first: default).
        metric: name of the headline metric (``accuracy``, ``nll``, ``mse``).
        higher_is_better: direction of ``metric``.
        select_tolerance, select_relative: a coefficient candidate qualifies when its validation
            metric is worse than the reference's (the vanilla run's, else the best candidate's)
            by at most ``select_tolerance`` (absolute: 0.01 = one point of accuracy) or, with
            ``select_relative``, by at most ``select_tolerance * |reference|`` (0.05: 5% of an
            MSE or NLL); among those the lowest validation NFE wins (see
            :func:`regnde.experiments.runner.select`).
        lam_defaults: default coefficient spec per regularizer family (see
            :mod:`regnde.experiments.specs`).
        config_class: the configuration dataclass.
    """

    name: ClassVar[str]
    backends: ClassVar[tuple[str, ...]] = ("torchdiffeq",)
    metric: ClassVar[str] = "accuracy"
    higher_is_better: ClassVar[bool] = True
    select_tolerance: ClassVar[float] = 0.01
    select_relative: ClassVar[bool] = False
    lam_defaults: ClassVar[dict[str, str]] = {}
    config_class: ClassVar[type[Config]] = Config
    data_help: ClassVar[str] = "no --data option"

    def __init__(self, config: Config, backend: str, seed: int, data: str | None = None):
        self.config = config
        self.backend = backend
        self.seed = seed
        self.data = data

    @classmethod
    def full_config(cls) -> dict[str, Any]:
        """Overrides of the CPU defaults that give the papers' sizes (``--full``)."""
        return {}

    @classmethod
    def check_available(cls, backend: str) -> None:
        """Raise ``ValueError`` if this experiment cannot run here (a missing backend)."""
        return None

    @abstractmethod
    def setup(self) -> None:
        """Load data and build model, optimizer and random generators (seeded by ``seed``)."""

    @abstractmethod
    def train_step(self, iteration: int, regularizer: Any) -> dict[str, float]:
        """One optimizer step with ``regularizer`` (a regnde regularizer or ``None``).

        Returns at least ``loss`` (total), ``task_loss``, ``reg``, ``nfe``, ``nfe_reg``.
        """

    @abstractmethod
    def evaluate(self, split: str) -> dict[str, float]:
        """Metrics on ``split`` (``train``/``val``/``test``): ``metric``, ``loss``, ``nfe``
        (mean forward NFE per batch), ``seconds_per_batch`` (mean prediction time) and
        ``seconds_per_batch_median`` / ``warmup_seconds`` (the median without the first batch,
        and the first batch's time: caches, JAX compilation)."""

    @abstractmethod
    def state(self) -> dict[str, Any]:
        """Everything that changes while training (tensors and plain data only)."""

    @abstractmethod
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state` exactly."""

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this implementation uses."""
        return {}


_EXPERIMENTS: dict[str, dict[str, type[Experiment]]] = {}


def register(cls: type[Experiment]) -> type[Experiment]:
    """Class decorator: make ``cls`` runnable as ``cls.name`` on each of ``cls.backends``."""
    by_backend = _EXPERIMENTS.setdefault(cls.name, {})
    for b in cls.backends:
        by_backend[b] = cls
    return cls


def experiment_names() -> list[str]:
    """Names of the registered experiments."""
    _load_builtin()
    return sorted(_EXPERIMENTS)


def get(name: str, backend: str | None) -> tuple[type[Experiment], str]:
    """The implementation of experiment ``name`` for ``backend`` (``None``: its default)."""
    _load_builtin()
    if name not in _EXPERIMENTS:
        raise ValueError(choices("experiment", name, _EXPERIMENTS))
    impls = _EXPERIMENTS[name]
    if backend is None:
        backend = next(iter(impls))
    if backend not in impls:
        raise ValueError(choices(
            f"backend for experiment {name!r}", backend, impls,
            "Other backends need their own implementation of this experiment."))
    cls = impls[backend]
    cls.check_available(backend)
    return cls, backend


def make_config(cls: type[Experiment], full: bool, iters: int | None,
                overrides: dict[str, str]) -> Config:
    """The configuration: defaults, then ``--full``, then ``--iters``, then ``--set`` values."""
    fields = {f.name: f for f in dataclasses.fields(cls.config_class)}
    values: dict[str, Any] = dict(cls.full_config()) if full else {}
    if iters is not None:
        values["iters"] = iters
    for key, text in overrides.items():
        if key not in fields:
            raise ValueError(choices(f"setting of {cls.name}", key, fields))
        values[key] = _convert(cls.config_class, key, text)
    cfg = cls.config_class(**values)
    if cfg.iters < 1:
        raise ValueError(f"iters must be >= 1, got {cfg.iters}.")
    return cfg


def _convert(config_class: type[Config], key: str, text: str) -> Any:
    default = getattr(config_class(), key)
    try:
        if isinstance(default, bool):
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return type(default)(text)
    except ValueError:
        raise ValueError(
            f"--set {key}={text!r}: expected a {type(default).__name__} like {default!r}."
        ) from None


def _load_builtin() -> None:
    from regnde.experiments import cnf, latent, mnist1d, node, sde  # noqa: F401  (registers)

    try:
        from regnde.experiments import jax_node  # noqa: F401  (JAX variants)
    except ImportError as exc:  # JAX, equinox or diffrax missing: say so when asked for
        register(_unavailable("digits-node", "diffrax", f"pip install 'regnde[jax]' ({exc})"))


def _unavailable(name: str, backend: str, hint: str) -> type[Experiment]:
    """A stand-in registered for ``name`` on ``backend`` whose implementation cannot be
    imported here: selecting it raises ``ValueError`` with ``hint``."""

    class Unavailable(Experiment):
        backends = (backend,)

        @classmethod
        def check_available(cls, backend: str) -> None:
            raise ValueError(f"experiment {name!r} on backend {backend!r} needs JAX, equinox "
                             f"and diffrax: {hint}")

    Unavailable.name = name
    return Unavailable
