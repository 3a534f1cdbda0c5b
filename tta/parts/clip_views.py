"""The CLIP test-time views (METHODS-VLM V.14, V.15.2): one generator for TPT, ZERO, MTA, VTE, ADTE and the
cache methods, batched over all views of all images of a batch, seeded, on the images' device.

``N`` views per image, view 0 always the original: shorter side resized (bicubic) to the model's input size
``S`` and centre-cropped (:func:`tta.models.clip.resize_center_crop`, CLIP's own preprocessing). Views
1..N-1 by ``policy``:

* ``none``: no other view (``N`` must be 1: TDA's and DPE's single-view data sets);
* ``crop_flip``: torchvision's ``RandomResizedCrop(S)`` on the raw image (area fraction ~ U(0.08, 1), log
  aspect ratio ~ U(ln 3/4, ln 4/3), 10 attempts then the centre-crop fallback: the boxes of
  :func:`tta.parts.views.crop_boxes`), then a horizontal flip with probability 1/2. The crop is resized as
  PIL's ``BILINEAR`` resize does (the filter widens by the shrink factor, so a large crop is antialiased as
  the reference's PIL pipeline antialiases it), written as two resampling matrices per view, so all views
  of a batch are two batched matrix products. Deviation: values stay float (PIL rounds to 8 bits);
* ``augmix``: the crop-flip view is the canvas of AugMix (TPT's ``AugMixAugmenter``, V.14 item 3):
  3 chains of 1-3 ops at severity 1 on the canvas as an 8-bit image, ``view = m canvas + (1 - m)
  sum_i w_i chain_i`` with ``w ~ Dirichlet(1, 1, 1)``, ``m ~ Beta(1, 1)``. Draws and ops are those of
  :mod:`tta.parts.augmix` (tested against PIL); the chains start from the canvas rounded to 8 bits (PIL's
  resize output) and the canvas term itself stays float, so the AugMix view with ``m = 1`` is exactly the
  crop-flip view of the same draws.

Randomness: every image has its own ``torch.Generator``, seeded by :func:`image_seeds` from the adapter's
generator, and its boxes, flips and AugMix numbers (in that order) come from it alone. Hence an image's
views depend on the run seed and the image's position in the stream since the last ``reset()``, never on
the batch size, the chunking or the device; and the crop-flip views of a seed are the canvases of its
AugMix views. Draws are made on the CPU (small), pixels are computed on the images' device.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional, Sequence

import torch

from ..errors import ConfigError, InputError
from ..imageops import resize_center_crop
from .augmix import AugMixDraws, draw as augmix_draw, run_chains
from .views import crop_boxes

POLICIES = ("none", "crop_flip", "augmix")
SEED_RANGE = 2 ** 62


def image_seeds(generator: torch.Generator, n: int) -> torch.Tensor:
    """``n`` per-image seeds (int64), drawn in order from ``generator``. torch's CPU generator fills a tensor
    element by element, so one draw of ``n`` equals ``n`` draws of one (tested): batching never moves a seed."""
    return torch.randint(0, SEED_RANGE, (n,), generator=generator)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, size: int, extent: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``(k, size, extent)`` weights of PIL's ``BILINEAR`` resize of the pixels ``[start, start + length)`` of an
    axis of ``extent`` pixels to ``size`` pixels, for ``k`` crops (float tensors ``(k,)``): output pixel ``i``
    samples at ``c = start + (i + 1/2) length / size``, input pixel ``j`` weighs ``max(0, 1 - |j + 1/2 - c| / a)``
    with ``a = max(1, length / size)`` (a triangle widened when shrinking: antialiasing), only pixels inside
    the crop count, and each row is normalised to sum 1."""
    start, length = start.to(dtype).view(-1, 1, 1), length.to(dtype).view(-1, 1, 1)
    scale = length / size
    centre = start + (torch.arange(size, dtype=dtype, device=start.device).view(1, -1, 1) + 0.5) * scale
    pixel = torch.arange(extent, dtype=dtype, device=start.device).view(1, 1, -1)
    w = (1 - (pixel + 0.5 - centre).abs() / scale.clamp_min(1)).clamp_min(0)
    w = w * ((pixel >= start) & (pixel < start + length))
    return w / w.sum(-1, keepdim=True)


