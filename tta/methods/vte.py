"""VTE (Döbler et al., "A Lost Opportunity for Vision-Language Models", CVPR 2024 MAT workshop; METHODS-VLM
V.6): an ensemble in text space (a prompt ensemble, CLIP's 80 templates) and in image space (the mean
feature of the 6 most confident of 64 views). Per image: ``S`` = the ``floor(rho N)`` lowest-entropy views,
``f = mean_{v in S} f_v`` (not re-normalised, as the official code: the arg-max does not change, the logits
shrink by ``|f| <= 1``; ``normalize=True`` re-normalises), output ``s W^T f``.

Views: crop-flip (the official choice for ImageNet and its variants and ImageNet-C/CCC); the official code
uses AugMix views (``policy: augmix``) on the 10 fine-grained CoOp sets.

Templates: ``ensemble`` (the 80 CLIP templates) by default, any named set or list otherwise. The official
code looks up per-data-set lists by the first ``_``-token of the data-set name and silently falls back to
the 80 ImageNet templates for Pets, Cars, Aircraft, Flowers and UCF101; here the set is whatever the
``templates`` option says (the 80 templates unless a config names another), recorded in
``adapter.templates``. Precision: the official runs open_clip in fp16; here the classifier's own dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..parts.view_select import confident_count, mean_features, select_confident, take
from . import Cost, register
from .view_adapter import ViewAdapter, view_recipe


class VTEAdapter(ViewAdapter):
    def __init__(self, model, recipe, *, rho: float = 0.1, normalize: bool = False, **kw):
        confident_count(64, rho)  # one clear error for a bad rho
        super().__init__(model, recipe, **kw)
        self.rho, self.normalize = rho, normalize

    def aggregate(self, features: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        chosen = select_confident(scale * features @ text.t(), self.rho)
        mean = mean_features(take(features, chosen))
        return scale * (F.normalize(mean, dim=-1) if self.normalize else mean) @ text.t()


@register("vte", summary="prompt ensemble + mean feature of the 6 most confident of 64 views",
          adapts="nothing", cost=Cost(nograd=64, params="none"), requires="clip")
def vte(model, *, views: int = 64, rho: float = 0.1, normalize: bool = False, policy: str = "crop_flip",
        templates="ensemble", chunk: int = 8, view_options=None):
    """``rho``: kept fraction of the views; ``normalize``: re-normalise the mean feature (the official does not);
    ``policy``: ``crop_flip`` (ImageNet family) or ``augmix`` (fine-grained sets, officially); ``templates``:
    the prompt ensemble (None = the classifier's own prompts); ``chunk``: images per encoder forward."""
    return view_recipe(VTEAdapter, views=views, rho=rho, normalize=normalize, policy=policy, templates=templates,
                       chunk=chunk, view_options=view_options)
