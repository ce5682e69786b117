"""The JAX adapters: the diffrax backend (:mod:`.diffrax` for ODEs, :mod:`.diffrax_sde` for SDEs,
:mod:`.diffrax_dropin` for :mod:`regnde.diffrax`) over a common layer (:mod:`.augment`,
:mod:`.distributed`).

This package imports nothing: it is read even where JAX is not installed.
"""
