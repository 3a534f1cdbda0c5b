"""Mean-teacher parts (CoTTA, METHODS.md 3.7; RoTTA, RMT, AdaContrast, ROID, CMF, PeTTA of METHODS-ZOO):
parameter EMA, EMA teacher, anchor confidence gate, stochastic restore, and the teacher-to-student
cross-entropy. Each is small and testable on its own; the methods string them together.
"""
from __future__ import annotations

import copy
from typing import Iterable, List, Sequence, Union

import torch
from torch import nn

from ..errors import ConfigError
from .augment import device_generator
from .base import Part
from .objectives import soft_cross_entropy, symmetric_cross_entropy


Tensors = Union[nn.Module, Iterable[torch.Tensor]]


def _params(x: Tensors) -> List[torch.Tensor]:
    return list(x.parameters()) if isinstance(x, nn.Module) else list(x)


@torch.no_grad()
def ema_(dst: Tensors, src: Tensors, momentum: float, trainable_only: bool = False) -> None:
    """``EMA_m(dst <- src)``: ``d <- m d + (1 - m) s`` for each pair of parameters, in place on ``dst``.

    Parameters only, never buffers (BN statistics stay each network's own). ``dst`` and ``src`` are
    modules (their parameters, in module order) or lists of tensors of the same shapes.
    ``trainable_only``: only the tensors of ``dst`` that require grad (ROID's ensembling with the source
    moves the adapted tensors, not the frozen ones). Computed as ``lerp(d, s, 1 - m)``.
    """
    pairs = [(d, s) for d, s in zip(_params(dst), _params(src)) if d.requires_grad or not trainable_only]
    if pairs:
        d, s = zip(*pairs)
        torch._foreach_lerp_(list(d), [t.detach() for t in s], 1.0 - momentum)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A copy that never takes gradients (it keeps the original's norm mode)."""
    return copy.deepcopy(model).requires_grad_(False)


class EMATeacher(Part):
    """``theta' <- m theta' + (1 - m) theta`` for every parameter, after each student step.

    Only parameters are averaged: buffers (BN running statistics) are not used by a teacher that
    normalises with batch statistics, and CoTTA leaves them alone as well.
    """

    def __init__(self, momentum: float = 0.999):
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"EMA momentum must be in [0, 1], got {momentum}")
        self.momentum = momentum
        self.model: nn.Module = None

    def build(self, student: nn.Module) -> None:
        """Start as a copy of the student (at bind and after every reset)."""
        if self.model is None:
            self.model = frozen_copy(student)
        else:
            self.model.load_state_dict(student.state_dict())

    def update(self, student: nn.Module) -> None:
        ema_(self.model, student, self.momentum)


class AnchorGate(Part):
    """CoTTA's domain-gap test: the mean max-probability of a frozen source model (the anchor) on the
    batch. Below ``threshold`` the gap is judged large and the teacher averages augmented views. The
    test is per batch, as in CoTTA's code (the paper phrases it per sample)."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.model: nn.Module = None
        self.confidence = float("nan")  # the last batch's score, for logging

    def build(self, source: nn.Module) -> None:
        if self.model is None:
            self.model = frozen_copy(source)
        else:
            self.model.load_state_dict(source.state_dict())

    def __call__(self, x: torch.Tensor) -> bool:
        """True when the batch needs the augmented teacher."""
        with torch.inference_mode():
            self.confidence = float(self.model(x).softmax(1).max(1).values.mean())
        return self.confidence < self.threshold


class StochasticRestore(Part):
    """Reset each element of the adapted tensors to its source value with probability ``p``:
    ``theta <- M * theta_src + (1 - M) * theta``, ``M ~ Bernoulli(p)`` elementwise, drawn on the
    parameters' device from a generator seeded by the adapter's."""

    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ConfigError(f"restore probability must be in [0, 1], got {p}")
        self.p = p
        self.source: List[torch.Tensor] = []

    def bind(self, adapter) -> None:
        self.source = [adapter._source_state[n] for n in adapter.param_names]

    @torch.no_grad()
    def __call__(self, params: Sequence[torch.Tensor], generator: torch.Generator) -> None:
        if self.p == 0 or not params:
            return
        gen = device_generator(generator, params[0].device)
        for p, src in zip(params, self.source):
            mask = torch.rand(p.shape, generator=gen, device=p.device) < self.p
            p.copy_(torch.where(mask, src, p))


class TeacherCrossEntropy(Part):
    """Per-sample ``CE(softmax(teacher), softmax(student))`` with the teacher logits taken from
    ``batch.extras["target"]`` (detached). ``symmetric`` adds the reverse term,
    ``0.5 CE(q, p) + 0.5 CE(p, q)``, whose gradient also reaches only the student (ImageNet CoTTA)."""

    def __init__(self, symmetric: bool = False):
        self.symmetric = symmetric

    def __call__(self, batch) -> torch.Tensor:
        target = batch.extras["target"].detach()
        if self.symmetric:
            return symmetric_cross_entropy(batch.logits, target)
        return soft_cross_entropy(target, batch.logits)
