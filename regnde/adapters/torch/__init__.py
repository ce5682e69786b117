"""The torch adapters: one backend module per torch solver suite (:mod:`.torchdiffeq`,
:mod:`.torchsde`, :mod:`.torchode`) over a common layer (:mod:`.keys`, :mod:`.common`,
:mod:`.scope`, :mod:`.augment`, :mod:`.taylor` with :mod:`.taylor_rules` and
:mod:`.taylor_series`, :mod:`.dropin`, :mod:`.distributed`).

A backend's own modules carry its prefix: torchdiffeq's :mod:`.td_tableau`, :mod:`.td_recorder`,
:mod:`.td_solvers`; torchsde's :mod:`.sde_checks`, :mod:`.sde_step`, :mod:`.sde_recorder`,
:mod:`.sde_solvers`. None imports another backend's modules.

This package imports nothing: each backend module imports only torch and its own suite, so it
loads where the other suites are not installed.
"""
