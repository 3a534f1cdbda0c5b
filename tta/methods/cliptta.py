"""CLIPTTA (Lafon et al., NeurIPS 2025; METHODS.md 3.9): soft batch contrastive TTA of CLIP's visual
LayerNorms, with a class-wise confident memory and, for open-set streams, the OCE threshold loss.

Per batch: (open set) Otsu-initialise the threshold on the batch's OOD scores; then ``steps`` (10)
inner steps of ``beta_tta (L_sc(batch_ID) + L_sc(memory)) - beta_reg (H(batch) + H(memory))
+ beta_ood L_OCE``, the batch's ID images entering the memory at the first step; the prediction is a
fresh forward after the steps. Defaults are the CIFAR-10 ones (K_shot 4, sample 40); CIFAR-100 and
open-set use 16/128 (configs/).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..adapter import Adapter, Batch, Recipe
from ..errors import ConfigError
from ..parts.clip_losses import ClassMemory, OutlierContrast, SoftContrastive, max_log_prob
from ..parts.norm import BatchStats
from ..parts.objectives import MarginalEntropyBonus
from ..parts.optim import OptimizerSpec
from ..parts.params import NormAffine
from . import Cost, register


class WithThreshold:
    """The visual norm affine parameters plus OCE's learnable threshold (one optimizer for both)."""

    def __init__(self, oce: OutlierContrast):
        self.oce = oce

    def __call__(self, model: nn.Module):
        return NormAffine()(model) + [("oce.alpha", self.oce.alpha)]


class CLIPTTAAdapter(Adapter):
    """The CLIPTTA loop; ``last_ood_score`` holds the OOD score (higher = ID) of the last prediction."""

    def __init__(self, model, recipe: Recipe, *, k_shot: int = 4, sample_size: int = 40,
                 beta_tta: float = 1.0, oce: Optional[OutlierContrast] = None, beta_ood: float = 0.1, **kw):
        if not hasattr(model, "logit_scale") or not hasattr(model, "num_classes"):
            raise ConfigError("cliptta needs a CLIP zero-shot classifier (tta.models.load('openclip:...'))")
        kw.setdefault("steps", 10)
        super().__init__(model, recipe, **kw)
        self.beta_tta, self.beta_ood, self.oce = beta_tta, beta_ood, oce
        self.per_class = max(1, sample_size // model.num_classes)
        self.memory = ClassMemory(model.num_classes, k_shot)
        self.last_ood_score: Optional[torch.Tensor] = None

    def reset_state(self) -> None:
        self.memory.reset()
        if self.oce is not None:
            with torch.no_grad():
                self.oce.alpha.zero_()

    def _contrastive(self, x: torch.Tensor, logits: torch.Tensor, id_mask: torch.Tensor) -> torch.Tensor:
        """``beta_tta L_sc`` on the ID rows, the marginal-entropy bonus on all rows."""
        loss = logits.new_zeros(())
        if id_mask.any():
            loss = self.beta_tta * self.recipe.objective(Batch(x[id_mask], logits[id_mask], self)).mean()
        batch = Batch(x, logits, self)
        return loss + sum(term(batch) for term in self.recipe.batch_terms)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.model.logit_scale.exp()
        if self.oce is not None:
            with torch.no_grad():
                self.oce.init_threshold(max_log_prob(self.model(x), scale))
        for step in range(self.steps):
            logits = self.model(x)
            scores = max_log_prob(logits, scale)
            id_mask = self.oce.is_id(scores) if self.oce is not None else torch.ones_like(scores, dtype=torch.bool)
            if step == 0:
                cos = (logits.detach() / scale)[id_mask].softmax(1).max(1)
                self.memory.add(x[id_mask].detach(), cos.indices, cos.values)
            loss = self._contrastive(x, logits, id_mask)
            sample = self.memory.sample(self.per_class, self.generator)
            if sample is not None:
                loss = loss + self._contrastive(sample, self.model(sample), torch.ones(len(sample), dtype=torch.bool))
            if self.oce is not None:
                loss = loss + self.beta_ood * self.oce(scores)
            if torch.isfinite(loss):
                self.backward(loss)
                self.optimizer_step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
                self.counters["nonfinite"] += 1
            self.last = {"selected": int(id_mask.sum()), "loss": float(loss.detach()), "batch": x.shape[0],
                         "memory": len(self.memory)}
        with torch.no_grad():
            logits = self.model(x)
        self.last_ood_score = max_log_prob(logits, scale)
        return logits


@register("cliptta", summary="soft contrastive loss between CLIP images and class texts",
          adapts="visual LayerNorm affine", cost=Cost(grad=10, backward=10, nograd=1))
def cliptta(model, *, k_shot: int = 4, sample_size: int = 40, beta_tta: float = 1.0, beta_reg: float = 1.0,
            open_set: bool = False, beta_ood: float = 0.1, gamma: float = 0.005, text_to_image: bool = False):
    """Visual LN affine of a CLIP classifier; Adam 1e-4 (eps 1e-6); 10 inner steps per batch."""
    oce = OutlierContrast(gamma) if open_set else None
    return Recipe(norm=BatchStats(), params=WithThreshold(oce) if oce is not None else NormAffine(),
                  objective=SoftContrastive(text_to_image), batch_terms=[MarginalEntropyBonus(beta_reg)],
                  optimizer=OptimizerSpec("adam", lr=1e-4, eps=1e-6), adapter_cls=CLIPTTAAdapter,
                  options=dict(k_shot=k_shot, sample_size=sample_size, beta_tta=beta_tta, oce=oce,
                               beta_ood=beta_ood))
