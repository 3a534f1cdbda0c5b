"""Wisdom of crowds (Lee et al., ICCV 2023; METHODS.md 3.6): a host entropy method trained only on
samples the adapted model is at least as sure of as the source model (same class, same norm mode).

``tent_wisdom`` is the method as published: TENT + the filter + ``-diversity * H(mean p)`` over the
batch (diversity 0.5, the UniEnt re-implementation's value). ``eta_wisdom`` and ``tsallis_wisdom`` add
only the filter to those hosts (the indicator multiplies the host's per-sample loss); ``diversity`` can
be turned on for them too.
"""
from typing import Optional

from ..adapter import Recipe
from ..parts.filters import ConfidenceDrop
from ..parts.objectives import MarginalEntropyBonus
from . import Cost, register
from .eata import eta_recipe
from .tent import tent_recipe
from .tsallis import tsallis


def with_wisdom(recipe: Recipe, margin: float, diversity: float) -> Recipe:
    """``recipe`` with the confidence-drop filter first (stateful filters such as Redundancy stay last)."""
    terms = [*recipe.batch_terms, MarginalEntropyBonus(diversity)] if diversity else list(recipe.batch_terms)
    return recipe.but(filters=[ConfidenceDrop(margin), *recipe.filters], batch_terms=terms)


@register("tent_wisdom", summary="TENT, dropping samples the source model was surer of",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=1))
def tent_wisdom(model, *, margin: float = 0.0, diversity: float = 0.5):
    return with_wisdom(tent_recipe(), margin, diversity)


@register("eta_wisdom", summary="ETA, dropping samples the source model was surer of",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=1))
def eta_wisdom(model, *, margin: float = 0.0, diversity: float = 0.0, margin_frac: float = 0.4,
               d_margin: float = 0.4, num_classes: Optional[int] = None):
    return with_wisdom(eta_recipe(margin_frac, d_margin, num_classes), margin, diversity)


@register("tsallis_wisdom", summary="Tsallis entropy, dropping samples the source model was surer of",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=1))
def tsallis_wisdom(model, *, margin: float = 0.0, diversity: float = 0.0, q: float = 0.1):
    return with_wisdom(tsallis(model, q=q), margin, diversity)
