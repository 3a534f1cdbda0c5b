"""LCoTTA (Duan et al., NeurIPS 2025; METHODS.md 3.10): the ETA loss with every update projected onto
the top-k principal subspace of a window of recent gradients (:class:`SubspaceProjection`).

ImageNet-C ResNet-50 values (configs/imagenetc/lcotta.yaml): k=25, every=50, window=100, SGD 1.5e-4,
momentum 0.9, Nesterov, d_margin 0.05.

CIFAR-scale defaults (the ones below) are our choice; the paper's CIFAR values were not retrieved.
A CIFAR-10-C continual run is 15 domains x 50 batches = 750 steps, in which the ImageNet schedule
(one gradient every 50 steps, projection from 25 gradients on) would never project. We keep the
paper's k/window ratio (1/4) and shrink the time scale so the projection starts at the end of the
first domain and the window spans a few domains: every=5, k=10 (10 x 5 = 50 batches = one domain),
window=40 (200 batches = 4 domains). The ETA part uses the CIFAR values of EATA (margin 0.4 ln C,
d_margin 0.4) and Adam 1e-3, as ETA does on CIFAR.
"""
from typing import Optional

from ..parts.gradients import SubspaceProjection
from . import Cost, register
from .eata import eta_recipe


@register("lcotta", summary="ETA with updates projected on a low-rank gradient subspace",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def lcotta(model, *, k: int = 10, every: int = 5, window: int = 40, margin_frac: float = 0.4,
           d_margin: float = 0.4, num_classes: Optional[int] = None):
    return eta_recipe(margin_frac, d_margin, num_classes).but(grad_transforms=[SubspaceProjection(k, every, window)])
