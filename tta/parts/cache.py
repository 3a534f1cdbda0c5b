"""The per-class priority cache of the training-free CLIP methods (METHODS-VLM V.15.4): TDA's positive and
negative caches, BoostAdapter's historical cache (plus its temporary boosting entries), DPE's cache and
DMN's dynamic memory are all this one structure with different read-outs.

Storage is a set of fixed tensors, ``keys (C, K, D)``, ``priority (C, K)`` (``+inf`` marks an empty slot,
lower is better: an entropy) and an optional ``payload (C, K, P)``, so every read-out is a few batched
tensor operations with a validity mask instead of a Python loop over lists. The insert rule is the
lists' rule: a class with a free slot takes the entry; a full class replaces its worst entry if and only
if the newcomer's priority is strictly lower. Slots are kept sorted by priority (stable, so among equal
priorities the older entry ranks first), which is what "append, stable sort, truncate" gives.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..errors import ConfigError
from .base import Part


class ClassCache(Part):
    """``capacity`` entries per class; tensors are allocated at the first insert (C, D, P from it)."""

    def __init__(self, capacity: int, num_classes: Optional[int] = None):
        if capacity < 1:
            raise ConfigError(f"cache capacity must be >= 1, got {capacity}")
        self.capacity, self.num_classes = capacity, num_classes
        self.reset()

    def reset(self) -> None:
        self.keys: Optional[torch.Tensor] = None
        self.priority: Optional[torch.Tensor] = None
        self.payload: Optional[torch.Tensor] = None

    def _allocate(self, key: torch.Tensor, payload: Optional[torch.Tensor], num_classes: int) -> None:
        c, k = num_classes, self.capacity
        self.keys = key.new_zeros(c, k, key.shape[-1])
        self.priority = torch.full((c, k), float("inf"), dtype=torch.float64, device=key.device)
        self.payload = None if payload is None else payload.new_zeros(c, k, payload.shape[-1])

    @property
    def valid(self) -> torch.Tensor:
        """``(C, K)`` bool: which slots hold an entry."""
        return torch.isfinite(self.priority)

    def __len__(self) -> int:
        return 0 if self.priority is None else int(self.valid.sum())

    def insert(self, cls: int, key: torch.Tensor, priority: float, payload: Optional[torch.Tensor] = None,
               num_classes: Optional[int] = None) -> bool:
        """Offer one entry to class ``cls``; returns whether it was kept."""
        if self.keys is None:
            n = num_classes or self.num_classes
            if n is None:
                raise ConfigError("ClassCache needs num_classes (at construction or first insert)")
            self._allocate(key, payload, n)
        prio = self.priority[cls]
        worst = int(torch.argmax(prio))  # an empty slot (inf) is the worst; among equals the first...
        worst = int(torch.nonzero(prio == prio[worst]).max())  # ...so take the last: the newest of equals
        if not priority < float(prio[worst]):
            return False
        self.keys[cls, worst] = key
        prio[worst] = priority
        if self.payload is not None:
            self.payload[cls, worst] = payload
        order = torch.sort(prio, stable=True).indices
        self.priority[cls] = prio[order]
        self.keys[cls] = self.keys[cls, order]
        if self.payload is not None:
            self.payload[cls] = self.payload[cls, order]
        return True

    def copy(self) -> "ClassCache":
        """An independent copy (BoostAdapter's temporary cache with boosting entries)."""
        out = ClassCache(self.capacity, self.num_classes)
        if self.keys is not None:
            out.keys, out.priority = self.keys.clone(), self.priority.clone()
            out.payload = None if self.payload is None else self.payload.clone()
        return out

    def grown(self, capacity: int) -> "ClassCache":
        """A copy with room for ``capacity`` entries per class (existing entries kept, in order)."""
        out = ClassCache(capacity, self.num_classes)
        if self.keys is not None:
            extra = capacity - self.capacity
            if extra < 0:
                raise ConfigError(f"cannot shrink a cache from {self.capacity} to {capacity}")
            c, _, d = self.keys.shape
            out.keys = torch.cat([self.keys, self.keys.new_zeros(c, extra, d)], 1)
            out.priority = torch.cat([self.priority, self.priority.new_full((c, extra), float("inf"))], 1)
            if self.payload is not None:
                out.payload = torch.cat([self.payload, self.payload.new_zeros(c, extra, self.payload.shape[-1])], 1)
        return out

    # ------------------------------------------------------------------------------- read-outs
    def affinity(self, queries: torch.Tensor, beta: float) -> torch.Tensor:
        """``(B, C, K)``: Tip-Adapter's kernel ``exp(-beta (1 - q . k))`` on raw dot products, 0 on empty slots."""
        a = torch.exp(-beta * (1 - torch.einsum("bd,ckd->bck", queries.to(self.keys), self.keys)))
        return a * self.valid.to(a)

    def tip_onehot(self, queries: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
        """``alpha * sum_e phi(q . k_e) onehot(class_e)`` per query: (B, C)."""
        if self.keys is None:
            return queries.new_zeros(len(queries), self.num_classes or 0)
        return alpha * self.affinity(queries, beta).sum(2)

    def tip_masked(self, queries: torch.Tensor, alpha: float, beta: float, low: float, high: float) -> torch.Tensor:
        """``alpha * sum_e phi(q . k_e) 1[low < payload_e < high]`` per query: (B, C) (TDA's negative cache)."""
        if self.keys is None:
            return queries.new_zeros(len(queries), self.num_classes or 0)
        mask = ((self.payload > low) & (self.payload < high)).to(self.keys)  # (C, K, P=C)
        return alpha * torch.einsum("bck,ckp->bp", self.affinity(queries, beta), mask)

    def class_means(self) -> torch.Tensor:
        """``(C, D)``: mean key of each class (zeros for an empty class)."""
        v = self.valid.to(self.keys)
        return (self.keys * v.unsqueeze(-1)).sum(1) / v.sum(1, keepdim=True).clamp_min(1)
