"""Multi-view test-time augmentation of one image (TPT / Zero / ADTE, METHODS.md 3.8 and 3.11), batched.

View 0 is the image itself (resize + centre crop); views 1..n-1 are RandomResizedCrop (scale
(0.08, 1), ratio (3/4, 4/3), torchvision's 10-attempt sampling with the centre-crop fallback) plus
a horizontal flip with probability 1/2, all cut from the original image in one ``grid_sample`` call.
Deviation: the crops are resampled bilinearly without antialiasing (torchvision antialiases when it
shrinks), which only matters for images much larger than the model's input size.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..imageops import resize_center_crop


def crop_boxes(n: int, height: int, width: int, generator: torch.Generator, scale=(0.08, 1.0),
               ratio=(3 / 4, 4 / 3), attempts: int = 10) -> torch.Tensor:
    """``(n, 4)`` boxes ``(top, left, h, w)`` drawn as torchvision's ``RandomResizedCrop.get_params``."""
    area = height * width
    target = area * torch.empty(n, attempts).uniform_(*scale, generator=generator)
    aspect = torch.exp(torch.empty(n, attempts).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator))
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = ok.float().argmax(1)  # first valid attempt
    rows = torch.arange(n)
    h, w, found = h[rows, first], w[rows, first], ok.any(1)
    # fallback: the largest centre crop with the aspect ratio clamped into ``ratio``
    in_ratio = width / height
    fw, fh = (width, round(width / ratio[0])) if in_ratio < ratio[0] else \
        ((round(height * ratio[1]), height) if in_ratio > ratio[1] else (width, height))
    h = torch.where(found, h, torch.tensor(float(fh)))
    w = torch.where(found, w, torch.tensor(float(fw)))
    u = torch.rand(n, 2, generator=generator)
    top = torch.where(found, torch.floor(u[:, 0] * (height - h + 1)), torch.tensor(float((height - fh) // 2)))
    left = torch.where(found, torch.floor(u[:, 1] * (width - w + 1)), torch.tensor(float((width - fw) // 2)))
    return torch.stack([top, left, h, w], 1)


def augmented_views(image: torch.Tensor, n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """``(n, 3, size, size)`` views of one ``(3, H, W)`` image in [0, 1]; view 0 is the plain one."""
    _, height, width = image.shape
    boxes = crop_boxes(n - 1, height, width, generator)
    flip = torch.rand(n - 1, generator=generator) < 0.5
    top, left, h, w = boxes.unbind(1)
    theta = torch.zeros(n - 1, 2, 3)
    theta[:, 0, 0] = torch.where(flip, -w / width, w / width)
    theta[:, 1, 1] = h / height
    theta[:, 0, 2] = (2 * left + w) / width - 1  # crop centre in [-1, 1] (align_corners=False)
    theta[:, 1, 2] = (2 * top + h) / height - 1
    theta = theta.to(image)
    grid = F.affine_grid(theta, (n - 1, 3, size, size), align_corners=False)
    crops = F.grid_sample(image.unsqueeze(0).expand(n - 1, -1, -1, -1), grid, mode="bilinear",
                          padding_mode="border", align_corners=False)
    return torch.cat([resize_center_crop(image.unsqueeze(0), size), crops])


def lowest(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Indices of the ``max(1, floor(fraction * n))`` lowest scores (the most confident views)."""
    k = max(1, int(fraction * scores.numel()))
    return scores.topk(k, largest=False).indices
