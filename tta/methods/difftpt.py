"""DiffTPT (Feng et al., ICCV 2023; METHODS-VLM V.12): TPT with diffusion-generated views and a cosine filter.

Per image, episodically, TPT's prompt tuning (:mod:`tta.methods.tpt`: 4 CoOp context vectors, AdamW lr 5e-3,
weight decay 0.01) on 1 + 64 + 63 = 128 views: the original, 64 conventional views (crop-flip for the ImageNet
family, ``policy: augmix`` for the fine-grained sets: TPT's rule) and 63 images from a generator
(:mod:`tta.parts.diffusion_views`: Stable Diffusion image variations, guidance 3, or any callable
``views(images, n)``). All 128 go through the frozen image encoder once. At the first of ``steps`` (4) steps
the views are filtered in two stages (:func:`cosine_then_entropy`) and kept for every step: the ``floor(0.8 x
127) = 101`` views most cosine-similar to the original, then of those plus the original the ``floor(0.3 x 102)
= 30`` lowest-entropy ones; the loss is the entropy of their mean prediction. Prediction: the original view
with the tuned prompt.

Paper vs official code, each an option (defaults: the paper's intent):

* ``filter_space``: the paper keeps the generated data most similar to the test image: here the cosine between
  the CLIP image features of a view and of the original (``features``, prompt-independent). The official
  code takes the cosine between the views' LOGIT vectors under the current prompt (``logits``).
* the official code generates offline (65 variations per image, 63 used, unseeded) for a 1 000-image
  ImageNet-R subset; the subset is the data loader's business, generation here is online and seeded.
* the paper describes the cosine filter on the generated views and the entropy selection on the conventional
  ones as two parallel filters; the released code (followed here) filters all views by cosine, then by
  entropy; the paper's parallel variant is not specified precisely enough to implement.

The generator is built at construction: the default ``sd_image_variations`` reads a local diffusers folder
(``diffusion_weights``, else ``<data root>/models/sd-image-variations-diffusers``) and raises one
:class:`~tta.errors.MissingFileError` where it is absent; ``generator=None`` with ``diffusion_views=0`` runs the
filter and schedule on conventional views alone (an ablation).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapter import Recipe
from ..errors import ConfigError
from ..imageops import resize_center_crop
from ..parts.diffusion_views import build_generator, generate
from ..parts.norm import SourceStats
from ..parts.objectives import Entropy
from ..parts.optim import OptimizerSpec
from ..parts.view_select import confident_count, select_confident, select_lowest
from . import Cost, register
from .tpt import PromptTuned
from ..parts.params import OwnParameter
from .view_tuning import ViewTuningAdapter

FILTER_SPACES = ("features", "logits")


def cosine_then_entropy(logits: torch.Tensor, space: torch.Tensor, cosine_keep: float = 0.8,
                        entropy_keep: float = 0.3) -> torch.Tensor:
    """DiffTPT's two-stage selection on one image's views (view 0 the original): of views 1..N-1, the
    ``floor(cosine_keep (N-1))`` with the highest cosine between their row of ``space`` (N, K) and view 0's
    (ties: lower view index first); then, of view 0 and those, the ``floor(entropy_keep |candidates|)``
    lowest-entropy rows of ``logits`` (N, C). Returns view indices, lowest entropy first."""
    similarity = F.cosine_similarity(space[:1], space[1:], dim=-1)
    near = select_lowest(-similarity.unsqueeze(0), cosine_keep)[0] + 1
    candidates = torch.cat([near.new_zeros(1), near])
    return candidates[select_confident(logits[candidates].unsqueeze(0), entropy_keep)[0]]


class DiffTPTAdapter(ViewTuningAdapter):
    def __init__(self, model, recipe, *, generator="sd_image_variations", diffusion_views: int = 63,
                 diffusion_weights=None, guidance_scale: float = 3.0, diffusion_steps: int = 50,
                 diffusion_dtype: str = "float32", cosine_keep: float = 0.8, filter_space: str = "features",
                 ctx_init: str = "a photo of a", **kw):
        if filter_space not in FILTER_SPACES:
            raise ConfigError(f"filter_space must be one of {FILTER_SPACES}, got {filter_space!r}")
        if not isinstance(diffusion_views, int) or diffusion_views < 0:
            raise ConfigError(f"diffusion_views must be an integer >= 0, got {diffusion_views!r}")
        if generator is None and diffusion_views:
            raise ConfigError("generator=None makes no diffusion views: set diffusion_views=0, or pass a generator")
        confident_count(100, cosine_keep)  # one clear error for a bad fraction
        kw.setdefault("steps", 4)
        super().__init__(PromptTuned(model, ctx_init), recipe, **kw)
        self.generator_spec = dict(generator=generator if diffusion_views else None, weights=diffusion_weights,
                                   guidance_scale=guidance_scale, steps=diffusion_steps, dtype=diffusion_dtype)
        self.diffusion = build_generator(**self.generator_spec, device=model.logit_scale.device)
        self.diffusion_views, self.cosine_keep, self.filter_space = diffusion_views, cosine_keep, filter_space

    def __getstate__(self):
        """A generator loaded from its folder is left out of pickles (the runner's checkpoints): gigabytes of
        Stable Diffusion weights would be rewritten after every domain; it is loaded again on unpickling."""
        state = dict(self.__dict__)
        if isinstance(self.generator_spec["generator"], str):
            state["diffusion"] = None
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.diffusion is None and self.diffusion_views:
            self.diffusion = build_generator(**self.generator_spec, device=self.classifier.logit_scale.device)

    def encode_views(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """The conventional views (original first) then the generated ones, ``chunk`` images per encoder forward."""
        clf, out = self.classifier, []
        for start in range(0, len(x), self.chunk):
            part, part_seeds = x[start:start + self.chunk], seeds[start:start + self.chunk]
            views = self.view_gen(part, part_seeds)
            if self.diffusion_views:
                made = torch.cat([generate(self.diffusion, image[None], self.diffusion_views, int(seed))
                                  for image, seed in zip(part, part_seeds)])
                made = resize_center_crop(made.flatten(0, 1), clf.image_size).view(*made.shape[:3], *views.shape[-2:])
                views = torch.cat([views, made.to(views.dtype)], 1)
            out.append(clf.encode_image(views.flatten(0, 1)).view(len(part), views.shape[1], -1))
        return torch.cat(out)

    def select(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        space = features if self.filter_space == "features" else logits
        return cosine_then_entropy(logits, space, self.cosine_keep, self.keep)


@register("difftpt", summary="TPT on conventional + diffusion-generated views with a cosine filter (DiffTPT)",
          adapts="prompt context vectors", cost=Cost(grad=128, backward=4, nograd=1, params="all"), requires="clip")
def difftpt(model, *, generator="sd_image_variations", views: int = 65, diffusion_views: int = 63,
            diffusion_weights=None, guidance_scale: float = 3.0, diffusion_steps: int = 50,
            diffusion_dtype: str = "float32", cosine_keep: float = 0.8, keep: float = 0.3,
            filter_space: str = "features", ctx_init: str = "a photo of a", policy: str = "crop_flip", chunk: int = 8,
            view_options=None):
    """4 AdamW steps (lr 5e-3, weight decay 0.01) per image on 4 prompt vectors; ``views``: conventional views
    including the original (65 = 1 + 64); ``diffusion_views`` (63) from ``generator``; ``cosine_keep`` (0.8)
    then ``keep`` (0.3, entropy); ``filter_space``: ``features`` (paper) or ``logits`` (official code);
    ``guidance_scale``/``diffusion_steps``/``diffusion_dtype``/``diffusion_weights``: the Stable Diffusion
    generator's; ``chunk``: images per encoder forward (memory only)."""
    return Recipe(norm=SourceStats(), params=OwnParameter("ctx"), objective=Entropy(),
                  optimizer=OptimizerSpec("adamw", lr=5e-3, weight_decay=0.01), adapter_cls=DiffTPTAdapter,
                  options=dict(generator=generator, views=views, diffusion_views=diffusion_views,
                               diffusion_weights=diffusion_weights, guidance_scale=guidance_scale,
                               diffusion_steps=diffusion_steps, diffusion_dtype=diffusion_dtype,
                               cosine_keep=cosine_keep, keep=keep, filter_space=filter_space, ctx_init=ctx_init,
                               policy=policy, chunk=chunk, view_options=view_options))
