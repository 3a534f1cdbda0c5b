"""TDA's positive and negative key-value caches and BoostAdapter's boosted read-out (METHODS-VLM V.1, V.4).

Both caches are :class:`~tta.parts.cache.ClassCache` objects keyed by the pseudo-label, with the entropy of
the image's prediction as priority (nats). The cache logits of a query feature ``f`` are

    ``alpha+ sum_{e in pos} phi_beta+(f . k_e) onehot(class_e) - alpha- sum_{e in neg} phi_beta-(f . k_e) m_e``

with ``phi_beta(a) = exp(-beta (1 - a))`` on raw dot products and ``m_{e,c} = 1[low < p_{e,c} < high]``, the
classes the cached image found plausible. The negative cache only takes images whose *normalised* entropy
``h = H / log2(C)`` lies strictly inside the band (0.2, 0.5): natural-log numerator, base-2 denominator, as in
the official code (so ``h <= ln 2``), which is why the band's numbers only make sense in this unit.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

from ..errors import ConfigError
from .base import Part
from .cache import ClassCache


def normalised_entropy(entropy, num_classes: int):
    """TDA's ``h = H / log2(C)`` (``H`` in nats): the unit of TDA's band, BoostAdapter's and DPE's gates."""
    return entropy / math.log2(num_classes)


def _check_band(name: str, band: Sequence[float]) -> Tuple[float, float]:
    band = tuple(float(v) for v in band)
    if len(band) != 2 or not band[0] < band[1]:
        raise ConfigError(f"{name} must be two increasing numbers (low, high), got {band!r}")
    return band


class TipCaches(Part):
    """The positive cache (``pos_capacity`` entries per class) and the negative one (``neg_capacity``, with
    the cached image's mean probabilities as payload); ``update`` then ``logits``, in that order, because
    every official runner scores an image after inserting it (V.0.3 item 4)."""

    def __init__(self, num_classes: int, *, pos_capacity: int = 3, neg_capacity: int = 2, pos_alpha: float = 2.0,
                 pos_beta: float = 5.0, neg_alpha: float = 0.117, neg_beta: float = 1.0,
                 entropy_band: Sequence[float] = (0.2, 0.5), mask_band: Sequence[float] = (0.03, 1.0),
                 negative: bool = True):
        for name, v in (("pos_beta", pos_beta), ("neg_beta", neg_beta), ("pos_alpha", pos_alpha),
                        ("neg_alpha", neg_alpha)):
            if not v >= 0:
                raise ConfigError(f"{name} must be >= 0, got {v!r}")
        self.num_classes, self.negative = num_classes, negative
        self.pos_alpha, self.pos_beta, self.neg_alpha, self.neg_beta = pos_alpha, pos_beta, neg_alpha, neg_beta
        self.entropy_band = _check_band("entropy_band", entropy_band)
        self.mask_band = _check_band("mask_band", mask_band)
        self.pos = ClassCache(pos_capacity, num_classes)
        self.neg = ClassCache(neg_capacity, num_classes)

    def reset(self) -> None:
        self.pos.reset()
        self.neg.reset()

    def gate(self, entropy: float) -> bool:
        """Whether an image of entropy ``H`` (nats) enters the negative cache: ``low < H/log2(C) < high``."""
        low, high = self.entropy_band
        return self.negative and low < normalised_entropy(entropy, self.num_classes) < high

    def update(self, label: int, feature: torch.Tensor, entropy: float, probs: torch.Tensor) -> None:
        """Offer one image (pseudo-label, key, priority = entropy in nats, mean probabilities) to both caches."""
        self.pos.insert(label, feature, entropy)
        if self.gate(entropy):
            self.neg.insert(label, feature, entropy, probs)

    def negative_logits(self, queries: torch.Tensor) -> torch.Tensor:
        """``alpha- sum_e phi_beta-(f . k_e) m_e``, (B, C); zero while the negative cache is empty."""
        return self.neg.tip_masked(queries, self.neg_alpha, self.neg_beta, *self.mask_band)

    def logits(self, logits: torch.Tensor, queries: torch.Tensor,
               positive: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``z + positive - negative`` for queries (B, D) and their logits (B, C); ``positive`` replaces the
        positive cache's read-out (BoostAdapter's boosted cache)."""
        if positive is None:
            positive = self.pos.tip_onehot(queries, self.pos_alpha, self.pos_beta)
        return logits + (positive - self.negative_logits(queries)).to(logits)


def boosted_onehot(cache: ClassCache, queries: torch.Tensor, keys: torch.Tensor, priorities: Sequence[float],
                   labels: Sequence[int], capacity: int, alpha: float, beta: float) -> torch.Tensor:
    """The Tip one-hot read-out of ``cache`` with extra entries inserted as into a copy grown to ``capacity``
    per class (BoostAdapter's boosting samples), without touching ``cache`` and without copying it.

    Only the classes that receive an extra entry can differ from the cache's own read-out, so only their rows
    are copied (a few ``K x D`` slices instead of the ``C x K x D`` deep copy per image of the official code),
    the entries inserted there by the cache's own rule (sort and truncate, a tie with the last kept entry
    dropping the newcomer), and their read-out replaces theirs.
    """
    labels = [int(c) for c in labels]
    out = cache.tip_onehot(queries, alpha, beta)
    if not labels:
        return out
    touched = sorted(set(labels))
    row = {c: i for i, c in enumerate(touched)}
    sub = ClassCache(cache.capacity, len(touched))
    if cache.keys is not None:
        index = torch.tensor(touched, device=cache.keys.device)
        sub.keys, sub.priority = cache.keys[index], cache.priority[index]
    sub = sub.grown(capacity) if sub.keys is not None else ClassCache(capacity, len(touched))
    for key, prio, c in zip(keys, priorities, labels):
        sub.insert(row[c], key, float(prio))
    out = out.clone()
    out[:, touched] = sub.tip_onehot(queries, alpha, beta).to(out)
    return out


__all__ = ["normalised_entropy", "TipCaches", "boosted_onehot"]
