"""Pseudo-label objectives: per-sample losses (shape ``(B,)``) of the adapted model's logits against labels the
method makes up itself.

The label source is a callable ``(batch) -> (B,) int64`` so a loss can take labels from the same forward
(RPL), a teacher, or a memory without changing; by default it is the arg-max of the same forward, without
gradient (METHODS-ZOO Z.4).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..errors import ConfigError
from .base import Part


def hard_pseudo_labels(batch) -> torch.Tensor:
    """``argmax_k z_ik`` of the batch's own forward, detached: the label a sample is pushed towards."""
    return batch.logits.detach().argmax(1)


def generalized_cross_entropy(log_probs: torch.Tensor, labels: torch.Tensor, q: float) -> torch.Tensor:
    """``(1 - p_{i,y_i}^q) / q`` per row (Zhang & Sabuncu 2018), from log-probabilities.

    Bounded by ``1/q``: a confidently wrong label costs at most that, which is why RPL uses it over plain
    cross-entropy (the ``q -> 0`` limit); ``q = 1`` gives ``1 - p_y``. Computed as ``-expm1(q log p_y) / q``,
    which keeps its precision for small ``q`` where ``1 - p^q`` would cancel.
    """
    return -torch.expm1(q * log_probs.gather(1, labels.unsqueeze(1)).squeeze(1)) / q


class GeneralizedCrossEntropy(Part):
    """RPL's objective: GCE with ``q`` (0.8 in RPL) against the labels of ``labels`` (default: the hard
    pseudo-labels of the same forward). Gradient flows through the probabilities, never through the labels."""

    def __init__(self, q: float = 0.8, labels: Optional[Callable] = None):
        if not 0 < q <= 1:
            raise ConfigError(f"generalised cross-entropy needs 0 < q <= 1, got {q!r}")
        self.q = q
        self.labels = labels or hard_pseudo_labels

    def __call__(self, batch) -> torch.Tensor:
        return generalized_cross_entropy(batch.log_probs, self.labels(batch), self.q)

    def __repr__(self):
        return f"GeneralizedCrossEntropy(q={self.q})"
