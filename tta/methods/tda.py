"""TDA (Karmanov et al., CVPR 2024; METHODS-VLM V.1): training-free dynamic adapter for CLIP.

Per image, in stream order: aggregate the views (the 10 % of lowest entropy: mean feature, not
re-normalised; mean logits ``z``; entropy of the mean probability ``H``; pseudo-label ``argmax z``; one view:
that view), offer ``(f, H)`` to the positive cache of the pseudo-class (3 per class) and, when
``0.2 < H/log2(C) < 0.5``, ``(f, H, p)`` to the negative cache (2 per class), then score the image against
both caches, itself included (:mod:`tta.parts.tip_caches`). Nothing is trained; the caches persist over the
stream until ``reset()``.

Paper and official code agree on the algorithm; the official choices kept as defaults: the insert-before-read
order, entropy priorities in nats against a gate in ``H/log2(C)``, un-normalised mean features on both sides
of the kernel. Official quirks offered as options, off by default: ``fp16`` (the official runs cast CLIP to
fp16, so features, caches and cache logits are half precision; here it casts features and text to fp16 before
aggregation and caching; the model's own precision is the model's). The ``"sh"`` file-name filter of the
official loaders is a data-set matter (``sh_filter`` of the data loaders), not the method's.

Defaults are the official ImageNet (I) and ImageNet-A values (alpha+ 2, beta+ 5) with the A/V2/R/Sketch view
recipe (64 AugMix views); the official ImageNet and CoOp runs use one view (``views=1``). Per-dataset
alpha+/beta+: METHODS-VLM V.1 table (e.g. V2 and R 1/8, Sketch 2.363/7.45, DTD 2/3).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..parts.tip_caches import TipCaches
from . import Cost, register
from .clip_online import OnlineCLIPAdapter, ViewAggregate, aggregate, online_recipe


class TDAAdapter(OnlineCLIPAdapter):
    def __init__(self, model, recipe, *, pos_alpha: float = 2.0, pos_beta: float = 5.0, pos_capacity: int = 3,
                 neg_capacity: int = 2, neg_alpha: float = 0.117, neg_beta: float = 1.0,
                 entropy_band: Sequence[float] = (0.2, 0.5), mask_band: Sequence[float] = (0.03, 1.0),
                 negative: bool = True, fp16: bool = False, **kw):
        super().__init__(model, recipe, **kw)
        self.fp16 = bool(fp16)
        self.caches = TipCaches(self.num_classes, pos_capacity=pos_capacity, neg_capacity=neg_capacity,
                                pos_alpha=pos_alpha, pos_beta=pos_beta, neg_alpha=neg_alpha, neg_beta=neg_beta,
                                entropy_band=entropy_band, mask_band=mask_band, negative=negative)

    def reset_state(self) -> None:
        self.caches.reset()

    def precision(self, features: torch.Tensor) -> torch.Tensor:
        """The view features as the caches see them: half precision with ``fp16`` (official), else as they are."""
        return features.half() if self.fp16 else features

    def cached_logits(self, features: torch.Tensor) -> tuple:
        """The view features, their logits and their aggregate, at the caches' precision."""
        features = self.precision(features)
        logits = self.view_logits(features, self.text.to(features))
        return features, logits, aggregate(features, logits, self.keep)

    def insert(self, agg: ViewAggregate, i: int) -> None:
        """Image ``i`` of the batch enters the caches (before it is scored)."""
        self.caches.update(int(agg.label[i]), agg.feature[i], float(agg.entropy[i]), agg.probs[i])

    def stream(self, features: torch.Tensor) -> torch.Tensor:
        _, _, agg = self.cached_logits(features)
        out = []
        for i in range(len(features)):
            self.insert(agg, i)
            out.append(self.caches.logits(agg.logits[i:i + 1], agg.feature[i:i + 1]))
        return torch.cat(out).float()


@register("tda", summary="training-free positive/negative feature caches of confident test images (CLIP)",
          adapts="feature caches (3 + 2 per class)", cost=Cost(nograd=64, params="none"), requires="clip")
def tda(model, *, views: int = 64, policy: str = "augmix", keep: float = 0.1, chunk: int = 8, templates=None,
        cupl=None, view_options=None, pos_alpha: float = 2.0, pos_beta: float = 5.0, pos_capacity: int = 3,
        neg_capacity: int = 2, neg_alpha: float = 0.117, neg_beta: float = 1.0,
        entropy_band: Sequence[float] = (0.2, 0.5), mask_band: Sequence[float] = (0.03, 1.0), negative: bool = True,
        fp16: bool = False):
    """``views``/``policy``/``keep``: the view recipe (64 AugMix, 10 %; ``views=1`` for the official ImageNet and
    CoOp runs); ``chunk``: images per encoder forward (memory only); ``view_options``: the view generator's
    constants; ``templates``/``cupl``: the text classifier (default the classifier's own; official: ``tip7`` for
    I/A/V2, ``clip80`` for R/Sketch); ``pos_*``/``neg_*``: cache sizes and kernels; ``entropy_band`` in
    ``H/log2(C)``; ``mask_band`` on the cached probabilities; ``negative=False`` drops the negative cache (ablation); ``fp16``: the official half-precision caches."""
    return online_recipe(TDAAdapter, **{k: v for k, v in locals().items() if k != "model"})


__all__ = ["TDAAdapter", "tda"]
