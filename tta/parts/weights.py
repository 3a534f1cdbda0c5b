"""Sample weights: ``w(batch) -> (B,)`` multiplies the per-sample objective; always detached.

Formulas: METHODS.md 3.3 (EATA), 3.5 (DeYO). ``E0 = margin_frac * ln C`` with C from the logits
unless ``num_classes`` is given.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from .base import Part
from .filters import entropy_threshold


class EntropyWeight(Part):
    """EATA: ``exp(E0 - E)``, so the more confident a selected sample, the more it counts."""

    def __init__(self, margin_frac: float = 0.4, num_classes: Optional[int] = None):
        self.margin_frac, self.num_classes = margin_frac, num_classes

    def __call__(self, batch) -> torch.Tensor:
        e0 = entropy_threshold(self.margin_frac, self.num_classes or batch.num_classes)
        return torch.exp(e0 - batch.entropy.detach())


class DeyoWeight(Part):
    """DeYO: ``exp(-(E - E0)) + exp(PLPD)``; either term can be switched off (not both).

    PLPD comes from ``batch.extras["plpd"]``, left there by the :class:`~tta.parts.filters.PLPD` filter.
    """

    def __init__(self, margin_frac: float = 0.4, entropy: bool = True, plpd: bool = True,
                 num_classes: Optional[int] = None):
        if not (entropy or plpd):
            raise ConfigError("DeyoWeight needs at least one of its terms (entropy, plpd); use no weight instead")
        self.margin_frac, self.entropy, self.plpd, self.num_classes = margin_frac, entropy, plpd, num_classes

    def __call__(self, batch) -> torch.Tensor:
        w = torch.zeros_like(batch.entropy.detach())
        if self.entropy:
            e0 = entropy_threshold(self.margin_frac, self.num_classes or batch.num_classes)
            w = w + torch.exp(e0 - batch.entropy.detach())
        if self.plpd:
            if "plpd" not in batch.extras:
                raise ConfigError("DeyoWeight(plpd=True) needs the PLPD filter in the recipe's filters")
            w = w + torch.exp(batch.extras["plpd"])
        return w
