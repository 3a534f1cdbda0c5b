"""CMF (Lee, Chang; ICLR 2024; METHODS-ZOO Z.9): ROID's loss and output with its weight ensembling
replaced by continual momentum filtering, a scalar Kalman filter over a hidden model that drifts back
to the source and is ensembled into the adapted model after every step
(:class:`tta.parts.ensembling.MomentumFilter`).

Deviations from the reference (``ref:methods/cmf.py``): those of ROID (:mod:`tta.methods.roid`), plus
``reset()`` also resets the filter variance P (the reference keeps it; bit-exact reset is our rule),
and only the hidden model's adapted tensors are stored. The reference's ``TYPE op`` is not offered:
its predict step overwrites the hidden model in place, so ``op`` computes the same as ``lp``.

Defaults are CIFAR-10-C's (Adam 1e-3, alpha 0.99, gamma 0.99, Q 0.005); ImageNet-C uses SGD 2.5e-4,
momentum 0.9, Nesterov.
"""
from ..parts.ensembling import MomentumFilter
from . import register
from .roid import ROID_COST, roid_recipe


@register("cmf", summary="ROID with a Kalman-filtered hidden model ensembled in after every step",
          adapts="norm affine", cost=ROID_COST)
def cmf(model, *, alpha: float = 0.99, gamma: float = 0.99, q: float = 0.005, momentum_probs: float = 0.9,
        temperature: float = 1 / 3, consistency: bool = True, prior_correction: bool = True):
    """``alpha``: the hidden model's pull towards the source; ``gamma``: the ensembling momentum; ``q``:
    process noise per 38,400 adapted values; the rest as in ROID."""
    return roid_recipe(momentum_probs, temperature, consistency, prior_correction).but(
        after_step=[MomentumFilter(alpha, gamma, q)])
