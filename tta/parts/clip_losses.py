"""CLIPTTA's parts (METHODS.md 3.9): soft batch contrastive loss, Otsu-initialised OOD threshold (OCE),
and the class-wise confident memory.

Everything works on CLIP logits ``z = tau * u @ T.T``: the batch image-caption similarity
``S_ij = tau * u_i . t_{y_j}`` is just ``z[i, y_j]``, and the temperature-1 cosine logits are ``z / tau``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Part


def _entropy(logits: torch.Tensor, dim: int) -> torch.Tensor:
    """Shannon entropy along ``dim``; the +1e-6 follows the reference code (a softmax shift, no-op in exact math)."""
    logits = logits + 1e-6
    return -(logits.softmax(dim) * logits.log_softmax(dim)).sum(dim)


def caption_similarity(logits: torch.Tensor) -> torch.Tensor:
    """``S_ij = z[i, argmax z_j]``: every image against the pseudo-caption of every image of the batch."""
    return logits[:, logits.detach().argmax(1)]


class SoftContrastive(Part):
    """Per-sample soft contrastive loss; its batch mean is ``L_sc``.

    Image->text: ``H(softmax_j S_i.)``. With ``text_to_image`` (for when the text side adapts) the
    per-sample value is ``(H(softmax_j S_i.) + H(softmax_i S_.i)) / 2``; the reference uses image->text
    only when the text encoder is frozen. Negatives are the captions of the other images, so when every
    image has the same pseudo-class all columns are equal, P is uniform and the gradient is zero: the
    loss cannot be lowered by collapsing the batch onto one class.
    """

    def __init__(self, text_to_image: bool = False):
        self.text_to_image = text_to_image

    def __call__(self, batch) -> torch.Tensor:
        s = caption_similarity(batch.logits)
        loss = _entropy(s, 1)
        return (loss + _entropy(s, 0)) / 2 if self.text_to_image else loss


def max_log_prob(logits: torch.Tensor, scale) -> torch.Tensor:
    """CLIPTTA's OOD score ``max_k log softmax(z / scale)_k`` (temperature-1 cosine logits; higher = ID)."""
    return (logits / scale).log_softmax(1).max(1).values


def otsu_threshold(scores: torch.Tensor) -> torch.Tensor:
    """Exact Otsu threshold of 1-d scores: the ``t`` maximising ``w0 w1 (mu0 - mu1)^2`` over ``{s <= t}, {s > t}``.

    Histogram-free (every split between sorted values is tried); ties are never split.
    """
    s = scores.detach().flatten().double().sort().values
    n = s.numel()
    if n < 2 or s[0] == s[-1]:
        return s[0].to(scores.dtype)
    k = torch.arange(1, n, dtype=s.dtype, device=s.device)  # size of the low class
    low = s.cumsum(0)[:-1]
    mu0, mu1 = low / k, (s.sum() - low) / (n - k)
    between = (k / n) * (1 - k / n) * (mu0 - mu1) ** 2
    between[s[:-1] == s[1:]] = -1  # a split inside a run of equal values is not a threshold
    return s[int(between.argmax())].to(scores.dtype)


class OutlierContrast(nn.Module):
    """OCE: a learnable ID/OOD threshold ``alpha`` (re-initialised by Otsu on each batch) and the loss
    ``-(mu_in - mu_out)^2`` between the soft-membership-weighted score means ("avg_contrastive")."""

    def __init__(self, gamma: float = 0.005):
        super().__init__()
        self.gamma = gamma
        self.alpha = nn.Parameter(torch.zeros(()))

    @torch.no_grad()
    def init_threshold(self, scores: torch.Tensor) -> None:
        self.alpha.copy_(otsu_threshold(scores))

    def membership(self, scores: torch.Tensor) -> torch.Tensor:
        """Soft ID membership ``sigmoid((s - alpha) / gamma)``."""
        return torch.sigmoid((scores - self.alpha) / self.gamma)

    def is_id(self, scores: torch.Tensor) -> torch.Tensor:
        return scores.detach() > self.alpha.detach()

    def forward(self, scores: torch.Tensor) -> torch.Tensor:
        w = self.membership(scores)
        mu_in = (w * scores).sum() / w.sum().clamp_min(1e-12)
        mu_out = ((1 - w) * scores).sum() / (1 - w).sum().clamp_min(1e-12)
        return -(mu_in - mu_out) ** 2


class ClassMemory(Part):
    """Per class, the ``k`` most confident images seen so far (CLIPTTA's CCM); reset with the model."""

    def __init__(self, num_classes: int, k: int):
        self.num_classes, self.k = num_classes, k
        self.reset()

    def reset(self) -> None:
        self.images: Optional[torch.Tensor] = None  # (C, k, *image shape)
        self.conf = torch.full((self.num_classes, self.k), -float("inf"))

    def __len__(self) -> int:
        return int(torch.isfinite(self.conf).sum())

    @torch.no_grad()
    def add(self, images: torch.Tensor, labels: torch.Tensor, conf: torch.Tensor) -> None:
        """Insert each image under its label; every class keeps its top-``k`` by confidence."""
        if self.images is None:
            self.images = images.new_zeros((self.num_classes, self.k, *images.shape[1:]))
            self.conf = self.conf.to(images.device)
        for c in labels.unique().tolist():
            pick = labels == c
            conf_c = torch.cat([self.conf[c], conf[pick].to(self.conf.dtype)])
            imgs_c = torch.cat([self.images[c], images[pick]])
            top = conf_c.topk(self.k).indices
            self.conf[c], self.images[c] = conf_c[top], imgs_c[top]

    def sample(self, per_class: int, generator: torch.Generator) -> Optional[torch.Tensor]:
        """Up to ``per_class`` random stored images of each class (all when fewer), or None when empty."""
        if self.images is None or len(self) == 0:
            return None
        out = []
        for c in range(self.num_classes):
            stored = torch.nonzero(torch.isfinite(self.conf[c])).flatten()
            if stored.numel():
                order = torch.randperm(stored.numel(), generator=generator)[:per_class].to(stored.device)
                out.append(self.images[c, stored[order]])
        return torch.cat(out)
