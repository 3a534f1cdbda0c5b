"""RMT, Robust Mean Teacher (Döbler, Marsden, Yang; CVPR 2023; METHODS-ZOO Z.7).

A student trained on every weight towards an EMA teacher: symmetric cross-entropy between the teacher's
logits and the student's on the clean and on an augmented view (AUG-CT), a contrastive loss pulling both
views towards the nearest source class prototype (``tta.parts.contrastive``), and the cross-entropy of one
labelled source batch per test batch (replay). Before the stream the teacher is warmed up on unlabelled
source batches. The prediction is the sum of student and teacher logits, both from the forwards before
the update. SANTA (``santa.py``) runs on the same loop.

Construction, in the reference's order (it fixes what ``reset()`` returns to, Z.7 construction 1-7):
student configured (N-batch, all weights trainable) -> shuffled source batches -> teacher = frozen copy of
the student (N-batch too) -> prototypes from one pass over the source set with the source weights ->
projector, added to the optimizer as a second parameter group -> warm-up -> reset point.

Deviations from the reference, none of which changes the algorithm:

* no disk caches. The reference caches prototypes and the warm-up keyed only by dataset, architecture
  and batch size, so a cache written for another checkpoint or source subset is silently reused (Z.7
  pitfall). Here both are recomputed at construction: about a minute for CIFAR's 250 warm-up steps on a
  CPU; on ImageNet 781 steps plus the prototype pass, a few minutes on a GPU;
* classes absent from the source set get no prototype (the reference would carry a NaN row);
* randomness (source order, augmentations, projector initialisation) comes from the adapter's seed, not
  from the global RNG, so two adapters with the same seed agree; the reference's exact source batches
  cannot be rebuilt anyway (REFERENCE.md: expect +-0.5 pp).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..adapter import Adapter, Batch, Output, Recipe
from ..errors import ConfigError
from ..models import split
from ..parts.augment import augment_ct
from ..parts.base import Part
from ..parts.contrastive import PrototypeContrast
from ..parts.norm import BatchStats
from ..parts.objectives import symmetric_cross_entropy
from ..parts.optim import OptimizerSpec
from ..parts.params import AllParams
from ..parts.prototypes import class_prototypes
from ..parts.source import SourceBatches, check_source
from ..parts.steps import PlainStep
from ..parts.teacher import ema_, frozen_copy
from . import Cost, register


class TwoViewConsistency(Part):
    """Per sample ``1/2 loss(z, t) + 1/2 loss(z_a, t)``: the student's clean and augmented logits against
    target logits ``t`` without gradient (RMT's teacher with SCE, Z.7 step 6; SANTA's anchor with the
    student-as-target CE, Z.10 step 3). Reads ``batch.extras["augmented"]`` and ``["target"]``."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.loss = loss

    def __call__(self, batch) -> torch.Tensor:
        target = batch.extras["target"].detach()
        return 0.5 * self.loss(batch.logits, target) + 0.5 * self.loss(batch.extras["augmented"], target)


class TeacherEMA(Part):
    """After every step (warm-up included): ``EMA_m(teacher <- student)`` over all parameters (Z.7 step 11)."""

    def __init__(self, momentum: float = 0.999):
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"teacher EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum

    def __call__(self, adapter) -> None:
        ema_(adapter.teacher, adapter.model, self.momentum)


class SourceReplay(Part):
    """The update step with replay (Z.7 step 8): backward of the test loss, then of
    ``weight * CE(student(x_s), y_s)`` on the next labelled source batch (its own N-batch statistics), then
    one optimizer step. The two backwards accumulate the gradient of the summed loss; running the source
    forward after the test graph is freed keeps two batch graphs in memory instead of three (the
    reference's order)."""

    def __init__(self, weight: float = 1.0):
        self.weight = weight

    def __call__(self, adapter, x, out) -> Optional[float]:
        if not adapter.should_step(out):
            return None
        adapter.backward(out.loss)
        x_s, y_s = adapter.source.next(adapter.device)
        replay = self.weight * F.cross_entropy(adapter.model(x_s), y_s)
        adapter.backward(replay)
        adapter.optimizer_step()
        return out.loss_value + float(replay.detach())


def logit_sum(adapter, out: Output) -> torch.Tensor:
    """RMT's prediction: student + teacher logits, both from the forwards before the update (Z.7 step 9)."""
    return out.logits.detach() + out.batch.extras["target"]


