"""Confidence selection and view aggregators of the CLIP view methods (METHODS-VLM V.15.3), batched over images.

Shapes: ``logits`` ``(B, N, C)`` (views of each image, ``s W^T f_v``), ``features`` ``(B, N, D)``. The
aggregators are kept apart because each method averages something else and the choice changes numbers:
``mean_logits`` (TDA, BoostAdapter, DPE), ``mean_features`` un-normalised (VTE, TDA/DPE cache keys),
``mean_probs`` (TDA's negative payload, DMN's pseudo-label), ``entropy_of_mean_prob`` (TPT's loss, TDA's
priority), ``vote_counts`` (ZERO; its tie-break is in :mod:`tta.methods.zero`), the inlierness-weighted mode
(MTA, :mod:`tta.methods.mta`). :func:`vote_logits` turns counts (or any non-negative scores) into logits.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .objectives import entropy, view_marginal_entropy


def view_entropy(logits: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``(B, N)`` Shannon entropy (nats) of each view's ``softmax``; ``eps > 0`` puts it inside the log as DMN
    does (``-sum p log(p + eps)``); ZERO, TPT and VTE use none."""
    flat = logits.flatten(0, -2)
    if eps:
        p = flat.softmax(-1)
        return -(p * (p + eps).log()).sum(-1).view(logits.shape[:-1])
    return entropy(flat).view(logits.shape[:-1])


def confident_count(views: int, rho: float) -> int:
    """``floor(rho N)``, at least 1: 6 of 64 at rho 0.1, 19 of 64 at 0.3."""
    if not 0 < rho <= 1:
        raise ConfigError(f"the kept fraction of views must be in (0, 1], got {rho}")
    return max(1, int(rho * views))


def rank_views(logits: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """``(B, N)`` view indices of each image, lowest entropy first (see :func:`select_lowest` for ties)."""
    return torch.sort(view_entropy(logits, eps), dim=-1, stable=True).indices


def select_lowest(scores: torch.Tensor, rho: float) -> torch.Tensor:
    """``(B, k)`` indices of the ``k = floor(rho N)`` lowest ``scores`` ``(B, N)`` of each image, lowest first;
    equal scores keep the view order (stable sort), so the choice is the same on every device."""
    return torch.sort(scores, dim=-1, stable=True).indices[:, :confident_count(scores.shape[1], rho)]


def select_confident(logits: torch.Tensor, rho: float, eps: float = 0.0) -> torch.Tensor:
    """``(B, k)`` indices of the ``k = floor(rho N)`` lowest-entropy views of each image (``Sel_rho``)."""
    return select_lowest(view_entropy(logits, eps), rho)


def take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[b, index[b]]``: ``(B, k, ...)`` rows of ``values`` ``(B, N, ...)``."""
    shape = index.shape + (1,) * (values.dim() - 2)
    return values.gather(1, index.view(shape).expand(*index.shape, *values.shape[2:]))


def mean_logits(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` mean logit vector of the views."""
    return logits.mean(1)


def mean_features(features: torch.Tensor) -> torch.Tensor:
    """``(B, D)`` mean feature of the views, not re-normalised (VTE, TDA)."""
    return features.mean(1)


def mean_probs(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` mean of the views' probabilities."""
    return logits.softmax(-1).mean(1)


def entropy_of_mean_prob(logits: torch.Tensor) -> torch.Tensor:
    """``(B,)`` ``H(mean_v softmax(z_v))`` in log space (TPT's ``avg_entropy``), differentiable."""
    return torch.vmap(view_marginal_entropy)(logits)


def vote_counts(logits: torch.Tensor) -> torch.Tensor:
    """``(B, C)`` how many views have each class as their arg-max (hard voting; ties inside a view go to the
    lowest class index, as ``argmax`` breaks them)."""
    return F.one_hot(logits.argmax(-1), logits.shape[-1]).sum(1).to(logits.dtype)


def vote_logits(scores: torch.Tensor, floor: float = 1e-12) -> torch.Tensor:
    """Logits of non-negative vote scores ``(B, C)``: ``log(scores / sum)``, clamped at ``log(floor)`` so a class
    without votes is finite. Monotone in the scores (same arg-max), and its softmax is the vote share (plus
    ``floor`` for the classes without votes), which is what calibration metrics see."""
    return (scores / scores.sum(-1, keepdim=True)).clamp_min(floor).log()


__all__ = ["view_entropy", "confident_count", "rank_views", "select_lowest", "select_confident", "take",
           "mean_logits", "mean_features", "mean_probs", "entropy_of_mean_prob", "vote_counts", "vote_logits"]
