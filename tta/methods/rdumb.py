"""RDumb (Press et al., NeurIPS 2023): ETA that goes back to the source model every ``every`` batches.

A deliberately simple baseline for long continual streams: a periodic reset bounds how far any
collapse can go. Its authors use ETA's loss and filters and T = 1000 steps.
"""
from typing import Optional

from ..parts.resets import Periodic
from . import Cost, register
from .eata import eta_recipe


@register("rdumb", summary="ETA reset to the source every N steps",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def rdumb(model, *, every: int = 1000, margin_frac: float = 0.4, d_margin: float = 0.4,
          num_classes: Optional[int] = None):
    return eta_recipe(margin_frac, d_margin, num_classes).but(resets=[Periodic(every)])
