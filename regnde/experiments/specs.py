"""Regularizer names used on the command line, and their coefficient schedules.

A *regularizer spec* is a name from :func:`regularizer_names` or a sum of them joined by ``+``
(``local-error-unbiased+global-stiffness``). Each name maps to a factory that builds a
:mod:`regnde.regularizers` object and to a *family* (``error``, ``stiffness``, ``taylor``,
``rnode``, ``steer``) that picks the experiment's default coefficient schedule.

Regularizers written elsewhere (TayNODE, RNODE, STEER) are looked up on
:mod:`regnde.regularizers` by class name when they are used, so they plug in as soon as they
exist; until then using them raises an error that says what is missing. Third parties add names
with :func:`register_regularizer`.

A *coefficient spec* (``--lam``) is ``X`` (constant), ``X:Y`` (exponential from ``X`` to ``Y``
over the run, the references' schedule), or ``cos:X:Y`` (cosine); for a sum, one per term joined
by ``+`` or a single one applied to every term. A comma-separated list is a sweep whose value is
chosen on the validation split.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from regnde import regularizers as R
from regnde import schedules
from regnde.errors import choices

Factory = Callable[[], Any]
Schedule = Callable[[int], float]

FAMILIES = ("error", "stiffness", "taylor", "rnode", "steer")


@dataclass(frozen=True)
class RegSpec:
    """One registered regularizer name: its factory and its family."""

    name: str
    factory: Factory
    family: str
    doc: str = ""


_SPECS: dict[str, RegSpec] = {}
_PATTERNS: list[tuple[re.Pattern[str], Callable[[re.Match[str]], RegSpec]]] = []


def register_regularizer(name: str, factory: Factory, family: str, doc: str = "") -> None:
    """Make ``name`` usable in ``--regularizer``; ``factory()`` builds the regularizer."""
    if family not in FAMILIES:
        raise ValueError(choices("regularizer family", family, FAMILIES))
    if "+" in name or name == "none":
        raise ValueError(f"regularizer name {name!r} may not contain '+' or be 'none'.")
    _SPECS[name] = RegSpec(name, factory, family, doc)


def _library(class_name: str, what: str) -> Callable[..., Any]:
    """``regnde.regularizers.<class_name>``, or an error saying it is not there yet."""
    cls = getattr(R, class_name, None)
    if cls is None:
        raise ValueError(
            f"{what} needs regnde.regularizers.{class_name}, which this regnde does not provide "
            f"(yet). Use one of the available regularizers: "
            f"{', '.join(regularizer_names(available_only=True))}."
        )
    return cls


def _taynode(match: re.Match[str]) -> RegSpec:
    order = int(match.group(1))
    if order < 1:
        raise ValueError(f"taynode-K needs K >= 1, got {match.group(0)!r}.")
    name = match.group(0)
    return RegSpec(name, lambda: _library("TaylorDerivative", name)(order=order), "taylor",
                   "TayNODE: integral of the squared K-th total derivative")


def _rnode() -> Any:
    return _library("KineticEnergy", "rnode")() + _library("JacobianFrobenius", "rnode")()


class Steer(R.Regularizer):
    """STEER (Ghosh et al., 2020) as a term of a ``--regularizer`` spec.

    It adds no penalty: during training the experiment draws the end time from
    ``U(t1 - b, t1 + b)`` (``regnde.solve(..., steer=b)``) with ``b`` its coefficient times the
    last interval of the output grid (``|t1 - t0|`` for two times); the coefficient must lie in
    ``(0, 1)``. Evaluation uses the true end time.
    """

    name = "steer"

    def value(self, run: Any, key: Any, presampled: Any) -> Any:
        raise TypeError("Steer is a solve option, not a penalty: pass it through split_steer().")


def split_steer(regularizer: Any, t: Any) -> tuple[Any, float | None]:
    """``(the regularizer without Steer terms, STEER's half-width b or None)`` for grid ``t``."""
    if regularizer is None:
        return None, None
    terms = regularizer.terms()
    steer = [c for c, r in terms if isinstance(r, Steer)]
    if not steer:
        return regularizer, None
    if not 0.0 < steer[0] < 1.0:
        raise ValueError(f"steer's coefficient is the half-width as a fraction of the last "
                         f"interval and must lie in (0, 1), got {steer[0]}.")
    rest = [(c, r) for c, r in terms if not isinstance(r, Steer)]
    b = steer[0] * float(abs(t[-1] - t[-2]))
    return (R.Sum(rest) if rest else None), b


def _steer() -> Any:
    return Steer()


def _builtins() -> None:
    register_regularizer("global-error", R.GlobalError, "error",
                         "ERNODE: sum of error * |dt| over accepted steps")
    register_regularizer("global-stiffness", R.GlobalStiffness, "stiffness",
                         "SRNODE: sum of Shampine's stiffness estimates")
    register_regularizer("local-error-unbiased", lambda: R.LocalError(sampler="unbiased"),
                         "error", "local error, tau ~ U[t0, t1], recorded dt, exact gradient")
    register_regularizer("local-error-biased", lambda: R.LocalError(sampler="biased"),
                         "error", "local error, tau from the accepted step starts")
    register_regularizer(
        "local-error-reference",
        lambda: R.LocalError(sampler="unbiased", dt="initial", first_stage="constant"),
        "error", "local error as LocalRegNeuralDE.jl: initial dt, first stage constant")
    register_regularizer("local-stiffness", lambda: R.LocalStiffness(sampler="biased"),
                         "stiffness", "local stiffness, biased sampler")
    register_regularizer("local-stiffness-unbiased",
                         lambda: R.LocalStiffness(sampler="unbiased"), "stiffness",
                         "local stiffness, unbiased sampler")
    register_regularizer("rnode", _rnode, "rnode",
                         "RNODE: kinetic energy + Jacobian Frobenius norm")
    register_regularizer("steer", _steer, "steer", "STEER: random end time")
    _PATTERNS.append((re.compile(r"taynode-(\d+)"), _taynode))


_builtins()


def regularizer_names(available_only: bool = False) -> list[str]:
    """Valid names for ``--regularizer`` (``taynode-K`` for any order ``K``)."""
    names = ["none", *sorted(_SPECS), "taynode-K"]
    if not available_only:
        return names
    missing = {"rnode": "KineticEnergy", "taynode-K": "TaylorDerivative"}
    return [n for n in names if n not in missing or hasattr(R, missing[n])]


def lookup(name: str) -> RegSpec:
    """The :class:`RegSpec` registered as ``name``; unknown names list the valid ones."""
    if name in _SPECS:
        return _SPECS[name]
    for pattern, make in _PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return make(m)
    raise ValueError(choices("regularizer", name, regularizer_names(),
                             "Combine them with '+', e.g. local-error-unbiased+global-stiffness."))


def parse_regularizer(spec: str) -> list[RegSpec]:
    """The terms of a spec (empty for ``none``); checks every name without building anything."""
    spec = spec.strip()
    if spec == "none":
        return []
    parts = [p.strip() for p in spec.split("+")]
    if any(p in ("", "none") for p in parts):
        raise ValueError(f"regularizer spec {spec!r}: 'none' and empty terms cannot be summed.")
    terms = [lookup(p) for p in parts]
    if len({t.name for t in terms}) != len(terms):
        raise ValueError(f"regularizer spec {spec!r} names a term twice.")
    return terms


def parse_schedule(text: str, iters: int) -> Schedule:
    """One coefficient schedule from ``X``, ``X:Y`` (exponential), ``cos:X:Y``, or an NFE budget
    chosen online: ``budget:N`` (target N evaluations) or ``ratio:R`` (R times the starting
    NFE), see :class:`regnde.schedules.NFEBudget`."""
    text = text.strip()
    try:
        if text.startswith("budget:"):
            return schedules.NFEBudget(float(text[7:]))
        if text.startswith("ratio:"):
            return schedules.NFEBudget(target_ratio=float(text[6:]))
        if text.startswith("cos:"):
            a, b = (float(x) for x in text[4:].split(":"))
            return schedules.Cosine(a, b, max(iters, 1))
        if ":" in text:
            a, b = (float(x) for x in text.split(":"))
            if a == b:
                return schedules.Constant(a)
            return schedules.Exponential(a, b, max(iters, 1))
        return schedules.Constant(float(text))
    except ValueError as exc:
        raise ValueError(
            f"bad coefficient {text!r}: use X (constant), X:Y (exponential from X to Y over the "
            f"run), cos:X:Y, budget:NFE or ratio:R ({exc})."
        ) from None


def coefficient_specs(lam: str, n_terms: int) -> list[str]:
    """Split one candidate ``--lam`` value into one spec per term."""
    parts = [p.strip() for p in lam.split("+")]
    if len(parts) == 1:
        return parts * n_terms
    if len(parts) != n_terms:
        raise ValueError(
            f"--lam {lam!r} has {len(parts)} terms but the regularizer has {n_terms}; give one "
            f"coefficient per term joined by '+', or one for all."
        )
    return parts


class ScheduledRegularizer:
    """The terms of a spec with one coefficient schedule each.

    ``at(i)`` returns ``sum_k lam_k(i) * R_k`` (a :class:`regnde.regularizers.Regularizer`) for
    iteration ``i``, or ``None`` for ``none``; ``coefficients(i)`` the values ``lam_k(i)``.
    """

    def __init__(self, spec: str, lam: str, iters: int):
        self.spec = spec
        self.lam = lam
        self.terms = parse_regularizer(spec)
        self.schedules = (
            [parse_schedule(s, iters) for s in coefficient_specs(lam, len(self.terms))]
            if self.terms else []
        )
        self.objects = [t.factory() for t in self.terms]

    def coefficients(self, iteration: int) -> list[float]:
        return [s(iteration) for s in self.schedules]

    def observe(self, nfe: float) -> None:
        """Feed the iteration's measured NFE to the schedules that choose online (budgets)."""
        for s in self.schedules:
            if hasattr(s, "update"):
                s.update(nfe)

    def state_dict(self) -> list[Any]:
        return [s.state_dict() if hasattr(s, "state_dict") else None for s in self.schedules]

    def load_state_dict(self, states: list[Any]) -> None:
        for s, state in zip(self.schedules, states, strict=True):
            if state is not None:
                s.load_state_dict(state)  # type: ignore[attr-defined]

    def at(self, iteration: int) -> Any:
        if not self.terms:
            return None
        return sum((c * r for c, r in zip(self.coefficients(iteration), self.objects,
                                          strict=True)), 0)


def default_lam(spec: str, defaults: dict[str, str]) -> str:
    """The experiment's default coefficient spec for ``spec`` from its per-family ``defaults``."""
    terms = parse_regularizer(spec)
    if not terms:
        return "0"
    return "+".join(defaults[t.family] for t in terms)


#: The factors :func:`sweep_lam` applies to an experiment's default coefficient: two decades.
SWEEP_FACTORS = (0.1, 1.0, 10.0)
#: How many candidates ``--sweep-lam`` may add to those of :data:`SWEEP_FACTORS` where they do
#: not bracket the choice (:func:`next_factor`).
SWEEP_EXTRA = 2
#: The sweep's rule as ``results.json`` records it (a run swept by another rule is not reused).
SWEEP_RULE = ("x0.1, x1, x10 the default; then up to 2 more: x10 past the strongest while it "
              "is within the tolerance and lowers NFE, else the geometric mean of the strongest "
              "within and the next stronger one outside it, where that one's NFE is lower; of "
              "equal NFE the weakest coefficient")
#: :func:`next_factor` stops refining once the edge of the tolerance is bracketed this tightly.
SWEEP_FINEST = 2.0
#: Families whose coefficient is not a weight to scale by decades: their sweep's candidates,
#: as many as :data:`SWEEP_FACTORS`. STEER's coefficient is the half-width of the end time's
#: interval as a fraction of the last interval, so it lies in (0, 1).
FAMILY_SWEEPS: dict[str, tuple[str, ...]] = {"steer": ("0.1", "0.5", "0.9")}


def scale_lam(lam: str, factor: float) -> str:
    """One ``--lam`` candidate with every coefficient multiplied by ``factor`` (constants, both
    ends of ``X:Y`` and ``cos:X:Y``, every term of a sum). NFE budgets are not coefficients
    and are refused."""
    def one(text: str) -> str:
        text = text.strip()
        if text.startswith(("budget:", "ratio:")):
            raise ValueError(f"--sweep-lam scales coefficients; {text!r} is an NFE target, "
                             f"not a coefficient. Drop --sweep-lam or the budget.")
        head, values = ("cos:", text[4:]) if text.startswith("cos:") else ("", text)
        try:
            scaled = [f"{float(f'{float(v) * factor:.3g}'):g}" for v in values.split(":")]
        except ValueError:
            raise ValueError(f"bad coefficient {text!r} in a sweep: use X, X:Y or cos:X:Y.")\
                from None
        return head + ":".join(scaled)

    return "+".join(one(p) for p in lam.split("+"))


def sweep_lam(spec: str, base_lam: str, factors: tuple[float, ...] = SWEEP_FACTORS) -> str:
    """The comma-separated candidates of ``--sweep-lam``, term by term: ``base_lam``'s
    coefficient (the experiment's default for ``spec``, or the user's ``--lam``) times each of
    ``factors``, or the family's own grid (:data:`FAMILY_SWEEPS`); the i-th candidate of a sum
    takes every term's i-th value."""
    if spec == "none":
        return "0"
    if "," in base_lam:
        raise ValueError(f"--sweep-lam builds the candidates from one coefficient; --lam "
                         f"{base_lam!r} already lists several. Pass one of them, or drop "
                         f"--sweep-lam to train exactly those.")
    terms = parse_regularizer(spec)
    per_term = []
    for term, lam in zip(terms, coefficient_specs(base_lam, len(terms)), strict=True):
        grid = FAMILY_SWEEPS.get(term.family)
        if grid is not None and len(grid) != len(factors):
            raise ValueError(f"the {term.family} family sweeps {len(grid)} values; pass "
                             f"{len(grid)} factors, not {len(factors)}.")
        per_term.append(list(grid) if grid is not None
                        else [scale_lam(lam, f) for f in factors])
    return ",".join("+".join(values) for values in zip(*per_term, strict=True))


def refinable(spec: str) -> bool:
    """Whether ``--sweep-lam`` may add candidates to ``spec``'s sweep: every term's coefficient
    is a weight scaled by decades (not a family grid of :data:`FAMILY_SWEEPS`)."""
    terms = parse_regularizer(spec)
    return bool(terms) and all(t.family not in FAMILY_SWEEPS for t in terms)


def next_factor(points: list[tuple[float, bool, float]]) -> float | None:
    """The factor of the sweep's next candidate, or ``None`` when the sweep brackets the edge of
    the tolerance.

    Args:
        points: one ``(factor, within tolerance, validation NFE)`` per trained candidate.

    With ``P`` the strongest candidate within the tolerance: where no stronger one was
    trained and ``P`` still lowered NFE below its weaker neighbour's (or has none),
    ``P`` times 10, since a stronger coefficient may still be within the tolerance; where the
    next stronger candidate failed the tolerance at an NFE below every passing one's and lies
    more than :data:`SWEEP_FINEST` times above ``P``, their geometric mean, since the edge lies
    between them. Without a candidate within the tolerance nothing is added.
    """
    by_factor = sorted(points)
    passing = [p for p in by_factor if p[1]]
    if not passing:
        return None
    top = passing[-1]
    stronger = [p for p in by_factor if p[0] > top[0]]
    if not stronger:
        weaker = [p for p in by_factor if p[0] < top[0]]
        return top[0] * 10.0 if not weaker or top[2] < weaker[-1][2] else None
    edge = stronger[0]
    if edge[2] < min(p[2] for p in passing) and edge[0] > SWEEP_FINEST * top[0]:
        return (top[0] * edge[0]) ** 0.5
    return None
