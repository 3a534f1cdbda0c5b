"""TTAug (METHODS-ZOO Z.2): predict the mean logits of an image's plain view and 32 AUG-MIX views, every BN
layer in N-alpha (alpha 0.1) over those 33 views; nothing is adapted.

The reference runs it at batch size 1 (at a larger batch it would average ONE prediction over the views
of all images of the batch, Z.2 pitfall); here every image of a batch is handled as the reference handles
a batch of one: its 33 views form their own BN group (:func:`tta.parts.per_image.view_average`), all
images in one forward per ``chunk`` of images (``chunk`` bounds memory and keeps activations in cache;
the draws are made for the whole batch, so results do not depend on it). ``quantize`` (default True, as
the reference's loader) floors the plain view and the views' base image to the 8-bit grid
(:mod:`tta.parts.augmix`); on the REFERENCE.md dev stream it hardly matters (mean error 33.13 with it,
33.11 without; the reference 32.96). Deviation on ImageNet: the reference's plain view of a torchvision model is
Resize(256) + CenterCrop(224) of the image; here it is the image as the stream delivers it.

Its own loop (:class:`AugMixAdapter`) because the recipe loop forwards the batch itself, not views of it.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..parts.augmix import view_chunks
from ..parts.per_image import GroupedAlphaStats, view_average
from . import Cost, register


class AugMixAdapter(Adapter):
    """An adapter that sees each image through ``views`` AUG-MIX views (TTAug, MEMO), drawn from its
    generator, built ``chunk`` images at a time."""

    def __init__(self, model, recipe: Recipe, *, views: int = 32, quantize: bool = True, severity: float = 1.0,
                 mixture_width: int = 3, mixture_depth: Optional[int] = None, chunk: int = 8, **loop):
        if views < 1 or chunk < 1:
            raise ConfigError(f"views and chunk must be >= 1, got {views}, {chunk}")
        super().__init__(model, recipe, **loop)
        self.views, self.chunk = views, chunk
        self.view_options = dict(quantize=quantize, severity=severity, mixture_width=mixture_width,
                                 mixture_depth=mixture_depth)

    def view_chunks(self, x: torch.Tensor):
        """(slice, plain views, AUG-MIX views) per chunk of images of ``x``, see :func:`view_chunks`."""
        return view_chunks(x, self.views, self.generator, self.chunk, **self.view_options)


class TTAugAdapter(AugMixAdapter):
    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        out = []
        with torch.inference_mode():
            for _, plain, views in self.view_chunks(x):
                out.append(view_average(self.model, torch.cat([plain.unsqueeze(1), views], 1)))
        self.counters["views"] += len(x) * (self.views + 1)
        return torch.cat(out)


@register("ttaug", summary="mean logits over the plain view and 32 AUG-MIX views, N-alpha per image",
          adapts="nothing (per-image BN statistics)", cost=Cost(nograd=33, params="none"))
def ttaug(model, *, views: int = 32, alpha: float = 0.1, quantize: bool = True, severity: float = 1.0,
          mixture_width: int = 3, mixture_depth: Optional[int] = None, chunk: int = 8):
    """``views``: AUG-MIX views per image (plus the plain one); ``alpha``: N-alpha weight of each image's
    view statistics; ``quantize``: floor to the 8-bit grid as the reference's loader; ``severity``,
    ``mixture_width``, ``mixture_depth`` (None: U{1, 2, 3}): AUG-MIX; ``chunk``: images per forward."""
    return Recipe(norm=GroupedAlphaStats(alpha), adapter_cls=TTAugAdapter,
                  options=dict(views=views, quantize=quantize, severity=severity, mixture_width=mixture_width,
                               mixture_depth=mixture_depth, chunk=chunk))
