"""ETA and EATA (Niu et al., ICML 2022; METHODS.md 3.3): TENT restricted to reliable, non-redundant
samples weighted by confidence; EATA adds a Fisher-weighted anchor to the source parameters.

Defaults are the CIFAR-10-C values (E0 = 0.4 ln C, d_margin 0.4, Fisher weight 1, 2,000 clean images
in batches of 200); ImageNet-C uses d_margin 0.05, fisher_alpha 2000, fisher_batch_size 64.
"""
from typing import Optional

import torch

from ..errors import ConfigError
from ..parts.filters import EntropyMargin, Redundancy
from ..parts.regularisers import FisherAnchor
from ..parts.weights import EntropyWeight
from . import Cost, register
from .tent import tent_recipe


def eta_recipe(margin_frac: float = 0.4, d_margin: float = 0.4, num_classes: Optional[int] = None):
    """TENT + entropy margin + redundancy filter (last: it learns from what it lets through) + exp weight."""
    return tent_recipe().but(filters=[EntropyMargin(margin_frac, num_classes), Redundancy(d_margin)],
                             weight=EntropyWeight(margin_frac, num_classes))


@register("eta", summary="entropy on reliable, non-redundant samples, confidence-weighted",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def eta(model, *, margin_frac: float = 0.4, d_margin: float = 0.4, num_classes: Optional[int] = None):
    return eta_recipe(margin_frac, d_margin, num_classes)


@register("eata", summary="ETA plus a Fisher-weighted anchor to the source weights",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0),
          source_data="clean images for the Fisher estimate (fisher_data; labels unused)")
def eata(model, *, fisher_data: Optional[torch.Tensor] = None, fisher_alpha: float = 1.0, fisher_n: int = 2000,
         fisher_batch_size: int = 200, fisher_seed: int = 0, margin_frac: float = 0.4, d_margin: float = 0.4,
         num_classes: Optional[int] = None):
    """``fisher_data``: clean in-distribution images (float, [0, 1], NCHW); labels are not used."""
    if fisher_data is None:
        raise ConfigError("eata needs fisher_data: clean in-distribution images (float NCHW in [0, 1]) to "
                          "estimate the Fisher information; use method 'eta' for EATA without it")
    anchor = FisherAnchor(fisher_data, fisher_alpha, n=fisher_n, batch_size=fisher_batch_size, seed=fisher_seed)
    return eta_recipe(margin_frac, d_margin, num_classes).but(regularisers=[anchor])
