"""The prototype-anchored contrastive loss of RMT (METHODS-ZOO Z.7 steps 4-5) and SANTA (Z.10 step 2).

For a batch of clean features ``f`` and features of an augmented view ``f_a`` (B x D each, with gradient),
each sample gets a third view: the source class prototype nearest to ``f`` by cosine similarity (chosen
without gradient; prototypes are constants). The 3B vectors, stacked view by view, go through a small
projector ``Linear(D, P) -> ReLU -> Linear(P, P)`` and are L2-normalised; the loss is SupCon (Khosla et
al., 2020) without labels: the positives of every vector are the two other views of its sample.
Prototypes therefore move only the projector; the clean and augmented features pull towards each other
and towards the prototype of the class they are closest to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError


def projector(in_dim: int, dim: int = 128, seed: Optional[int] = None) -> nn.Sequential:
    """``Linear(in_dim, dim) -> ReLU -> Linear(dim, dim)`` with PyTorch's default initialisation, drawn
    from a generator seeded with ``seed`` when given (so an adapter's seed fixes it, whatever the global
    RNG holds) without touching the global RNG."""
    if in_dim < 1 or dim < 1:
        raise ConfigError(f"projector dimensions must be >= 1, got {in_dim} -> {dim}")
    if seed is None:
        return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU(), nn.Linear(dim, dim))


@torch.no_grad()
def nearest_prototypes(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """(B, D): for each row of ``features``, the row of ``prototypes`` (K, D) of highest cosine similarity."""
    sim = F.normalize(features.detach(), dim=1) @ F.normalize(prototypes, dim=1).T
    return prototypes[sim.argmax(1)]


def supcon_loss(h: torch.Tensor, views: int, temperature: float = 0.1,
                base_temperature: Optional[float] = None) -> torch.Tensor:
    """SupCon without labels over ``h`` (V*B, P), L2-normalised rows stacked view by view (row ``v*B + i``
    is view v of sample i). With ``s_uw = h_u . h_w / temperature``:

    ``L = -(temperature / base_temperature) / (VB) * sum_u 1/(V-1) * sum_{v in pos(u)} [s_uv - log Z_u]``,
    ``Z_u = sum_{w != u} exp s_uw``,

    where pos(u) are the other V-1 views of u's sample. ``base_temperature`` defaults to ``temperature``
    (the factor is then 1, as in RMT). ``logsumexp`` makes it stable without subtracting the row maximum.
    """
    n = h.shape[0]
    if views < 2 or n % views:
        raise ValueError(f"supcon_loss needs >= 2 views and a row count divisible by them, got {n} rows, {views} views")
    s = h @ h.T / temperature
    self_mask = torch.eye(n, dtype=torch.bool, device=h.device)
    log_prob = s - torch.logsumexp(s.masked_fill(self_mask, float("-inf")), 1, keepdim=True)
    sample = torch.arange(n, device=h.device) % (n // views)
    positive = (sample[:, None] == sample[None, :]) & ~self_mask
    mean_positive = log_prob.masked_fill(~positive, 0).sum(1) / (views - 1)
    return -(temperature / (base_temperature or temperature)) * mean_positive.mean()


class PrototypeContrast(nn.Module):
    """``loss = module(f, f_a)``: the contrastive loss of the module docstring. Holds the projector (a
    trainable submodule: its owner adds it to the optimizer and its reset point) and the prototypes (a
    buffer, K x D)."""

    def __init__(self, prototypes: torch.Tensor, dim: int = 128, temperature: float = 0.1,
                 seed: Optional[int] = None):
        super().__init__()
        if not temperature > 0:
            raise ConfigError(f"contrastive temperature must be > 0, got {temperature}")
        if prototypes.dim() != 2 or len(prototypes) == 0:
            raise ConfigError(f"prototypes must be a non-empty (K, D) tensor, got shape {tuple(prototypes.shape)}")
        self.temperature = temperature
        self.register_buffer("prototypes", prototypes.detach().clone())
        self.projector = projector(prototypes.shape[1], dim, seed).to(prototypes.device)

    def forward(self, features: torch.Tensor, augmented: torch.Tensor) -> torch.Tensor:
        anchors = nearest_prototypes(features, self.prototypes)
        h = F.normalize(self.projector(torch.cat([anchors, features, augmented])), dim=1)
        return supcon_loss(h, views=3, temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"prototypes={tuple(self.prototypes.shape)}, temperature={self.temperature}"
