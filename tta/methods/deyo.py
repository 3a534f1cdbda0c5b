"""DeYO (Lee et al., ICLR 2024; METHODS.md 3.5): entropy minimisation on confident samples whose
prediction depends on the object's shape (PLPD under a patch shuffle), weighted by both.

Defaults are the CIFAR-10-C values (Adam 1e-3; selection 0.5 ln C, weighting margin 0.4 ln C, PLPD
threshold 0.2 on a 4x4 patch shuffle); mild ImageNet-C uses plpd_threshold 0.3 with SGD. ``skip_top``/
``skip``: as for SAR.
"""
from typing import Optional, Sequence

from ..parts.filters import PLPD, EntropyMargin
from ..parts.params import norm_affine
from ..parts.weights import DeyoWeight
from . import Cost, register
from .tent import tent_recipe


@register("deyo", summary="entropy on samples whose prediction depends on shape (PLPD)",
          adapts="norm affine below the top stage", cost=Cost(grad=1, backward=1, nograd=1))
def deyo(model, *, margin_frac: float = 0.5, weight_margin_frac: float = 0.4, plpd_threshold: float = 0.2,
         patches: int = 4, kind: str = "patch", reweight_ent: bool = True, reweight_plpd: bool = True,
         skip_top: bool = True, skip: Optional[Sequence[str]] = None, num_classes: Optional[int] = None):
    weight = (DeyoWeight(weight_margin_frac, reweight_ent, reweight_plpd, num_classes)
              if reweight_ent or reweight_plpd else None)
    return tent_recipe().but(params=norm_affine(skip_top, skip),
                             filters=[EntropyMargin(margin_frac, num_classes), PLPD(plpd_threshold, patches, kind)],
                             weight=weight)
