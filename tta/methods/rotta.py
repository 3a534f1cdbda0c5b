"""RoTTA (Yuan, Xie, Li; CVPR 2023; METHODS-ZOO Z.6): robust test-time adaptation for dynamic streams.

A teacher predicts; every test sample is offered to a class-balanced memory (CSTU,
:mod:`tta.parts.memory`); every ``update_frequency`` samples the student learns from the memory: the
teacher's soft labels on the plain memory images against the student on one AUG-CT draw of them,
weighted by each item's timeliness, then the teacher follows the student by EMA. Both networks use
robust BN (N-robust, :mod:`tta.parts.robust_bn`), each with its own EMA statistics.

Where we follow the paper's intent instead of the reference: the reference's HEAD fp32 branch calls
its loss with an argument it does not accept (a TypeError; only its AMP branch runs). Its published
numbers predate that refactor and do the maths below, which is what we implement.

Deviations that do not change the algorithm: AUG-CT draws come from the adapter's seeded generator (the
reference uses torch's global RNG); ``steps`` other than 1 is refused (updates are driven by the sample
counter, not by batches); a batch of one image is accepted (predictions use the teacher's stored
statistics, updates the memory).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..adapter import Adapter, Recipe
from ..errors import ConfigError
from ..parts.augment import augment_ct
from ..parts.memory import CSTUMemory, timeliness
from ..parts.objectives import soft_cross_entropy
from ..parts.optim import OptimizerSpec
from ..parts.params import BATCH_NORMS, NormAffine
from ..parts.robust_bn import RobustStats, set_robust_training
from ..parts.teacher import ema_, frozen_copy
from . import Cost, register

TRAINABLE_NORMS = BATCH_NORMS + (nn.LayerNorm, nn.GroupNorm)  # the reference unfreezes BN, LN and GN affines


class RoTTAAdapter(Adapter):
    """RoTTA's own loop. The recipe loop could not express it: the prediction comes from a teacher
    rather than the forward that is trained, the training batch is the memory (not the test batch) and
    updates fall *inside* a batch, every ``update_frequency`` samples of a counter that runs across
    batches and domains (only ``reset()`` zeroes it). The teacher is a submodule, so the snapshot and
    ``reset()`` cover its parameters and its own robust-BN statistics; ``reset_state`` empties the memory
    and zeroes the counter."""

    def __init__(self, model, recipe: Recipe, *, memory_size: int = 64, update_frequency: int = 64,
                 nu: float = 0.001, lambda_t: float = 1.0, lambda_u: float = 1.0, **loop):
        super().__init__(model, recipe, **loop)
        if self.steps != 1:
            raise ConfigError(f"rotta updates every update_frequency samples, not per batch: steps must be 1, "
                              f"got {self.steps}")
        if isinstance(update_frequency, bool) or not isinstance(update_frequency, int) or update_frequency < 1:
            raise ConfigError(f"rotta update_frequency must be a positive integer, got {update_frequency!r}")
        if not 0.0 <= nu <= 1.0:
            raise ConfigError(f"rotta nu (teacher EMA rate) must be in [0, 1], got {nu}")
        CSTUMemory(memory_size, 2, lambda_t, lambda_u)  # validate now, not at the first batch
        self.memory_size, self.update_frequency, self.nu = memory_size, update_frequency, nu
        self.lambdas = (lambda_t, lambda_u)
        self.batch_stats = False  # predictions use the teacher's stored statistics: a batch of 1 is fine
        self.teacher = frozen_copy(self.model)
        self.reset_state()
        self.snapshot()  # the reset point now includes the teacher

    def reset_state(self) -> None:
        self.memory: Optional[CSTUMemory] = None  # built at the first batch, once the class count is known
        self.seen = 0

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        set_robust_training(self.teacher, False)
        with torch.inference_mode():
            logits = self.teacher(x)
            p = logits.softmax(1)
            labels = p.argmax(1)
            uncertainty = -(p * torch.log(p + 1e-6)).sum(1)
        if self.memory is None:
            self.memory = CSTUMemory(self.memory_size, logits.shape[1], *self.lambdas)
        for image, label, u in zip(x, labels.tolist(), uncertainty.tolist()):
            self.counters["accepted"] += self.memory.add(image, label, u)
            self.seen += 1
            if self.seen % self.update_frequency == 0:
                self.update()
        return logits

    def update(self) -> None:
        """One step on the memory (Z.6 "Update"), then the teacher EMA over all parameters."""
        images, _, _, ages = self.memory.contents()
        set_robust_training(self.teacher, True)  # its statistics move with the plain memory images
        views = augment_ct(images, self.generator)
        with torch.no_grad():
            target = self.teacher(images)
        per_item = self.recipe.objective(target, self.model(views))  # CE(softmax(teacher), student)
        loss = (timeliness(ages, self.memory_size) * per_item).mean()
        self.backward(loss)
        self.optimizer_step()
        ema_(self.teacher, self.model, 1.0 - self.nu)
        self.counters["selected"] += len(images)
        self.last = {"selected": len(images), "stepped": True, "loss": float(loss.detach()), "batch": len(images)}


# Cost floor per batch of B = 200: the teacher's prediction forward on B (no grad); per update (B / 64 =
# 3.125 per batch) a no-grad teacher forward and a student forward with gradient on 64 memory images and
# one backward. Summed: 200 images with gradient (grad = 1) and 400 without (nograd = 2); the 3.125 small
# backwards together touch as many activations as one backward over B (backward = 1). Left out as small
# next to these: the AUG-CT draw on 64 images, the 2.125 extra Adam steps and teacher EMAs over the BN
# affines / all weights, and the memory's bookkeeping (a few victims scanned per sample).
@register("rotta", summary="teacher-labelled class-balanced memory, robust BN, timeliness-weighted updates",
          adapts="robust BN affine (+ LN/GN affine)", cost=Cost(grad=1, backward=1, nograd=2))
def rotta(model, *, memory_size: int = 64, update_frequency: int = 64, nu: float = 0.001, alpha: float = 0.05,
          lambda_t: float = 1.0, lambda_u: float = 1.0):
    """``memory_size``: CSTU capacity M; ``update_frequency``: samples between updates; ``nu``: teacher EMA
    rate (teacher <- (1 - nu) teacher + nu student); ``alpha``: robust-BN momentum; ``lambda_t``,
    ``lambda_u``: weights of age and uncertainty in the memory score."""
    return Recipe(norm=RobustStats(alpha, require_bn=False), params=NormAffine(kinds=TRAINABLE_NORMS),
                  objective=soft_cross_entropy,
                  optimizer=OptimizerSpec("adam", lr=1e-3), adapter_cls=RoTTAAdapter,
                  options=dict(memory_size=memory_size, update_frequency=update_frequency, nu=nu,
                               lambda_t=lambda_t, lambda_u=lambda_u))
