"""ADTE in its released CLIP form (Wu et al., ICLR 2026; METHODS.md 3.8, 6 item 6): no training;
per image, 64 views scored by the class-debiased Tsallis score, the 6 lowest kept, soft vote.

The label-bias memory, the per-class ``q`` and the score are those of
:class:`~tta.parts.objectives.ClassDebiasedTsallis` (memory entry = the view-averaged logits of an
image). ``bias="online"`` (default, the paper's description): each image is scored with the estimate
from the images before it, then added to the memory; Shannon entropy until 100 entries. ``bias=
"two_pass"`` (the released default, transductive): ``adapter.fit_bias(test_images)`` first fills the
memory from the whole test set, and the estimate is then frozen. ``label_adjust`` (default on, as in the
paper; off in the released main script) votes with ``softmax(z_v - b)``, ``b`` the estimated log prior.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Adapter, Batch, Recipe
from ..errors import ConfigError
from ..parts.norm import SourceStats
from ..parts.objectives import ClassDebiasedTsallis
from ..parts.postprocess import build as build_postprocess
from ..parts.views import augmented_views, lowest
from . import Cost, register

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
                 label_adjust: bool = True, score: Optional[ViewDebiasedTsallis] = None, sharpen=None, **kw):
        if bias not in BIAS_MODES:
            raise ConfigError(f"bias must be one of {BIAS_MODES}, got {bias!r}")
        super().__init__(model, recipe, **kw)
        self.views, self.keep, self.bias, self.label_adjust, self.score = views, keep, bias, label_adjust, score
        self.sharpen = build_postprocess(sharpen)
        self.fitted = False

    def reset_state(self) -> None:
        self.score.reset()
        self.fitted = False

    def _view_logits(self, image: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(augmented_views(image, self.views, self.model.image_size, self.generator))

    def fit_bias(self, images: torch.Tensor) -> None:
        """Two-pass mode: add the view-averaged logits of ``images`` (N, 3, H, W) to the memory; may be
        called on consecutive chunks of the test set before the first prediction."""
        for image in images:
            self.score.remember(self._view_logits(image).mean(0, keepdim=True))
        self.fitted = True

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias == "two_pass" and not self.fitted:
            raise ConfigError("adte_views with bias='two_pass' needs adapter.fit_bias(test_images) first")
        return torch.stack([self._predict(image) for image in x])

    def _predict(self, image: torch.Tensor) -> torch.Tensor:
        z = self._view_logits(image)
        chosen = lowest(self.score(Batch(image, z, self, update_state=False)), self.keep)
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
          adapts="nothing", cost=Cost(nograd=64, params="none"))
def adte_views(model, *, views: int = 64, keep: float = 0.1, bias: str = "online", label_adjust: bool = True,
               memory: int = 20, gap: float = 1.0, q_range=(0.01, 0.9), min_entries: int = 100, sharpen=None):
    """Training-free; ``min_entries`` applies to the online mode (two-pass scores with whatever it stored);
    ``sharpen``: a post-processor (``em_inf``) applied to each selected view's logits before the vote."""
    score = ViewDebiasedTsallis(memory, gap, tuple(q_range), min_entries if bias == "online" else 1)
    return Recipe(norm=SourceStats(), adapter_cls=ADTEViewsAdapter,
                  options=dict(views=views, keep=keep, bias=bias, label_adjust=label_adjust, score=score,
                               sharpen=sharpen))
