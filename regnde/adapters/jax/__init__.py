"""The JAX adapters: the diffrax backend (:mod:`.diffrax`, one solve for ODEs and SDEs, with the
helpers :mod:`.run`, :mod:`.ode_methods`, :mod:`.sde_methods` and :mod:`.sde_terms`;
:mod:`.diffrax_dropin` for :mod:`regnde.diffrax`) over a common layer (:mod:`.common`,
:mod:`.augment`, :mod:`.distributed`).

This package imports nothing: it is read even where JAX is not installed.
"""
