"""DPE (Zhang et al., NeurIPS 2024; METHODS-VLM V.9): dual prototype evolving for CLIP.

State over the stream: global text prototypes ``W_g`` (start: the zero-shot classifier) and a TDA-style
positive cache (3 per class, priority ``h = H/log2(C)``). Per image, in stream order:

1. aggregate the views under ``W' = rownorm(W_g)`` as TDA does (mean of the 10 % lowest-entropy features
   ``f``, not re-normalised; their mean logits; entropy of the mean probability; pseudo-label);
2. offer ``(f, h)`` to the cache; the visual prototypes are the mean cached key of each present class;
3. optimise two zero-initialised residuals, ``R_t`` on the text prototypes and ``R_v`` on the visual ones,
   ``steps`` (1) AdamW steps (eps 1e-3, weight decay 0.1, a fresh optimiser per image) on
   ``H(softmax(z + alpha sum_c phi_beta(f . v'_c) onehot(c))) + align * InfoNCE(V', W'_cached)``;
4. predict with the updated residuals: ``z + alpha sum_c phi_beta(q . v'_c) onehot(c)``, query ``q`` the
   original view (``query="original"``) or the re-selected view aggregate under the new ``W'``
   (``query="views"``, the official ImageNet-A rule);
5. if that prediction's ``H/log2(C) < 0.1``, fold the updated ``W'`` into ``W_g``'s cumulative mean
   (:class:`~tta.parts.prototype_bank.EvolvingPrototypes`); ``R_v`` is never kept.

Paper vs official code: the official code applies the ImageNet-A-only 64-view query by a data-set test; here
``query`` (default ``original``, what it does on every other set). It back-propagates through the frozen
image encoder; here the features are constants (same numbers, no encoder backward). Its CLIP, features,
prototypes and residuals are fp16 (AdamW without a gradient scaler); here fp32 by default, ``fp16=True`` for
the official half-precision features, prototypes, cache and residuals (the model's own precision is the
model's). The view features are computed once and reused by the inference query.

Defaults: the official ImageNet (I) values (alpha 6, beta 5, lr 6e-4 for both residuals, align 0.5) and its
64 AugMix views (I, A/V2/R/Sketch; the CoOp sets use ``views=1``); per-dataset table: METHODS-VLM V.9.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..parts.cache import ClassCache
from ..parts.objectives import entropy
from ..parts.optim import OptimizerSpec
from ..parts.prototype_bank import EvolvingPrototypes, cache_prototypes, info_nce, prototype_affinity
from ..parts.tip_caches import normalised_entropy
from . import Cost, register
from .clip_online import OnlineCLIPAdapter, aggregate, online_recipe

QUERIES = ("original", "views")


class DPEAdapter(OnlineCLIPAdapter):
    def __init__(self, model, recipe, *, alpha: float = 6.0, beta: float = 5.0, capacity: int = 3,
                 align: float = 0.5, temperature: float = 0.01, lr_image: Optional[float] = None,
                 evolve_below: float = 0.1, query: str = "original", fp16: bool = False,
                 optimizer: Optional[OptimizerSpec] = None, **kw):
        if query not in QUERIES:
            raise ConfigError(f"query must be one of {QUERIES}, got {query!r}")
        if not (alpha >= 0 and beta >= 0 and align >= 0 and temperature > 0):
            raise ConfigError(f"dpe needs alpha, beta, align >= 0 and temperature > 0, got {alpha}, {beta}, "
                              f"{align}, {temperature}")
        super().__init__(model, recipe, optimizer=optimizer, **kw)
        self.spec = optimizer or recipe.optimizer
        self.alpha, self.beta, self.align, self.temperature = alpha, beta, align, temperature
        self.lr_image = self.spec.lr if lr_image is None else lr_image
        self.evolve_below, self.query = evolve_below, query
        self.dtype = torch.float16 if fp16 else self.text.dtype
        self.prototypes = EvolvingPrototypes(self.text.to(self.dtype))
        self.cache = ClassCache(capacity, self.num_classes)

    def reset_state(self) -> None:
        self.prototypes.reset()
        self.cache.reset()

    def stream(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.image(views) for views in features.to(self.dtype)]).float()

    def cache_logits(self, query, classes, prototypes, residual) -> torch.Tensor:
        """``alpha sum_c phi_beta(q . v'_c) onehot(c)`` with ``V' = rownorm(V + R_v)``."""
        v = F.normalize(prototypes + residual, dim=-1)
        return prototype_affinity(query, v, classes, self.num_classes, self.alpha, self.beta)

    def residual_steps(self, feature, classes, prototypes) -> tuple:
        """``steps`` AdamW steps from zero on ``(R_t, R_v)`` for this image; the residuals after them."""
        r_t = torch.zeros_like(self.prototypes.weights, requires_grad=True)
        r_v = torch.zeros_like(prototypes, requires_grad=True)
        opt = self.spec.build([{"params": [r_t]}, {"params": [r_v], "lr": self.lr_image}])
        for _ in range(self.steps):
            text = self.prototypes.current(r_t)
            logits = self.view_logits(feature, text) + self.cache_logits(feature, classes, prototypes, r_v)
            loss = entropy(logits).sum()
            if self.align:  # InfoNCE normalises V + R_v itself
                loss = loss + self.align * info_nce(prototypes + r_v, text[classes], self.temperature)
            opt.zero_grad()
            loss.backward()
            opt.step()
            self.counters["steps"] += 1
        return r_t.detach(), r_v.detach()

    def image(self, views: torch.Tensor) -> torch.Tensor:
        agg = aggregate(views[None], self.view_logits(views, self.prototypes.current())[None], self.keep)
        self.cache.insert(int(agg.label[0]), agg.feature[0], normalised_entropy(float(agg.entropy[0]),
                                                                                self.num_classes))
        classes, prototypes = cache_prototypes(self.cache)
        r_t, r_v = self.residual_steps(agg.feature, classes, prototypes)
        with torch.no_grad():
            text = self.prototypes.current(r_t)
            if self.query == "views":
                query = aggregate(views[None], self.view_logits(views, text)[None], self.keep).feature
            else:
                query = views[:1]
            logits = self.view_logits(query, text) + self.cache_logits(query, classes, prototypes, r_v)
            if normalised_entropy(float(entropy(logits)[0]), self.num_classes) < self.evolve_below:
                self.prototypes.evolve(text)
        return logits


@register("dpe", summary="evolving text prototypes + cached visual prototypes with per-image residuals (CLIP)",
          adapts="text prototypes (C x D), feature cache (3 per class); per-image residuals",
          cost=Cost(nograd=64, backward=1, params="none"), requires="clip")
def dpe(model, *, views: int = 64, policy: str = "augmix", keep: float = 0.1, chunk: int = 8, templates=None,
        cupl=None, view_options=None, alpha: float = 6.0, beta: float = 5.0, capacity: int = 3, align: float = 0.5,
        temperature: float = 0.01, lr_image: Optional[float] = None, evolve_below: float = 0.1,
        query: str = "original", fp16: bool = False):
    """AdamW (lr 6e-4 = ``lr_text``, eps 1e-3, weight decay 0.1; set with the common ``lr``/``eps``/...),
    ``steps`` 1; ``lr_image`` (default = lr); ``align``: InfoNCE weight (temperature 0.01); ``evolve_below``:
    the ``H/log2(C)`` gate of the text evolution; ``query``: ``original`` or ``views`` (official ImageNet-A);
    ``fp16``: the official half-precision prototypes, cache and residuals;
    views/text options as TDA's (official prompts: TDA's templates + CuPL sentences via ``cupl``)."""
    options = {k: v for k, v in locals().items() if k != "model"}
    return online_recipe(DPEAdapter, OptimizerSpec("adamw", lr=6e-4, eps=1e-3, weight_decay=0.1), **options)


__all__ = ["DPEAdapter", "dpe"]
