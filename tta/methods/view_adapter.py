"""The loop of the training-free CLIP view methods (ZERO, MTA, VTE): views of every image of a batch through
the image encoder as one batch (``chunk`` images' views per forward), then a method-specific aggregate of the
view features into one logit vector per image. Nothing is adapted and nothing persists between images, so
each image is its own episode without any reset; the view generator's seeds come from the adapter's
generator (:mod:`tta.parts.clip_views`), so ``reset()`` replays the same views.

Text side: the classifier's own class embeddings (its ``templates``), or, with the ``templates`` option, the
embeddings of another prompt set built once here (:func:`tta.models.clip_text.classifier_text`: ``single``,
``ensemble`` = CLIP's 80, and whatever named sets it knows).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..models.clip_text import classifier_text, prompt_set
from ..parts.clip_views import CLIPViews, image_seeds
from ..parts.norm import SourceStats

VIEW_OPTIONS = ("scale", "ratio", "flip", "severity", "mixture_width", "mixture_depth")


def check_classifier(model, method: str) -> None:
    """One clear error for a model that is not a CLIP zero-shot classifier."""
    if not all(hasattr(model, a) for a in ("encode_image", "logits_from_features", "text_features", "image_size")):
        raise ConfigError(f"{method} needs a CLIP zero-shot classifier (tta.models.load('openclip:...')), "
                          f"got {type(model).__name__}")


def make_views(model, policy: str, views: int, view_options: Optional[dict], chunk: int = 8) -> CLIPViews:
    """The shared view generator at the classifier's input size; ``view_options`` reach the recipe's constants
    (crop ``scale``/``ratio``, ``flip`` probability, AugMix ``severity``/``mixture_width``/``mixture_depth``).
    ``chunk`` (images per encoder forward, handed to ``CLIPViews.features``) is checked here too."""
    if not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk (images per encoder forward) must be an integer >= 1, got {chunk!r}")
    extra = dict(view_options or {})
    unknown = sorted(set(extra) - set(VIEW_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown view option(s) {unknown}; allowed: {', '.join(VIEW_OPTIONS)}")
    return CLIPViews(policy, views, model.image_size, **extra)


class ViewAdapter(Adapter):
    """Subclasses define ``aggregate(features (B, N, D), text (C, D), scale) -> logits (B, C)``."""

    def __init__(self, model, recipe: Recipe, *, views: int = 64, policy: str = "crop_flip", chunk: int = 8,
                 templates=None, view_options: Optional[dict] = None, **loop):
        check_classifier(model, type(self).__name__)
        view_gen = make_views(model, policy, views, view_options, chunk)
        super().__init__(model, recipe, **loop)
        self.view_gen = view_gen
        self.chunk = chunk
        self.templates = None if templates is None else prompt_set(templates)  # the prompts used, for the record
        text = None if templates is None else classifier_text(model, self.templates).to(model.logit_scale.device)
        self.register_buffer("own_text", text, persistent=False)

    def text_features(self) -> torch.Tensor:
        """``(C, D)`` class embeddings: the ``templates`` option's, else the classifier's current ones."""
        return self.model.text_features if self.own_text is None else self.own_text

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        seeds = image_seeds(self.generator, len(x))
        with torch.inference_mode():
            features = self.view_gen.features(self.model, x, seeds, self.chunk)
            out = self.aggregate(features, self.text_features(), self.model.logit_scale.exp())
        self.counters["views"] += features.shape[0] * features.shape[1]
        self.last = {"batch": len(x), "views": self.view_gen.views}
        return out

    def aggregate(self, features: torch.Tensor, text: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def view_recipe(adapter_cls: type, **options) -> Recipe:
    """The recipe of a training-free view method: source statistics, no parameters, its own loop."""
    return Recipe(norm=SourceStats(), adapter_cls=adapter_cls, options=options)


__all__ = ["ViewAdapter", "check_classifier", "make_views", "view_recipe", "VIEW_OPTIONS"]
