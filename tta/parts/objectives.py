"""Objectives: per-sample losses (shape ``(B,)``) and batch-level terms (scalars) computed from logits.

Formulas: METHODS.md section 1 (Shannon entropy, marginal entropy, cross-entropy).
"""
from __future__ import annotations

import torch

from .base import Part


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy ``-sum_k p_k log p_k`` of ``softmax(logits)`` per row (natural log)."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the batch-mean prediction ``H(mean_i p_i)``; large when the batch uses many classes."""
    p = logits.softmax(1).mean(0)
    return -(p * torch.log(p.clamp_min(1e-12))).sum()


def soft_cross_entropy(target_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``CE(softmax(target), softmax(logits)) = -sum_k q_k log p_k`` per row (target detached by caller)."""
    return -(target_logits.softmax(1) * logits.log_softmax(1)).sum(1)


class Entropy(Part):
    """TENT's objective: per-sample Shannon entropy of the adapted model's prediction."""

    def __call__(self, batch) -> torch.Tensor:
        return batch.entropy


class MarginalEntropyBonus(Part):
    """Batch term ``-weight * H(mean p)`` (minimising it maximises prediction diversity over the batch)."""

    def __init__(self, weight: float):
        self.weight = weight

    def __call__(self, batch) -> torch.Tensor:
        return -self.weight * marginal_entropy(batch.logits)
