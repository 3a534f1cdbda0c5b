"""Pseudo-caption contrastive loss with soft, non-detached targets, shared by WATT and CLIPArTT
(METHODS-VLM V.10 c-d, V.11 step 3, V.15.6), and CLIPArTT's top-K captions.

Each image ``i`` of a batch gets a pseudo-caption embedding ``u_i`` (WATT: the text embedding of its predicted
class under one template; CLIPArTT: the embedding of "a photo of a c1 or c2 or c3" from its top 3 classes).
With normalised image features ``F`` (B x D, with gradient) and captions ``U``:

* logits ``G_ij = s f_i . u_j`` (image i against the caption of image j, ``s = exp(logit_scale)``);
* targets ``Q = softmax_row(((F F^T + U U^T) / 2) / tau)``, ``tau = 0.01``: images that look alike or have
  alike captions share probability mass, so a batch whose images share a class is not forced to tell them
  apart. Q is **not detached**: the gradient also flows through ``F F^T``, as in both official codes;
* loss ``L = (1/B) sum_i sum_j -Q_ji log softmax_j(G_i.)`` (``targets="transposed"``, the official codes and
  the spec's formula). ``Q`` is row-normalised, so the transposed weights of one image do not sum to 1 in
  general; ``targets="rows"`` uses ``Q_ij`` (a proper distribution over captions per image) instead.
  The paper texts were not readable here, so which one the papers mean is unverified; the default follows
  the code.

With one image the softmax runs over one caption: the loss and its gradient are exactly 0 (V.10 pitfall).
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence, Tuple

import torch

from ..errors import ConfigError
from .base import Part

TARGETS = ("transposed", "rows")


def caption_targets(f: torch.Tensor, u: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """``Q = softmax_row(((F F^T + U U^T) / 2) / temperature)`` (B x B), differentiable in both inputs."""
    return (((f @ f.t() + u @ u.t()) / 2) / temperature).softmax(1)


def pseudo_caption_loss(f: torch.Tensor, u: torch.Tensor, scale, temperature: float = 0.01,
                        targets: str = "transposed") -> torch.Tensor:
    """Per-image loss ``sum_j -T_ij log softmax_j(s f_i . u_j)`` with ``T = Q^T`` or ``Q`` (see module docstring);
    its mean is ``L``."""
    q = caption_targets(f, u, temperature)
    weights = q.t() if targets == "transposed" else q
    return -(weights * (scale * f @ u.t()).log_softmax(1)).sum(1)


class PseudoCaptionContrast(Part):
    """The loss as a part: ``part(f, u, scale) -> (B,)``, options checked once."""

    def __init__(self, temperature: float = 0.01, targets: str = "transposed"):
        if not temperature > 0:
            raise ConfigError(f"the target temperature must be > 0, got {temperature}")
        if targets not in TARGETS:
            raise ConfigError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.temperature, self.targets = temperature, targets

    def __call__(self, f: torch.Tensor, u: torch.Tensor, scale) -> torch.Tensor:
        return pseudo_caption_loss(f, u, scale, self.temperature, self.targets)


def caption_text(template: str, names: Sequence[str]) -> str:
    """CLIPArTT's caption: ``template`` filled with the names joined by " or " ("a photo of a cat or dog")."""
    return template.format(" or ".join(names))


class TopKCaptions:
    """Embeddings of the top-K captions of a batch: ``bank(class_indices (B, K)) -> (B, D)``.

    Only the distinct index rows are built and encoded, and each caption is encoded once per batch (the
    text tower is frozen, so a caption's embedding never changes): CLIPArTT's 10 iterations mostly repeat
    the same captions. ``clear()`` empties the cache; the adapter does it at every batch, so a batch's
    numbers do not depend on which batches came before.
    """

    def __init__(self, classnames: Sequence[str], template: str, encode: Callable[[List[str]], torch.Tensor]):
        self.classnames, self.template, self.encode = list(classnames), template, encode
        self.cache: Dict[Tuple[int, ...], torch.Tensor] = {}

    def clear(self) -> None:
        self.cache = {}

    def __call__(self, indices: torch.Tensor) -> torch.Tensor:
        rows, inverse = torch.unique(indices, dim=0, return_inverse=True)
        keys = [tuple(r) for r in rows.tolist()]
        new = [k for k in keys if k not in self.cache]
        if new:
            emb = self.encode([caption_text(self.template, [self.classnames[c] for c in k]) for k in new])
            self.cache.update(zip(new, emb))
        return torch.stack([self.cache[k] for k in keys])[inverse.to(indices.device)]


__all__ = ["caption_targets", "pseudo_caption_loss", "PseudoCaptionContrast", "caption_text", "TopKCaptions",
           "TARGETS"]
