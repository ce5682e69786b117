"""The torch adapters: one backend module per torch solver suite (:mod:`.torchdiffeq`,
:mod:`.torchsde`, :mod:`.torchode`) over a common layer (:mod:`.keys`, :mod:`.scope`,
:mod:`.augment`, :mod:`.taylor`, :mod:`.dropin`, :mod:`.distributed`).

This package imports nothing: each backend module imports only torch and its own suite, so it
loads where the other suites are not installed.
"""
