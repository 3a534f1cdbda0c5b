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
from ..parts.subnet import ChannelDropout, MinMaxEntropy, SubnetConsistency
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


@register("eata_c", summary="EATA calibrated: full/sub-network consistency and min-max entropy by label agreement",
          adapts="norm affine", cost=Cost(grad=2, backward=1, nograd=0),
          source_data="clean images for the Fisher estimate (fisher_data; labels unused)")
def eata_c(model, *, fisher_data: Optional[torch.Tensor] = None, fisher_alpha: float = 1.0, fisher_n: int = 2000,
           fisher_batch_size: int = 200, fisher_seed: int = 0, margin_frac: float = 0.4, d_margin: float = 0.4,
           num_classes: Optional[int] = None, drop_rate: float = 0.1, consistency_weight: float = 1.0,
           max_weight: float = 1.0):
    """EATA-C after its abstract (METHODS.md 3.3; the constructions are ours, tta/parts/subnet.py):
    EATA's selection, weights and Fisher anchor; the entropy of a selected sample is minimised where the
    full network and a sub-network drawn by channel dropout (``drop_rate``) agree on its label and
    maximised (times ``max_weight``) where they do not; plus ``consistency_weight`` times the mean
    KL(full || sub) over the batch."""
    subnet = ChannelDropout(drop_rate)
    return eata(model, fisher_data=fisher_data, fisher_alpha=fisher_alpha, fisher_n=fisher_n,
                fisher_batch_size=fisher_batch_size, fisher_seed=fisher_seed, margin_frac=margin_frac,
                d_margin=d_margin, num_classes=num_classes).but(
        objective=MinMaxEntropy(subnet, max_weight), batch_terms=[SubnetConsistency(subnet, consistency_weight)])
