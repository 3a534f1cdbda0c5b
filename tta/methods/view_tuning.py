"""The per-image loop of the TPT family (METHODS.md 3.11, METHODS-VLM V.7, V.8, V.12), for methods that tune
something small on the text side (prompt context, class-prototype shifts) from the views of one image.

For a batch: the views of every image come from ONE call, :meth:`ViewTuningAdapter.encode_views` (the shared
generator of :mod:`tta.parts.clip_views`; DiffTPT adds its diffusion views there), and go through the frozen
image encoder together, ``chunk`` images' views per forward. Their features are computed once and reused by
every optimisation step and by the final prediction: the image tower never changes, so re-encoding would
only repeat the same numbers. Then, per image, episodically: restore the tuned tensors and the optimiser,
``steps`` times {logits of all views under the current text side, choose views (:meth:`select`), one update
(:meth:`update`)}, and predict the original view (view 0) with the tuned text side.

Randomness follows :mod:`tta.methods.tpt`: the reset before each batch also restores the generator, and every
image of the batch gets the first per-image seed, so an image's prediction depends on that image alone (not
on its batch or its position in the stream). Precision: the official runs use CUDA autocast with a
GradScaler (init scale 1000); here the loop is in the model's own dtype, where loss scaling changes nothing
but the step skipped on a non-finite gradient, which this loop does too (a non-finite loss takes no step and
is counted in ``counters["nonfinite"]``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..parts.clip_views import image_seeds
from ..parts.objectives import view_marginal_entropy
from ..parts.view_select import confident_count, select_confident
from .view_adapter import check_classifier, make_views


class ViewTuningAdapter(Adapter):
    """``model`` holds ``classifier`` (the CLIP zero-shot classifier) and ``text_features()``, the differentiable
    ``(C, D)`` class embeddings the method tunes. Subclasses change :meth:`encode_views`, :meth:`select`,
    :meth:`loss` or :meth:`update`; ``reselect`` chooses the views again at every step (TPS) instead of once
    at the first step (TPT, C-TPT, DiffTPT)."""

    reselect = False

    def __init__(self, model: nn.Module, recipe: Recipe, *, views: int = 64, keep: float = 0.1,
                 policy: str = "crop_flip", chunk: int = 8, view_options: Optional[dict] = None, **loop):
        check_classifier(model.classifier, type(self).__name__)
        if not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk (images per encoder forward) must be an integer >= 1, got {chunk!r}")
        confident_count(views, keep)  # one clear error for a bad kept fraction
        super().__init__(model, recipe, **loop)
        self.view_gen = make_views(model.classifier, policy, views, view_options)
        self.keep, self.chunk = keep, chunk

    @property
    def classifier(self) -> nn.Module:
        return self.model.classifier

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.reset()  # as before every image: each image's views come from the same seed
        seeds = image_seeds(self.generator, 1).expand(len(x))
        with torch.no_grad():
            features = self.encode_views(x, seeds)
        self.counters["views"] += features.shape[0] * features.shape[1]
        return torch.cat([self.tune_and_predict(u) for u in features])

    def encode_views(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        """``(B, N, D)`` normalised features of every view of ``x`` (view 0 the original): the one place views
        are made."""
        return self.view_gen.features(self.classifier, x, seeds, self.chunk)

    def select(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Indices of the views the loss reads: the ``floor(keep N)`` lowest-entropy ones (``Sel_rho``)."""
        return select_confident(logits.unsqueeze(0), self.keep)[0]

    def loss(self, kept: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """TPT's loss: the entropy of the mean prediction of the kept views."""
        return view_marginal_entropy(kept)

    def update(self, kept: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One optimiser step on :meth:`loss`; returns the loss (detached)."""
        loss = self.loss(kept, text)
        self.step_on(loss)
        return loss.detach()

    def step_on(self, loss: torch.Tensor) -> None:
        """Backward and one optimiser step, skipped (and counted) for a non-finite loss."""
        if not torch.isfinite(loss.detach()):
            self.counters["nonfinite"] += 1
            self.optimizer.zero_grad(set_to_none=True)
            return
        self.backward(loss)
        self.optimizer_step()

    def tune_and_predict(self, u: torch.Tensor) -> torch.Tensor:
        """One image's episode on its view features ``u`` (N, D): logits ``(1, C)`` of view 0 after tuning."""
        self.reset()
        clf, chosen, loss = self.classifier, None, None
        for _ in range(self.steps):
            text = self.model.text_features()
            logits = clf.logits_from_features(u, text)
            if chosen is None or self.reselect:
                chosen = self.select(logits.detach(), u)
            loss = self.update(logits[chosen], text)
        self.last = {"selected": int(chosen.numel()) if chosen is not None else 0,
                     "loss": None if loss is None else float(loss), "views": u.shape[0]}
        with torch.no_grad():
            return clf.logits_from_features(u[:1], self.model.text_features())


__all__ = ["ViewTuningAdapter"]