def crop_flip(x: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, n, C, size, size)`` resized crops ``boxes`` (B, n, 4: top, left, h, w) of ``x`` (B, C, H, W),
    mirrored where ``flip`` (B, n): per image, its views' row weights times the image times their column
    weights (two batched matrix products)."""
    b, c, h, w = x.shape
    n = boxes.shape[1]
    boxes = boxes.to(x.device).reshape(-1, 4)
    rows = resample_matrix(boxes[:, 0], boxes[:, 2], size, h, x.dtype)  # (b n, S, H)
    cols = resample_matrix(boxes[:, 1], boxes[:, 3], size, w, x.dtype)  # (b n, S, W)
    cols = torch.where(flip.to(x.device).reshape(-1, 1, 1), cols.flip(1), cols)
    tall = rows.view(b, n * size, h) @ x.transpose(1, 2).reshape(b, h, c * w)  # (b, n S, C W)
    tall = tall.view(b * n, size, c, w).transpose(1, 2).reshape(b * n, c * size, w)
    return (tall @ cols.transpose(1, 2)).view(b, n, c, size, size)


def _cat_augmix(draws: Sequence[AugMixDraws]) -> AugMixDraws:
    """The AugMix draws of several images as one batch of draws."""
    names = [f.name for f in fields(AugMixDraws)][:-1]
    return AugMixDraws(*(torch.cat([getattr(d, k) for d in draws]) for k in names), severity=draws[0].severity)


@dataclass
class ViewDraws:
    """Every random number of the views 1..N-1 of a batch; leading dimensions (images, views - 1)."""

    boxes: torch.Tensor  # (B, n, 4) float: top, left, height, width in the raw image
    flip: torch.Tensor  # (B, n) bool
    augmix: Optional[AugMixDraws] = None  # policy augmix: (B, n, ...) chains, weights, mix

    def __getitem__(self, index) -> "ViewDraws":
        """The draws of the images ``index`` (a slice over the first dimension)."""
        return ViewDraws(self.boxes[index], self.flip[index], None if self.augmix is None else self.augmix[index])


class CLIPViews:
    """``views(x, seeds)``: ``(B, N, C, S, S)`` views of the images ``x`` (B, C, H, W) in [0, 1], view 0 the
    original, image ``b``'s views drawn from ``seeds[b]`` (see the module docstring).

    ``scale``, ``ratio``: RandomResizedCrop's ranges; ``flip``: probability of the horizontal flip;
    ``severity``, ``mixture_width``, ``mixture_depth`` (None: U{1, 2, 3}): AugMix's."""

    def __init__(self, policy: str = "crop_flip", views: int = 64, size: int = 224, *, scale=(0.08, 1.0),
                 ratio=(3 / 4, 4 / 3), flip: float = 0.5, severity: float = 1.0, mixture_width: int = 3,
                 mixture_depth: Optional[int] = None):
        policy = str(policy).replace("-", "_")
        if policy not in POLICIES:
            raise ConfigError(f"view policy must be one of {POLICIES}, got {policy!r}")
        if not isinstance(views, int) or views < 1 or (policy == "none" and views != 1):
            raise ConfigError(f"views must be an integer >= 1 (exactly 1 with policy 'none': the original view "
                              f"only), got {views!r} with policy {policy!r}")
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1] and 0 <= flip <= 1):
            raise ConfigError(f"need 0 < scale[0] <= scale[1] <= 1, 0 < ratio[0] <= ratio[1] and 0 <= flip <= 1; "
                              f"got scale {scale}, ratio {ratio}, flip {flip}")
        self.policy, self.views, self.size = policy, views, int(size)
        self.scale, self.ratio, self.flip = tuple(scale), tuple(ratio), flip
        self.augmix_options = dict(severity=severity, mixture_width=mixture_width, mixture_depth=mixture_depth)
        if policy == "augmix":
            augmix_draw(1, 1, self.size, torch.Generator(), **self.augmix_options)  # one clear error for bad options

    def draw(self, seeds: torch.Tensor, height: int, width: int) -> ViewDraws:
        """The draws of ``len(seeds)`` images of ``height x width`` pixels, image ``b`` from ``seeds[b]`` alone."""
        n = self.views - 1
        if n == 0:
            return ViewDraws(torch.zeros(len(seeds), 0, 4), torch.zeros(len(seeds), 0, dtype=torch.bool))
        boxes, flips, mixes = [], [], []
        for seed in seeds.tolist():
            g = torch.Generator().manual_seed(seed)
            boxes.append(crop_boxes(n, height, width, g, self.scale, self.ratio))
            flips.append(torch.rand(n, generator=g) < self.flip)
            if self.policy == "augmix":
                mixes.append(augmix_draw(1, n, self.size, g, **self.augmix_options))
        return ViewDraws(torch.stack(boxes), torch.stack(flips), _cat_augmix(mixes) if mixes else None)

    def render(self, x: torch.Tensor, draws: ViewDraws) -> torch.Tensor:
        """The views ``(B, N, C, S, S)`` of ``x`` for ``draws`` (made for images of ``x``'s size)."""
        first = resize_center_crop(x, self.size).unsqueeze(1)
        if self.views == 1:
            return first
        canvas = crop_flip(x, draws.boxes, draws.flip, self.size)
        if draws.augmix is not None:
            canvas = self._augmix(canvas, draws.augmix)
        return torch.cat([first, canvas], 1)

    @staticmethod
    def _augmix(canvas: torch.Tensor, draws: AugMixDraws) -> torch.Tensor:
        """``m canvas + (1 - m) sum_i w_i chain_i``, the chains run on the 8-bit canvas."""
        b, n, c, s, _ = canvas.shape
        width = draws.weights.shape[-1]
        start = canvas.mul(255).round().clamp(0, 255).to(torch.uint8)
        chains = start.unsqueeze(2).expand(b, n, width, c, s, s).reshape(-1, c, s, s).contiguous()
        chains = run_chains(chains, draws).view(b * n, width, -1).to(canvas.dtype) / 255
        weights = draws.weights.to(canvas.device, canvas.dtype).view(b * n, 1, width)
        mixed = torch.bmm(weights, chains).view_as(canvas)
        return torch.lerp(mixed, canvas, draws.mix.to(canvas.device, canvas.dtype).view(b, n, 1, 1, 1))

    def __call__(self, x: torch.Tensor, seeds: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or len(seeds) != len(x):
            raise InputError(f"expected images (B, C, H, W) and B seeds, got shape {tuple(x.shape)} and "
                             f"{len(seeds)} seeds")
        return self.render(x, self.draw(seeds, x.shape[-2], x.shape[-1]))

    def features(self, classifier, x: torch.Tensor, seeds: torch.Tensor, chunk: int = 8) -> torch.Tensor:
        """``(B, N, D)`` normalised image features of every view of ``x``, ``chunk`` images' views per encoder
        forward (memory only: the views do not depend on it). Autograd as the caller's context sets it."""
        out = []
        for start in range(0, len(x), chunk):
            views = self(x[start:start + chunk], seeds[start:start + chunk])
            out.append(classifier.encode_image(views.flatten(0, 1)).view(views.shape[0], self.views, -1))
        return torch.cat(out)

    def __repr__(self) -> str:
        return f"CLIPViews(policy={self.policy!r}, views={self.views}, size={self.size})"


__all__ = ["POLICIES", "CLIPViews", "ViewDraws", "image_seeds", "resample_matrix", "crop_flip"]
