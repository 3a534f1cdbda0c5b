"""SAR (Niu et al., ICLR 2023; METHODS.md 3.4): entropy minimisation on reliable samples with a
sharpness-aware step, norm layers of the network's top left alone, and a reset when the loss EMA
says the model collapsed.

Defaults are the CIFAR-10-C values of the widely used benchmark code: SGD(1e-3, momentum 0.9) inside
SAM. ``skip_top=True`` uses the architecture's skip rule (:func:`tta.parts.params.top_modules`);
``skip_top=False`` adapts every norm layer (what the reference does on CIFAR ResNets); ``skip`` gives
explicit regexes instead.
"""
from typing import Optional, Sequence

from ..parts.filters import EntropyMargin
from ..parts.optim import OptimizerSpec
from ..parts.params import norm_affine
from ..parts.resets import LossEMABelow
from ..parts.steps import SAM
from . import Cost, register
from .tent import tent_recipe


@register("sar", summary="reliable entropy with a sharpness-aware step and collapse reset",
          adapts="norm affine below the top stage", cost=Cost(grad=2, backward=2, nograd=0))
def sar(model, *, margin_frac: float = 0.4, rho: float = 0.05, reset_below: float = 0.2, skip_top: bool = True,
        skip: Optional[Sequence[str]] = None, num_classes: Optional[int] = None):
    return tent_recipe().but(params=norm_affine(skip_top, skip), filters=[EntropyMargin(margin_frac, num_classes)],
                             step=SAM(rho), resets=[LossEMABelow(reset_below)],
                             optimizer=OptimizerSpec("sgd", lr=1e-3, momentum=0.9))
