"""ADTE in its released CLIP form (Wu et al., ICLR 2026; METHODS.md 3.8, 6 item 6): no training;
per image, 64 views scored by the class-debiased Tsallis score, the 6 lowest kept, soft vote.

The label-bias memory, the per-class ``q`` and the score are those of
:class:`~tta.parts.objectives.ClassDebiasedTsallis` (memory entry = the view-averaged logits of an
image). ``bias="online"`` (default, the paper's description): each image is scored with the estimate
from the images before it, then added to the memory; Shannon entropy until 100 entries. ``bias=
"two_pass"`` (the released default, transductive): ``adapter.fit_bias(test_images)`` first fills the
memory from the whole test set, and the estimate is then frozen. ``label_adjust`` (default on, as in the
paper; off in the released main script) votes with ``softmax(z_v - b)``, ``b`` the estimated log prior.
Views: the shared CLIP generator (:mod:`tta.parts.clip_views`, crop-flip by default), the views of a whole
batch encoded together, each image's from its own seed (stream order, not batch size, decides them).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Adapter, Batch, Recipe
from ..errors import ConfigError
from ..parts.norm import SourceStats
from ..parts.objectives import ClassDebiasedTsallis
from ..parts.postprocess import build as build_postprocess
from ..parts.clip_views import image_seeds
from ..parts.view_select import select_lowest
from . import Cost, register
from .view_adapter import make_views

BIAS_MODES = ("online", "two_pass")


class ViewDebiasedTsallis(ClassDebiasedTsallis):
    """:class:`ClassDebiasedTsallis` that also keeps the log prior ``b`` it derives ``q`` from
    (label adjustment subtracts it from the view logits)."""

    def reset(self) -> None:
        super().reset()
        self.bias_estimate: Optional[torch.Tensor] = None

    def class_q(self, b: Optional[torch.Tensor] = None) -> torch.Tensor:
        self.bias_estimate = self.log_prior() if b is None else b
        return super().class_q(self.bias_estimate)


class ADTEViewsAdapter(Adapter):
    def __init__(self, model, recipe: Recipe, *, views: int = 64, keep: float = 0.1, bias: str = "online",
                 label_adjust: bool = True, score: Optional[ViewDebiasedTsallis] = None, sharpen=None,
                 policy: str = "crop_flip", chunk: int = 8, view_options=None, **kw):
        if bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        super().__init__(model, recipe, **kw)
        self.view_gen = make_views(model, policy, views, view_options, chunk)
        self.views, self.keep, self.bias, self.label_adjust, self.score = views, keep, bias, label_adjust, score
        self.chunk = chunk
        self.sharpen = build_postprocess(sharpen)
        self.fitted = False

    def reset_state(self) -> None:
        self.score.reset()
        self.fitted = False

    def _view_logits(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` logits of the views of ``images``, all encoded together (``chunk`` images per forward)."""
        seeds = image_seeds(self.generator, len(images))
        with torch.no_grad():
            return self.model.logits_from_features(self.view_gen.features(self.model, images, seeds, self.chunk))

    def fit_bias(self, images: torch.Tensor) -> None:
        """Two-pass mode: add the view-averaged logits of ``images`` (N, 3, H, W) to the memory; may be
        called on consecutive chunks of the test set before the first prediction."""
        for z in self._view_logits(images):
            self.score.remember(z.mean(0, keepdim=True))
        self.fitted = True

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias == "two_pass" and not self.fitted:
            raise ConfigError("adte_views with bias='two_pass' needs adapter.fit_bias(test_images) first")
        return torch.stack([self._predict(z) for z in self._view_logits(x)])

    def _predict(self, z: torch.Tensor) -> torch.Tensor:
        """The vote of one image's view logits ``z`` (N, C), scored with the memory of the images before it."""
        chosen = select_lowest(self.score(Batch(z, z, self, update_state=False)).unsqueeze(0), self.keep)[0]
        adjusted = z[chosen]
        if self.label_adjust and self.score.bias_estimate is not None and self.score.entries >= self.score.min_entries:
            adjusted = adjusted - self.score.bias_estimate.to(z.device)
        if self.sharpen is not None:  # e.g. em_inf: each view sharpened before the soft vote
            adjusted = self.sharpen(adjusted)
        vote = adjusted.softmax(1).mean(0)
        if self.bias == "online":
            self.score.remember(z.mean(0, keepdim=True))
        self.last = {"selected": chosen.numel(), "memory": self.score.entries, "batch": 1}
        return vote.clamp_min(1e-12).log()


@register("adte_views", summary="training-free debiased Tsallis scoring of 64 views per image",
          adapts="nothing", cost=Cost(nograd=64, params="none"), requires="clip")
def adte_views(model, *, views: int = 64, keep: float = 0.1, bias: str = "online", label_adjust: bool = True,
               memory: int = 20, gap: float = 1.0, q_range=(0.01, 0.9), min_entries: int = 100, sharpen=None,
               policy: str = "crop_flip", chunk: int = 8, view_options=None):
    """Training-free; ``min_entries`` applies to the online mode (two-pass scores with whatever it stored);
    ``sharpen``: a post-processor (``em_inf``) applied to each selected view's logits before the vote;
    ``policy``: the views (:mod:`tta.parts.clip_views`); ``chunk``: images per encoder forward (memory only)."""
    score = ViewDebiasedTsallis(memory, gap, tuple(q_range), min_entries if bias == "online" else 1)
    return Recipe(norm=SourceStats(), adapter_cls=ADTEViewsAdapter,
                  options=dict(views=views, keep=keep, bias=bias, label_adjust=label_adjust, score=score,
                               sharpen=sharpen, policy=policy, chunk=chunk, view_options=view_options))
