"""The small named parts a method recipe is made of (see DESIGN.md): parameter selectors, norm modes,
objectives, sample filters and weights, regularisers, gradient transforms, update steps, reset policies.

Every part is a plain callable object. Parts that keep state implement ``reset()``; parts that need the
configured model (a frozen copy, a Fisher estimate) implement ``bind(adapter)``. ``Part`` gives no-op
defaults for both.
"""
from .base import Part

__all__ = ["Part"]
