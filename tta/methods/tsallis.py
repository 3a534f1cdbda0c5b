"""Tsallis-entropy TTA and ADTE in classifier form (Wu et al., ICLR 2026; METHODS.md 3.8): TENT with
Shannon entropy replaced by Tsallis entropy, with a global q or with per-class q from an online
label-bias estimate (see :class:`~tta.parts.objectives.ClassDebiasedTsallis` for how ADTE's
single-image CLIP scoring becomes a batch TTA loss). The paper's final label adjustment is a
prediction rule, not part of the loss, and is not applied here.
"""
from ..parts.objectives import ClassDebiasedTsallis, Tsallis
from . import Cost, register
from .tent import tent_recipe


@register("tsallis", summary="minimise Tsallis entropy",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def tsallis(model, *, q: float = 0.1):
    return tent_recipe().but(objective=Tsallis(q))


@register("adte", summary="Tsallis entropy with class-debiased q from an online label-bias estimate",
          adapts="norm affine", cost=Cost(grad=1, backward=1, nograd=0))
def adte(model, *, memory: int = 20, gap: float = 1.0, q_range=(0.01, 0.9), min_entries: int = 100):
    return tent_recipe().but(objective=ClassDebiasedTsallis(memory, gap, tuple(q_range), min_entries))
