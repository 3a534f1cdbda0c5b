"""CSTU: the category-balanced sampling memory with timeliness and uncertainty of RoTTA (METHODS-ZOO Z.6),
reused unchanged by PeTTA (Z.13), and the timeliness weight of RoTTA's loss.

The memory keeps at most ``capacity`` (M) test images with their pseudo-label, uncertainty (prediction
entropy) and age, balanced over the C classes with a per-class quota ``Q = M / C`` (a float: 6.4 for
M = 64, C = 10). Each stored item has a score that grows with its age and its uncertainty::

    score(g, u) = lambda_t / (1 + exp(-g / M)) + lambda_u * u / ln C

(``g``: the age in adds, as stored; ``u``: the entropy). Adding ``(x, y, u)``, with ``s_new = score(0, u)``:

* class y holds fewer than Q items: accept when the memory holds fewer than M items; otherwise the
  *victim classes* are all classes whose occupancy equals the current maximum;
* class y holds Q items or more: the victim class is y itself;
* the victim classes are scanned in increasing id, their items in insertion order; the candidate is the
  item with the largest score, a tie going to the one scanned **last**. If its score exceeds
  ``s_new`` it is deleted and the new item accepted, else the new item is rejected (no victims: accept);
* an accepted item joins the end of its class list with age 0; then **every** stored item ages by one
  (the new one too), whether or not the new item was accepted.

Ages are kept as the add count at insertion (``age = adds so far - birth``), which equals ageing every
item after every add without touching each item. Accepted images are copied, so the memory never holds
a view of a batch the caller may reuse or that would otherwise stay alive.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, NamedTuple, Sequence

import torch

from ..errors import ConfigError, InputError


def timeliness(ages: torch.Tensor, capacity: int) -> torch.Tensor:
    """RoTTA's per-item loss weight ``e^{-t} / (1 + e^{-t})`` with ``t = age / capacity``: older items (whose
    pseudo-labels came from an older teacher) count less, from 1/2 at age 0 towards 0."""
    t = ages.float() / capacity
    e = torch.exp(-t)
    return e / (1 + e)


@dataclass
class _Item:
    image: torch.Tensor
    uncertainty: float
    birth: int  # the add count when it was stored


class MemoryContents(NamedTuple):
    """The stored items ordered by class id, then insertion order."""
    images: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor  # (N,) int64 pseudo-labels
    uncertainties: torch.Tensor  # (N,) float
    ages: torch.Tensor  # (N,) int64


class CSTUMemory:
    """See the module docstring. ``add`` one sample at a time (RoTTA updates between two samples) or
    ``add_batch``; ``contents()`` returns the stacked items; ``reset()`` empties it."""

    def __init__(self, capacity: int = 64, num_classes: int = 10, lambda_t: float = 1.0, lambda_u: float = 1.0):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ConfigError(f"memory capacity must be a positive integer, got {capacity!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ConfigError(f"the memory needs num_classes >= 2 (its uncertainty term divides by ln C), "
                              f"got {num_classes!r}")
        self.capacity, self.num_classes = capacity, num_classes
        self.lambda_t, self.lambda_u = float(lambda_t), float(lambda_u)
        self.quota = capacity / num_classes
        self._log_c = math.log(num_classes)
        self.reset()

    def reset(self) -> None:
        self._classes: List[List[_Item]] = [[] for _ in range(self.num_classes)]
        self._size = 0
        self._adds = 0

    def __len__(self) -> int:
        return self._size

    def score(self, age: int, uncertainty: float) -> float:
        return self.lambda_t / (1 + math.exp(-age / self.capacity)) + self.lambda_u * uncertainty / self._log_c

    def occupancy(self) -> List[int]:
        return [len(items) for items in self._classes]

    def add(self, image: torch.Tensor, label: int, uncertainty: float) -> bool:
        """Offer one sample; True when it was stored. Every stored item ages by one either way."""
        label = int(label)
        if not 0 <= label < self.num_classes:
            raise InputError(f"memory label must be in [0, {self.num_classes}), got {label}")
        uncertainty = float(uncertainty)
        accepted = self._make_room(label, self.score(0, uncertainty))
        if accepted:
            self._classes[label].append(_Item(image.detach().clone(), uncertainty, self._adds))
            self._size += 1
        self._adds += 1
        return accepted

    def add_batch(self, images: torch.Tensor, labels: torch.Tensor, uncertainties: torch.Tensor) -> List[bool]:
        """``add`` each row in order; which rows were stored."""
        return [self.add(x, y, u) for x, y, u in zip(images, labels.tolist(), uncertainties.tolist())]

    def _make_room(self, label: int, new_score: float) -> bool:
        """Whether the new item may enter, deleting the victim that makes room for it (module docstring)."""
        occupancy = self.occupancy()
        if occupancy[label] < self.quota:
            if self._size < self.capacity:
                return True
            top = max(occupancy)
            victims: Sequence[int] = [c for c, n in enumerate(occupancy) if n == top]
        else:
            victims = [label]
        best, where = None, None
        for c in victims:
            for i, item in enumerate(self._classes[c]):
                s = self.score(self._adds - item.birth, item.uncertainty)
                if best is None or s >= best:  # ties: the last one scanned
                    best, where = s, (c, i)
        if where is None:
            return True
        if best > new_score:
            del self._classes[where[0]][where[1]]
            self._size -= 1
            return True
        return False

    def contents(self) -> MemoryContents:
        """All items, ordered by class id then insertion order (an empty memory has no image shape: error)."""
        items = [(c, item) for c, per_class in enumerate(self._classes) for item in per_class]
        if not items:
            raise InputError("the memory is empty")
        device = items[0][1].image.device
        return MemoryContents(
            torch.stack([item.image for _, item in items]),
            torch.tensor([c for c, _ in items], dtype=torch.long, device=device),
            torch.tensor([item.uncertainty for _, item in items], device=device),
            torch.tensor([self._adds - item.birth for _, item in items], dtype=torch.long, device=device))

    def __repr__(self):
        return (f"CSTUMemory(capacity={self.capacity}, num_classes={self.num_classes}, "
                f"lambda_t={self.lambda_t}, lambda_u={self.lambda_u}, size={self._size})")