class RMTAdapter(Adapter):
    """The loop of RMT and SANTA. It subclasses ``Adapter`` because (1) its constructor builds networks
    from source data (teacher or anchor, prototypes, a projector that joins the optimizer as a second
    parameter group) and warms the teacher up, so the reset point comes after all that; (2) its loss
    needs features, not just logits, of two student forwards (clean and AUG-CT) plus the teacher's
    forward, so ``compute_loss`` is its own. The rest is the base loop with recipe parts: the step
    (plain, or with source replay), the teacher EMA as an after-step hook, the output rule.

    ``teacher``: a frozen copy of the configured student; RMT moves it by EMA, SANTA never does (it is
    SANTA's anchor). Both normalise with test-batch statistics."""

    def __init__(self, model, recipe: Recipe, *, source_images: torch.Tensor, source_labels: torch.Tensor,
                 source_batch_size: int = 200, warmup_samples: int = 50000, prototype_samples: int = 100000,
                 projection_dim: int = 128, temperature: float = 0.1, lambda_ce_trg: float = 1.0,
                 lambda_cont: float = 1.0, **loop):
        super().__init__(model, recipe, **loop)
        if warmup_samples < 0 or lambda_ce_trg < 0 or lambda_cont < 0:
            raise ConfigError(f"warmup_samples, lambda_ce_trg and lambda_cont must be >= 0, got "
                              f"{warmup_samples}, {lambda_ce_trg}, {lambda_cont}")
        self.lambda_ce_trg, self.lambda_cont = lambda_ce_trg, lambda_cont
        self.encoder, _ = split(self.model)
        self.source = SourceBatches(source_images, source_labels, source_batch_size, seed=self.seed)
        self.teacher = frozen_copy(self.model)
        prototypes = class_prototypes(self.encoder, self.source, self.device, prototype_samples)
        self.contrast = PrototypeContrast(prototypes, projection_dim, temperature, seed=self.seed)
        self.optimizer.add_param_group({"params": list(self.contrast.projector.parameters())})
        self.warmup_steps = warmup_samples // source_batch_size
        self.warm_up(self.warmup_steps)
        self.source.mark()
        self.snapshot()

    def warm_up(self, steps: int) -> None:
        """Z.7 construction step 6: ``steps`` updates on unlabelled source batches, ``mean SCE(student,
        teacher)``, the lr of every group ramped as ``lr (i+1)/steps``, the after-step hooks (teacher EMA)
        after each. The projector gets no gradient here, so the optimizer skips it. Adam's moments stay."""
        groups = self.optimizer.param_groups
        base = [g["lr"] for g in groups]
        for i in range(steps):
            for g, lr in zip(groups, base):
                g["lr"] = lr * (i + 1) / steps
            x, _ = self.source.next(self.device)
            logits = self.model(x)
            with torch.no_grad():
                target = self.teacher(x)
            symmetric_cross_entropy(logits, target).mean().backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for hook in self.recipe.after_step:
                hook(self)
        for g, lr in zip(groups, base):
            g["lr"] = lr

    def reset_state(self) -> None:
        """The source iterator goes back to where the warm-up left it (networks and optimizer are in the
        snapshot)."""
        self.source.reset()

    def compute_loss(self, x: torch.Tensor, within=None, update_state: bool = True) -> Output:
        """``L = lambda_ce_trg * mean objective + lambda_cont * L_con`` (Z.7 steps 1-7, Z.10 steps 1-4)."""
        features, logits = self.encoder.with_logits(x)
        features_aug, logits_aug = self.encoder.with_logits(augment_ct(x, self.generator))
        with torch.no_grad():
            target = self.teacher(x)
        batch = Batch(x, logits, self, update_state)
        batch.extras.update(augmented=logits_aug, target=target)
        loss = self.lambda_ce_trg * self.recipe.objective(batch).mean() + \
            self.lambda_cont * self.contrast(features, features_aug)
        return Output(logits, loss, torch.ones(len(x), dtype=torch.bool, device=logits.device), batch)


@register("rmt", summary="mean teacher with SCE, source-prototype contrastive loss, warm-up and source replay",
          adapts="all weights + projector", cost=Cost(grad=3, backward=1, nograd=1, params="all"),
          source_data="labelled source images for prototypes, warm-up and replay (source_images, source_labels)")
def rmt(model, *, source_images: Optional[torch.Tensor] = None, source_labels: Optional[torch.Tensor] = None,
        source_batch_size: int = 200, warmup_samples: int = 50000, prototype_samples: int = 100000,
        ema: float = 0.999, projection_dim: int = 128, temperature: float = 0.1, lambda_ce_src: float = 1.0,
        lambda_ce_trg: float = 1.0, lambda_cont: float = 1.0):
    """``source_batch_size``: source batches for prototypes, warm-up and replay (the reference uses the
    test batch size); ``warmup_samples``: warm-up steps = warmup_samples // source_batch_size;
    ``prototype_samples``: the prototype pass stops after the batch that exceeds it; ``ema``: teacher
    momentum; ``projection_dim``, ``temperature``: the contrastive head; ``lambda_*``: loss weights of the
    source replay, the teacher-student SCE and the contrastive loss (replay is skipped at 0)."""
    check_source("rmt", source_images, source_labels)
    if lambda_ce_src < 0:
        raise ConfigError(f"lambda_ce_src must be >= 0, got {lambda_ce_src}")
    return Recipe(norm=BatchStats(), params=AllParams(), objective=TwoViewConsistency(symmetric_cross_entropy),
                  step=SourceReplay(lambda_ce_src) if lambda_ce_src > 0 else PlainStep(),
                  after_step=[TeacherEMA(ema)], output=logit_sum, optimizer=OptimizerSpec("adam", lr=1e-3),
                  adapter_cls=RMTAdapter,
                  options=dict(source_images=source_images, source_labels=source_labels,
                               source_batch_size=source_batch_size, warmup_samples=warmup_samples,
                               prototype_samples=prototype_samples, projection_dim=projection_dim,
                               temperature=temperature, lambda_ce_trg=lambda_ce_trg, lambda_cont=lambda_cont))
