"""ROID's parts (METHODS-ZOO Z.8; CMF, Z.9, uses the same ones): diversity x certainty sample weights,
the soft-likelihood-ratio objective, the weighted consistency term on an AUG-CT-lite view, and the
prior correction of the returned logits.

The weight part computes the weights once per forward and leaves them in ``batch.extras`` for the
consistency term, as the PLPD filter does for DeYO's weight. Dropped samples get weight 0 instead of
being filtered out, so the adapter's plain mean over the batch is the reference's ``sum over kept / B``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .augment import augment_ct
from .base import Part
from .objectives import entropy, symmetric_cross_entropy

WEIGHT, KEEP = "roid_weight", "roid_keep"  # keys in batch.extras


def minmax(v: torch.Tensor) -> Tuple[torch.Tensor, bool]:
    """``(v - min v) / (max v - min v)`` and whether ``v`` was constant.

    A constant vector (a batch whose predictions are all alike) gives 0/0 = NaN in the reference, which
    then poisons the loss and the weights. Here it normalises to all zeros: a constant diversity drops
    no sample (none is below the mean) and, like a constant certainty, makes every weight ``exp(0) = 1``.
    """
    lo, hi = torch.aminmax(v)
    span = hi - lo
    if not bool(span > 0):
        return torch.zeros_like(v), True
    return (v - lo) / span, False


def diversity_weights(logits: torch.Tensor, prior: torch.Tensor, temperature: float):
    """ROID's weights for the rows of ``logits`` (detached), given the running class prior ``prior``.

    ``d = 1 - cos(prior, p_i)`` min-max normalised; samples with ``d < mean d`` are dropped; ``c = -H(p_i)``
    min-max normalised; ``w = exp(d c / T)``, 0 for dropped samples. Returns ``(w, keep, constant)`` with
    ``constant`` = (d was constant, c was constant).
    """
    d, d_const = minmax(1 - F.cosine_similarity(prior.unsqueeze(0), logits.softmax(1), dim=1))
    keep = ~(d < d.mean())
    c, c_const = minmax(-entropy(logits))
    w = torch.exp(d * c / temperature) * keep
    return w, keep, (d_const, c_const)


class DiversityWeight(Part):
    """ROID's sample weights (see :func:`diversity_weights`) with the running class prior ``pi``:
    ``pi <- m pi + (1 - m) mean_i p_i`` over **all** samples of every batch that updates state, after the
    weights are computed; ``pi`` starts (and restarts at ``reset``) uniform.

    Leaves ``w`` and the kept mask in ``batch.extras`` for :class:`WeightedConsistency`. Counts the kept
    samples (``counters["kept"]``) and the batches whose diversity or certainty was constant
    (``counters["constant_diversity"]``, ``counters["constant_certainty"]``; see :func:`minmax`).
    """

    def __init__(self, momentum: float = 0.9, temperature: float = 1 / 3):
        if not 0.0 <= momentum <= 1.0:
            raise ConfigError(f"ROID momentum_probs must be in [0, 1], got {momentum}")
        if not temperature > 0:
            raise ConfigError(f"ROID temperature must be > 0, got {temperature}")
        self.momentum, self.temperature = momentum, temperature
        self._prior: Optional[torch.Tensor] = None  # None = uniform over the classes of the first batch

    def reset(self) -> None:
        self._prior = None

    def __call__(self, batch) -> torch.Tensor:
        logits = batch.logits.detach()
        prior = self._prior if self._prior is not None else torch.full_like(logits[0], 1.0 / batch.num_classes)
        w, keep, (d_const, c_const) = diversity_weights(logits, prior, self.temperature)
        batch.extras[WEIGHT], batch.extras[KEEP] = w, keep
        if batch.update_state:
            self._prior = self.momentum * prior + (1 - self.momentum) * logits.softmax(1).mean(0)
            counters = batch.adapter.counters
            counters["kept"] += int(keep.sum())
            counters["constant_diversity"] += d_const
            counters["constant_certainty"] += c_const
        return w


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """``-sum_k p'_k log(p'_k / (1 - p'_k) + eps)`` per row, ``p' = clamp(softmax(logits), 0, clip)``.

    Confidence maximisation in log-odds form; the clip keeps the odds ``p / (1 - p)`` finite."""
    p = logits.softmax(1).clamp(0.0, clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


class SoftLikelihoodRatio(Part):
    """ROID's per-sample objective (:func:`soft_likelihood_ratio`)."""

    def __init__(self, clip: float = 0.99, eps: float = 1e-5):
        if not 0.0 < clip < 1.0:
            raise ConfigError(f"soft likelihood ratio clip must be in (0, 1), got {clip}")
        self.clip, self.eps = clip, eps

    def __call__(self, batch) -> torch.Tensor:
        return soft_likelihood_ratio(batch.logits, self.clip, self.eps)


class WeightedConsistency(Part):
    """Batch term ``sum_{i in K} w_i SCE(f(aug(x_K))_i, z_i) / B``: the kept samples' predictions on one
    AUG-CT-lite draw should agree with their clean logits. Both sides carry gradient (the reference's
    choice); the augmented forward normalises with the kept subset's own statistics. ``w`` and ``K``
    come from :class:`DiversityWeight`. ``B`` is the actual batch size (the reference divides by the
    configured one: the same except on a smaller last batch)."""

    def __call__(self, batch) -> torch.Tensor:
        if WEIGHT not in batch.extras:
            raise ConfigError("WeightedConsistency needs DiversityWeight as the recipe's weight")
        w, keep = batch.extras[WEIGHT], batch.extras[KEEP]
        adapter = batch.adapter
        views = augment_ct(batch.x[keep].detach(), adapter.generator, lite=True)
        sce = symmetric_cross_entropy(adapter.model(views), batch.logits[keep])
        return (sce * w[keep]).sum() / batch.x.shape[0]


def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """``logits * pi~`` class-wise, ``pi = mean_i softmax(z_i)``, ``s = max(1/B, 1/C) / max_k pi_k``,
    ``pi~ = (pi + s) / (1 + s C)``: a smoothed batch prior that favours the classes the batch predicts.
    The logits are scaled, not the probabilities, as in the reference (the effect depends on the
    logits' signs)."""
    b, c = logits.shape
    prior = logits.softmax(1).mean(0)
    s = max(1.0 / b, 1.0 / c) / prior.max()
    return logits * ((prior + s) / (1 + s * c))


class PriorCorrection(Part):
    """Output part: the loss forward's (pre-update) logits through :func:`prior_correction`."""

    def __call__(self, adapter, out) -> torch.Tensor:
        return prior_correction(out.logits.detach())
