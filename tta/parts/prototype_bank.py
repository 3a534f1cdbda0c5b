"""DPE's prototypes (METHODS-VLM V.9, V.15.5): global text prototypes that evolve over the stream, visual
prototypes read from the priority cache, the per-image residuals on both and the alignment loss.

Layout: prototypes are rows, ``(C, D)`` (the spec writes them as columns of ``D x C`` matrices), so the
spec's column normalisation is a row normalisation here.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .base import Part
from .cache import ClassCache


class EvolvingPrototypes(Part):
    """``W_g``: starts at the zero-shot class embeddings; each accepted image moves it to the cumulative mean
    ``W_g <- W_g n/(n+1) + W'/(n+1)`` (``n`` counted after the increment, so the initial classifier counts as
    one member of the mean). ``W_g`` itself is never re-normalised: normalisation happens where it is used
    (:meth:`current`), as in the official code, so the mean is taken over unit rows and may shrink."""

    def __init__(self, init: torch.Tensor):
        self.init = init.detach().clone()
        self.reset()

    def reset(self) -> None:
        self.weights = self.init.clone()
        self.count = 0

    def current(self, residual: torch.Tensor = None) -> torch.Tensor:
        """``W' = rownorm(W_g + R_t)`` (differentiable in the residual)."""
        return F.normalize(self.weights if residual is None else self.weights + residual, dim=-1)

    def evolve(self, updated: torch.Tensor) -> None:
        """Fold one image's updated prototypes ``W'`` into the cumulative mean."""
        self.count += 1
        n = self.count
        self.weights = self.weights * (n / (n + 1)) + updated.detach() * (1 / (n + 1))


def cache_prototypes(cache: ClassCache) -> Tuple[torch.Tensor, torch.Tensor]:
    """The classes present in ``cache`` (ascending ids) and their mean cached key ``v_c``: ``(K,)``, ``(K, D)``."""
    present = cache.valid.any(1).nonzero().squeeze(1)
    return present, cache.class_means()[present]


def prototype_affinity(queries: torch.Tensor, prototypes: torch.Tensor, classes: torch.Tensor, num_classes: int,
                       alpha: float, beta: float) -> torch.Tensor:
    """``alpha sum_c phi_beta(f . v_c) onehot(c)``, (B, C): the Tip read-out with one key per present class."""
    a = alpha * torch.exp(-beta * (1 - queries @ prototypes.t()))
    return a.new_zeros(len(queries), num_classes).index_add(1, classes, a)


def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """InfoNCE with in-set negatives, query -> key only: the cross-entropy of ``normalize(q_i) . normalize(k_j) /
    temperature`` over j with target ``i`` (mean over i). With one pair it is exactly 0."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).t() / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=logits.device))


__all__ = ["EvolvingPrototypes", "cache_prototypes", "prototype_affinity", "info_nce"]
