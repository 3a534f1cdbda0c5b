"""Sample filters: ``f(batch, mask) -> mask`` narrows the set of samples that enter the per-sample loss.

A filter only looks at the samples still in ``mask`` and returns a subset of them, so the chain is an
AND and its order only matters for stateful filters (``Redundancy`` learns from what it lets through,
so it goes last). Decisions are made on detached values; a filter must not be the first to read a
cached ``Batch`` property under ``no_grad`` (the objective would then get a tensor without a graph).
Formulas: METHODS.md 3.3 (entropy margin,
redundancy), 3.5 (PLPD), 3.6 (confidence drop against the source model).
"""
from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Part


def entropy_threshold(margin_frac: float, num_classes: int) -> float:
    """``margin_frac * ln C``: the entropy margins of EATA/SAR/DeYO scale with the number of classes."""
    return margin_frac * math.log(num_classes)


class EntropyMargin(Part):
    """Keep confident samples, ``H(p) < margin_frac * ln C`` (C from the logits unless given)."""

    def __init__(self, margin_frac: float = 0.4, num_classes: Optional[int] = None):
        self.margin_frac, self.num_classes = margin_frac, num_classes

    def __call__(self, batch, mask: torch.Tensor) -> torch.Tensor:
        e0 = entropy_threshold(self.margin_frac, self.num_classes or batch.num_classes)
        return mask & (batch.entropy.detach() < e0)


class Redundancy(Part):
    """EATA's diversity filter: drop samples whose prediction points where recent ones already did.

    Keeps ``|cos(p, m)| < d_margin`` where ``m`` is a moving average of the predictions this filter let
    through (``m <- 0.9 m + 0.1 mean p``). On the first batch ``m`` is undefined: nothing is dropped and
    ``m`` starts as the mean of the incoming survivors. ``m`` moves only on batches that update state
    (not SAM's second pass) and only when someone survived.
    """

    def __init__(self, d_margin: float):
        self.d_margin = d_margin
        self._mean: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self._mean = None

    def __call__(self, batch, mask: torch.Tensor) -> torch.Tensor:
        probs = batch.probs.detach()
        if self._mean is not None:
            cos = F.cosine_similarity(self._mean.unsqueeze(0), probs, dim=1)
            mask = mask & (cos.abs() < self.d_margin)
        if batch.update_state and bool(mask.any()):
            new = probs[mask].mean(0)
            self._mean = new if self._mean is None else 0.9 * self._mean + 0.1 * new
        return mask


def patch_shuffle(x: torch.Tensor, patches: int, generator: torch.Generator) -> torch.Tensor:
    """Cut each image into a ``patches x patches`` grid and permute the tiles, independently per image.

    Sides that do not divide are resized to the nearest smaller multiple and back (as DeYO does).
    """
    n, c, h, w = x.shape
    th, tw = (h // patches) * patches, (w // patches) * patches
    if (th, tw) != (h, w):
        x = F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False, antialias=True)
    ph, pw = th // patches, tw // patches
    tiles = x.reshape(n, c, patches, ph, patches, pw).permute(0, 2, 4, 1, 3, 5).reshape(n, patches * patches, c, ph, pw)
    perm = torch.rand(n, patches * patches, generator=generator).argsort(1).to(x.device)
    tiles = tiles[torch.arange(n, device=x.device).unsqueeze(1), perm]
    out = tiles.reshape(n, patches, patches, c, ph, pw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, th, tw)
    if (th, tw) != (h, w):
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out


def pixel_shuffle(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One random permutation of the pixel positions, shared by the whole batch."""
    n, c, h, w = x.shape
    perm = torch.randperm(h * w, generator=generator).to(x.device)
    return x.reshape(n, c, h * w)[:, :, perm].reshape(n, c, h, w)


def occlude(x: torch.Tensor) -> torch.Tensor:
    """Replace the central square of half the side with each image's per-channel mean (DeYO's 112 at 56 for 224 px)."""
    h, w = x.shape[-2:]
    out = x.clone()
    out[:, :, h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = x.mean(dim=(2, 3), keepdim=True)
    return out


class PLPD(Part):
    """DeYO: keep samples whose pseudo-label probability drops when the object's shape is destroyed.

    ``PLPD_i = p_i[y_i] - p'_i[y_i]`` with ``p'`` the same model's prediction (no gradient; norm layers
    see the statistics of the destroyed sub-batch) on a shape-destroying transform of the selected
    images; keep ``PLPD > threshold``. The values are left in ``batch.extras["plpd"]`` (0 where not
    computed) for :class:`~tta.parts.weights.DeyoWeight`.
    """

    KINDS = ("patch", "pixel", "occlusion")

    def __init__(self, threshold: float = 0.2, patches: int = 4, kind: str = "patch"):
        if kind not in self.KINDS:
            raise ConfigError(f"PLPD kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        self.threshold, self.patches, self.kind = threshold, patches, kind

    def destroy(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if self.kind == "patch":
            return patch_shuffle(x, self.patches, generator)
        if self.kind == "pixel":
            return pixel_shuffle(x, generator)
        return occlude(x)

    def __call__(self, batch, mask: torch.Tensor) -> torch.Tensor:
        plpd = torch.zeros(mask.shape[0], device=mask.device)
        batch.extras["plpd"] = plpd
        if not bool(mask.any()):
            return mask
        adapter = batch.adapter
        probs = batch.probs.detach()[mask]  # cached with its graph: read outside no_grad
        label = probs.argmax(1, keepdim=True)
        with torch.no_grad():
            destroyed = adapter.model(self.destroy(batch.x[mask].detach(), adapter.generator)).softmax(1)
        plpd[mask] = (probs.gather(1, label) - destroyed.gather(1, label)).squeeze(1)
        return mask & (plpd > self.threshold)


class ConfidenceDrop(Part):
    """Wisdom of crowds: drop samples the adapted model is less sure of than the source model was.

    With ``c_o`` the source model's class, keep ``p_a[c_o] - p_o[c_o] >= margin``. The source model is
    a frozen copy of the configured model taken at ``bind`` (so it normalises the same way as the
    adapted one; with source statistics almost every sample would pass, METHODS.md 3.6).
    """

    def __init__(self, margin: float = 0.0):
        self.margin = margin
        self._source = None

    def bind(self, adapter) -> None:
        self._source = copy.deepcopy(adapter.model).requires_grad_(False)

    def __call__(self, batch, mask: torch.Tensor) -> torch.Tensor:
        x = batch.x.detach()
        if next(self._source.parameters()).device != x.device:
            self._source.to(x.device)
        with torch.inference_mode():
            p_o = self._source(x).softmax(1)
            c_o = p_o.argmax(1, keepdim=True)
            conf_o = p_o.gather(1, c_o).squeeze(1)
        conf_a = batch.probs.detach().gather(1, c_o.clone()).squeeze(1)
        return mask & (conf_a - conf_o.clone() >= self.margin)

    def __repr__(self):
        return f"ConfidenceDrop(margin={self.margin})"
