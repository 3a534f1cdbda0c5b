"""FOA (Niu et al., ICML 2024; METHODS-ZOO Z.15): forward-only adaptation of a Vision Transformer.

No backward pass and no weight changes: CMA-ES searches ``n_prompts`` input prompt tokens whose
features make the batch's predictions confident (summed entropy) and its class-token statistics at
every block match those of clean source data; the final class-token feature is also shifted towards the
source mean by an EMA of the batch means. Per batch: the 27 CMA-ES candidates plus the best prompt so
far (re-evaluated on this batch) are each one forward of the batch; the best one's shifted output is
returned and all 28 are told to CMA-ES.

FOA needs its own loop (a population of forwards per batch, no gradient); :class:`FOAAdapter`. Source
statistics (per-dimension mean and unbiased std of the prompt-free class-token features) come from
``source_images`` (labels unused); the official code uses the whole ImageNet validation set, the
configs take a seeded random subset (``source: {dataset: imagenet_val, n: ...}``).
Defaults: popsize 27, sigma0 1, CMA-ES seed 2020, 3 prompts, lambda 0.4 (0.2 for ImageNet-R), shift step
1, history EMA 0.9. Each candidate's fitness is computed on its unshifted logits; the B/64 factor and
the summed entropy are kept for any batch size (Z.15 pitfall).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..parts.cmaes import CMAES
from ..parts.norm import SourceStats
from ..parts.prompts import PromptedViT
from ..parts.source import as_float, check_source
from . import Cost, register


def fitness(phi: torch.Tensor, logits: torch.Tensor, mu_s: torch.Tensor, std_s: torch.Tensor,
            weight: float) -> torch.Tensor:
    """Per candidate: ``sum_i H(softmax z_i) + weight * (B/64) * sum_d [(std_B - std_S)^2 + (mu_B - mu_S)^2]``.
    ``phi`` (P, B, F), ``logits`` (P, B, C)."""
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1).sum(-1)
    gap = (phi.std(1) - std_s).pow(2).sum(-1) + (phi.mean(1) - mu_s).pow(2).sum(-1)
    return ent + weight * (phi.shape[1] / 64) * gap


class FOAAdapter(Adapter):
    def __init__(self, model, recipe: Recipe, *, source_images=None, n_prompts: int = 3, popsize: int = 27,
                 sigma0: float = 1.0, cma_seed: int = 2020, fitness_weight: float = 0.4, shift_step: float = 1.0,
                 history: float = 0.9, candidate_batch: int = 28, stats_batch: int = 64, **loop):
        super().__init__(model, recipe, **loop)
        check_source("foa", source_images, need_labels=False)
        if n_prompts < 1 or candidate_batch < 1:
            raise ConfigError(f"foa needs n_prompts >= 1 and candidate_batch >= 1, got {n_prompts}, {candidate_batch}")
        object.__setattr__(self, "vit", PromptedViT(self.model))
        self.n_prompts, self.weight, self.shift_step, self.history = n_prompts, fitness_weight, shift_step, history
        self.candidate_batch = candidate_batch
        self.cma = CMAES(n_prompts * self.vit.dim, popsize, sigma0, cma_seed)
        phi = torch.cat([self.vit.features(as_float(source_images[i:i + stats_batch]).to(self.device))[0][0]
                         for i in range(0, len(source_images), stats_batch)])
        if len(phi) < 2:
            raise ConfigError("foa needs at least 2 source images for the feature statistics")
        self.register_buffer("mu_s", phi.mean(0))
        self.register_buffer("std_s", phi.std(0))
        self.reset_state()
        self.snapshot()

    def reset_state(self) -> None:
        """A fresh CMA-ES, a freshly drawn best prompt, no history (the reference's reset per corruption)."""
        self.cma.reset()
        self.best = self.vit.init_prompts(self.n_prompts, self.generator)
        self.h: Optional[torch.Tensor] = None

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if len(x) < 2:
            raise ConfigError("foa needs at least 2 images per batch (batch feature statistics)")
        d = self.vit.dim
        shift = None if self.h is None else self.shift_step * (self.mu_s[-d:] - self.h)
        asked = torch.as_tensor(self.cma.ask(), dtype=torch.float32).view(-1, self.n_prompts, d)
        candidates = torch.cat([asked, self.best.unsqueeze(0)])
        scores, lasts = [], []
        for chunk in candidates.split(self.candidate_batch):
            phi, logits = self.vit.features(x, chunk.to(x.device))
            scores.append(fitness(phi, logits, self.mu_s, self.std_s, self.weight))
            lasts.append(phi[:, :, -d:])
        scores, lasts = torch.cat(scores), torch.cat(lasts)
        k = int(torch.argmin(scores))  # the first minimum wins
        self.best = candidates[k].clone()
        self.cma.tell(candidates.view(len(candidates), -1).double().numpy(), scores.tolist())
        mean_last = lasts.mean(1).mean(0)
        self.h = mean_last if self.h is None else self.history * self.h + (1 - self.history) * mean_last
        self.last = {"fitness": float(scores[k]), "candidates": len(candidates), "batch": len(x)}
        self.counters["forwards"] += len(candidates)
        return self.vit.head(lasts[k] if shift is None else lasts[k] + shift)


@register("foa", summary="forward-only: CMA-ES over ViT input prompts plus activation shifting, no backward",
          adapts="input prompt tokens (3 x D) and a feature shift", cost=Cost(nograd=28, params="none"),
          source_data="clean images for the feature statistics (source_images; labels unused)", requires="timm_vit")
def foa(model, *, source_images: Optional[torch.Tensor] = None, n_prompts: int = 3, popsize: int = 27,
        sigma0: float = 1.0, cma_seed: int = 2020, fitness_weight: float = 0.4, shift_step: float = 1.0,
        history: float = 0.9, candidate_batch: int = 28, stats_batch: int = 64):
    """``candidate_batch``: candidates per forward (memory bound); ``stats_batch``: images per forward when
    the source statistics are computed."""
    return Recipe(norm=SourceStats(), adapter_cls=FOAAdapter,
                  options=dict(source_images=source_images, n_prompts=n_prompts, popsize=popsize, sigma0=sigma0,
                               cma_seed=cma_seed, fitness_weight=fitness_weight, shift_step=shift_step,
                               history=history, candidate_batch=candidate_batch, stats_batch=stats_batch))
