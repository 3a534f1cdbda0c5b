"""Per-class statistics of encoder features (METHODS-ZOO Z.17 "source-derived assets").

RMT and SANTA anchor their contrastive loss on source class prototypes: the mean encoder feature of each
ground-truth class over labelled source images, computed once with the source weights (Z.7 construction
step 4, Z.10). PeTTA keeps, per class, the mean and the diagonal unbiased variance of source features
under the model's own arg-max labels (Z.13 "source statistics"). Both are one pass of an encoder over
batches into a :class:`ClassStats` accumulator; ``feature_stats`` is that pass, ``class_prototypes`` the
RMT/SANTA use of it.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Tuple

import torch

from ..errors import ConfigError


class ClassStats:
    """Running per-class count, sum and sum of squares of feature vectors.

    Sums are kept in float64: the variance ``(sum x^2 - (sum x)^2 / n) / (n - 1)`` then keeps its precision
    over 100,000 features without a second pass. ``mean`` and ``var`` come back in the features' dtype;
    both are NaN for a class with too few samples (0 for the mean, fewer than 2 for the variance), so a
    caller decides what an unseen class means (RMT drops it, PeTTA guards it).
    """

    def __init__(self, num_classes: int, dim: int, device=None, dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.count = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.sum = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)

    @property
    def total(self) -> int:
        return int(self.count.sum())

    @property
    def present(self) -> torch.Tensor:
        """bool (C,): classes with at least one sample."""
        return self.count > 0

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch: ``features`` (B, D), integer ``labels`` (B,) in [0, C)."""
        f = features.detach().to(self.sum.device, torch.float64)
        labels = labels.to(self.sum.device)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= len(self.count)):
            raise ConfigError(f"class labels must lie in [0, {len(self.count)}), got range "
                              f"[{int(labels.min())}, {int(labels.max())}]")
        self.count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))
        self.sum.index_add_(0, labels, f)
        self.sumsq.index_add_(0, labels, f * f)

    @property
    def mean(self) -> torch.Tensor:
        """(C, D) mean feature per class (NaN rows for unseen classes)."""
        return (self.sum / self.count[:, None]).to(self.dtype)

    @property
    def var(self) -> torch.Tensor:
        """(C, D) unbiased per-dimension variance per class (NaN rows for classes seen fewer than twice)."""
        n = self.count[:, None]
        var = (self.sumsq - self.sum * self.sum / n) / (n - 1)
        return torch.where(n > 1, var.clamp_min(0), torch.full_like(var, float("nan"))).to(self.dtype)


@torch.no_grad()
def feature_stats(encoder, batches: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]], *,
                  pseudo_labels: bool = False, max_count: Optional[int] = None) -> ClassStats:
    """One pass of ``encoder`` (with ``with_logits``, see ``tta.models.split``) over ``(x, y)`` batches.

    Labels are ``y`` (ground truth), or the model's arg-max prediction with ``pseudo_labels`` (``y`` may
    then be None). ``max_count``: stop after the first batch that makes the count exceed it (RMT's
    100,000: all 50,000 CIFAR-10 images, 100,032 ImageNet images at batch 64). The encoder runs in
    whatever norm mode its model is in (N-batch for RMT/SANTA, source statistics for PeTTA).
    """
    stats = None
    for x, y in batches:
        features, logits = encoder.with_logits(x)
        labels = logits.argmax(1) if pseudo_labels else y
        if labels is None:
            raise ConfigError("feature_stats needs labels for every batch, or pseudo_labels=True")
        if stats is None:
            stats = ClassStats(logits.shape[1], features.shape[1], features.device, features.dtype)
        stats.add(features, labels)
        if max_count is not None and stats.total > max_count:
            break
    if stats is None:
        raise ConfigError("feature_stats got no batches")
    return stats


def class_prototypes(encoder, source, device=None, max_count: int = 100_000) -> torch.Tensor:
    """(K, D) mean source feature per ground-truth class, over one fresh pass of ``source`` (a
    :class:`tta.parts.source.SourceBatches`, shuffled batches; Z.7 construction step 4).

    Only the K classes present in the source set get a row: in the contrastive loss a prototype is an
    anchor picked by cosine similarity, its class index is never used, and an unseen class has no mean
    (the reference would carry a NaN row there).
    """
    if max_count < 1:
        raise ConfigError(f"prototype_samples must be >= 1, got {max_count}")
    passes = math.ceil(len(source.images) / source.batch_size)
    stats = feature_stats(encoder, (source.next(device) for _ in range(passes)), max_count=max_count)
    return stats.mean[stats.present]
