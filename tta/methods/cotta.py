"""CoTTA (Wang et al., CVPR 2022; METHODS.md 3.7): a student trained towards an EMA teacher whose
pseudo-labels are averaged over augmented views when a frozen anchor says the domain gap is large,
with stochastic restore of source weights against forgetting. The prediction is the teacher's.

Defaults are CIFAR-10-C's (Adam 1e-3, threshold 0.92, restore 0.01, soft CE); CIFAR-100-C uses
threshold 0.72; ImageNet-C SGD 0.01 Nesterov, threshold 0.1, restore 0.001, ``loss: symmetric``.

Cost choices that do not change the algorithm:

* the ``augmentations`` teacher passes run as one forward over all copies (``torch.vmap`` over the
  copy axis, so batch-statistics BN still normalises each augmented copy with its own statistics, as
  CoTTA's separate passes do). ``aug_batch`` sets the copies per forward: by default all of them on
  CUDA, one on the CPU (where a 32 x 200 CIFAR forward ran 2x slower than 32 forwards of 200, the
  activations no longer fitting in cache); set it lower on a GPU to bound memory (ImageNet);
* augmented passes are computed only when the gate asks for them (CoTTA's ImageNet code; its CIFAR
  code computes them always and discards them when not needed, same result but different draws);
* teacher and anchor forwards run without autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..adapter import Adapter, Batch, Output, Recipe
from ..errors import ConfigError
from ..parts.augment import apply_augment, draw_params, slice_params
from ..parts.norm import BatchStats
from ..parts.optim import OptimizerSpec
from ..parts.params import AllParams
from ..parts.postprocess import build as build_postprocess
from ..parts.teacher import AnchorGate, EMATeacher, StochasticRestore, TeacherCrossEntropy
from . import Cost, register

LOSSES = ("ce", "symmetric")


class CoTTAAdapter(Adapter):
    """The CoTTA loop (see module docstring). Teacher and anchor are registered as submodules so they
    move with ``.to(device)`` and are saved with the adapter."""

    def __init__(self, model, recipe: Recipe, *, ema: float = 0.999, threshold: float = 0.92,
                 restore: float = 0.01, augmentations: int = 32, aug_batch: Optional[int] = None, sharpen=None,
                 **loop):
        super().__init__(model, recipe, **loop)
        self.sharpen = build_postprocess(sharpen)
        if augmentations < 1 or (aug_batch is not None and aug_batch < 1):
            raise ConfigError(f"augmentations and aug_batch must be >= 1, got {augmentations}, {aug_batch}")
        self.augmentations, self.aug_batch = augmentations, aug_batch
        self.ema, self.gate, self.restore = EMATeacher(ema), AnchorGate(threshold), StochasticRestore(restore)
        self.restore.bind(self)
        self.reset_state()
        self.teacher_model, self.anchor_model = self.ema.model, self.gate.model

    def reset_state(self) -> None:
        """Teacher and anchor start again as copies of the (restored) student."""
        self.ema.build(self.model)
        self.gate.build(self.model)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        prediction = None
        for _ in range(self.steps):
            target = self.teacher_output(x)
            if self.sharpen is not None:  # e.g. em_inf: sharper soft pseudo-labels, same arg-max
                target = self.sharpen(target)
            logits = self.model(x)
            batch = Batch(x, logits, self)
            batch.extras["target"] = target
            out = Output(logits, self.recipe.objective(batch).mean(),
                         torch.ones(len(x), dtype=torch.bool, device=logits.device), batch)
            value = self.recipe.step(self, x, out)
            self.ema.update(self.model)
            self.restore(self.params, self.generator)
            self.last = {"selected": out.selected, "stepped": value is not None, "loss": value, "batch": len(x),
                         "anchor_confidence": self.gate.confidence}
            self.counters["selected"] += out.selected
            prediction = target if prediction is None else prediction
        return prediction

    def teacher_output(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's logits on ``x``, or their mean over augmented copies when the gate fires."""
        augment = self.gate(x)
        with torch.no_grad():
            if not augment:
                return self.ema.model(x)
            self.counters["augmented"] += 1
            chunk = self.aug_batch or (self.augmentations if x.is_cuda else 1)
            draws = draw_params(self.augmentations, x.shape[-2], x.shape[-1], self.generator)
            total = 0.0
            for start in range(0, self.augmentations, chunk):
                k = min(chunk, self.augmentations - start)
                views = apply_augment(x, slice_params(draws, start, start + k))
                logits = self.ema.model(views) if k == 1 else torch.vmap(self.ema.model)(views.view(k, *x.shape))
                total = total + logits.view(k, len(x), -1).sum(0)
            return total / self.augmentations


@register("cotta", summary="EMA teacher with augmentation-averaged pseudo-labels and stochastic restore",
          adapts="all weights", cost=Cost(grad=1, backward=1, nograd=34, params="all"))
def cotta(model, *, ema: float = 0.999, threshold: float = 0.92, restore: float = 0.01, augmentations: int = 32,
          aug_batch: Optional[int] = None, loss: str = "ce", sharpen=None):
    """``ema``: teacher momentum; ``threshold``: anchor confidence below which the teacher averages
    ``augmentations`` views; ``restore``: stochastic restore probability; ``loss``: ``ce`` (CIFAR) or
    ``symmetric`` (ImageNet); ``sharpen``: a post-processor (``em_inf``) applied to the teacher's logits
    before they become the student's soft targets (and the prediction)."""
    if loss not in LOSSES:
        raise ConfigError(f"cotta loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return Recipe(norm=BatchStats(), params=AllParams(), objective=TeacherCrossEntropy(loss == "symmetric"),
                  optimizer=OptimizerSpec("adam", lr=1e-3), adapter_cls=CoTTAAdapter,
                  options=dict(ema=ema, threshold=threshold, restore=restore, augmentations=augmentations,
                               aug_batch=aug_batch, sharpen=sharpen))
