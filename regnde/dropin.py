"""The drop-in for existing solver code: :func:`regularize`, served by the first registered
backend that has a ``regularize`` method (torchdiffeq's and torchsde's among the built-ins)."""

from __future__ import annotations

from typing import Any


def regularize(regularizer: Any, key: Any = None, trace: str = "summary",
               max_steps: int | None = None) -> Any:
    """Regularize unchanged ``torchdiffeq.odeint`` / ``odeint_adjoint`` / ``odeint_event`` and
    ``torchsde.sdeint`` / ``sdeint_adjoint`` calls::

        with regnde.regularize(regnde.regularizers.LocalError(), key=0) as reg:
            ys = torchdiffeq.odeint(func, y0, t, method="dopri5")
        loss = task_loss(ys) + lam * reg.value

    ``ys`` is identical to the same call outside the block, and so are the exceptions it
    raises (regnde's are instances of the host's type too) and, while ``reg.value`` is not
    used, the gradients. ``reg.value`` is the differentiable regularizer, summed over the
    solves inside (the first uses ``key``, later ones keys derived from it and their index);
    ``reg.stats`` sums their counts. Blocks are per thread; in nested blocks a solve counts for
    the innermost one; solves run by a backward pass are not counted. A call that cannot be
    regularized (a fixed-step method, ``scipy_solver``, a single output time, a solve on
    another thread, no solve at all) is announced once with a ``UserWarning`` and contributes
    0; ``reg.value`` is then a zero tensor, never ``None``. See docs/dropin.md.

    Args:
        regularizer: a regnde regularizer or a registered name.
        key: int seed, ``torch.Generator`` or ``None``.
        trace: ``"summary"`` (default: no states kept) or ``"full"``.
        max_steps: limit on all steps of each solve inside the block; ``None`` (default):
            none beyond the host library's own.
    """
    from regnde.plugins.manager import registry
    from regnde.validate import check_options

    check_options("direct", trace, 1 if max_steps is None else max_steps, 1.0, 1.0)
    reg = registry()
    hosts = []
    for name in reg.names("backend"):
        try:
            backend = reg.backend(name)
        except Exception:  # a broken plugin offers no drop-in
            continue
        if callable(getattr(backend, "regularize", None)):
            hosts.append(backend)
    if not hosts:
        raise ValueError(no_host_message(reg))
    return hosts[0].regularize(regularizer, key=key, trace=trace, max_steps=max_steps)


def no_host_message(reg: Any) -> str:
    """Why :func:`regularize` cannot work: no backend with a drop-in is installed. Says which
    built-in ones would bring one and how to install them, and what the installed backends
    offer instead (their ``dropin_hint``)."""
    missing = [f"{b.dropin} ({b.install})" for b in reg.missing_builtins() if b.dropin]
    msg = "regnde.regularize needs a backend with a drop-in, and none is installed"
    msg += f"; the built-in ones wrap unchanged {'; '.join(missing)}." if missing else "."
    for name in reg.in_order():
        try:
            hint = reg.capability(name, "dropin_hint", "")
            has_dropin = callable(reg.capability(name, "regularize"))
        except Exception:
            continue
        if hint and not has_dropin:
            msg += f" {name}: {hint}."
    return msg
