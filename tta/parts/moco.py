"""AdaContrast's memories (METHODS-ZOO Z.11): the MoCo key queue with its class-aware InfoNCE logits, and
the soft k-nearest-neighbour bank that refines pseudo-labels.

Both live in the encoder's feature space (64-d on the CIFAR ResNet-20). They are filled lazily, at the
first batch, when the feature size and the number of classes are known; ``clear()`` / ``reset()`` empty
them, so an adapter's reset followed by the same batches rebuilds the same state.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError


class KeyQueue:
    """``size`` normalised key features (``features``: D x size) with the pseudo-label each key was stored
    with, written as a ring at ``ptr``. It starts as column-normalised N(0, 1) vectors with labels uniform
    over the classes (MoCo's random initial queue), drawn from the adapter's generator."""

    def __init__(self, size: int = 16384, temperature: float = 0.07, class_aware: bool = True):
        if size < 1 or not temperature > 0:
            raise ConfigError(f"queue_size must be >= 1 and temperature > 0, got {size}, {temperature}")
        self.size, self.temperature, self.class_aware = size, temperature, class_aware
        self.features: Optional[torch.Tensor] = None
        self.labels: Optional[torch.Tensor] = None
        self.ptr = 0

    @property
    def empty(self) -> bool:
        return self.features is None

    def clear(self) -> None:
        self.features, self.labels, self.ptr = None, None, 0

    def fill(self, dim: int, num_classes: int, generator: torch.Generator, device=None) -> None:
        """The random initial queue (features first, then labels, both from ``generator``)."""
        features = torch.randn(dim, self.size, generator=generator)
        labels = torch.randint(0, num_classes, (self.size,), generator=generator)
        self.features, self.labels, self.ptr = F.normalize(features, dim=0).to(device), labels.to(device), 0

    def push(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write ``keys`` (B, D) and their ``labels`` (B,) at the pointer (mod size). The features are
        replaced out of place: logits computed before the push keep the old queue in their graph."""
        if len(keys) > self.size:
            raise InputError(f"a batch of {len(keys)} images does not fit the key queue of {self.size}; "
                             "use a larger queue_size or smaller batches")
        idx = (self.ptr + torch.arange(len(keys), device=keys.device)) % self.size
        self.features = self.features.index_copy(1, idx, keys.T.to(self.features.dtype))
        self.labels[idx] = labels
        self.ptr = (self.ptr + len(keys)) % self.size

    def instance_logits(self, q: torch.Tensor, k: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Z.11 steps 5-7: ``[q.k, q.Q] / T`` (B, 1 + size) against the queue *before* ``k`` and ``labels``
        are enqueued; then the push; then, class-aware, every negative whose stored label equals the
        query's pseudo-label is set to -inf, with the labels *after* the push (so the slots just written
        carry this batch's labels next to the features they had before). The positive stays.
        ``q``, ``k``: L2-normalised (B, D) features, ``k`` without gradient."""
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ self.features], 1) / self.temperature
        self.push(k, labels)
        if self.class_aware:
            same = labels.view(-1, 1) == self.labels.view(1, -1)
            logits = logits.masked_fill(F.pad(same, (1, 0)), float("-inf"))
        return logits


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample InfoNCE ``-log softmax(l)_0`` (the positive is column 0)."""
    return -logits.log_softmax(1)[:, 0]


class KNNBank:
    """(feature, probability) pairs of past test images for soft k-NN pseudo-labels (Z.11 steps 2, 10).

    ``push``: while the bank holds fewer than ``capacity`` rows a batch is appended (so it can overshoot:
    16,400 rows at capacity 16,384 and batch 200); from then on a batch overwrites rows at the pointer,
    modulo the bank's size. The pointer is the reference's ``(pointer + B) mod rows`` after each push, also
    while the bank grows: after growing it points at the last batch appended, which the first overwrite
    therefore replaces.
    ``refine``: cosine distance ``1 - f^.F^T`` to every stored feature, the ``neighbours`` nearest, the
    mean of their stored probabilities, its arg-max.
    """

    def __init__(self, capacity: int = 16384, neighbours: int = 10):
        if capacity < 1 or neighbours < 1:
            raise ConfigError(f"bank capacity and neighbours must be >= 1, got {capacity}, {neighbours}")
        self.capacity, self.neighbours = capacity, neighbours
        self.reset()

    def reset(self) -> None:
        self.features: Optional[torch.Tensor] = None
        self.probs: Optional[torch.Tensor] = None
        self.ptr = 0

    def __len__(self) -> int:
        return 0 if self.features is None else len(self.features)

    @torch.no_grad()
    def push(self, features: torch.Tensor, probs: torch.Tensor) -> None:
        """Store ``features`` (B, D, not normalised) and ``probs`` (B, C)."""
        if len(self) < self.capacity:
            self.features = features.clone() if self.features is None else torch.cat([self.features, features])
            self.probs = probs.clone() if self.probs is None else torch.cat([self.probs, probs])
        else:
            idx = (self.ptr + torch.arange(len(features), device=features.device)) % len(self)
            self.features[idx] = features
            self.probs[idx] = probs
        self.ptr = (self.ptr + len(features)) % len(self)

    @torch.no_grad()
    def refine(self, features: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(labels, probs)`` of the soft k-NN vote for ``features`` (B, D)."""
        if len(self) < self.neighbours:
            raise InputError(f"the k-NN bank holds {len(self)} entries, fewer than the {self.neighbours} "
                             "neighbours asked for")
        distances = 1 - F.normalize(features, dim=1) @ F.normalize(self.features, dim=1).T
        nearest = distances.topk(self.neighbours, dim=1, largest=False).indices
        probs = self.probs[nearest].mean(1)
        return probs.argmax(1), probs


__all__ = ["KeyQueue", "KNNBank", "info_nce"]
