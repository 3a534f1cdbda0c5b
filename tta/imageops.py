"""Image operations shared by models and parts: CLIP's normalisation constants and its resize + centre crop.

They live below both layers so that the view generators in ``tta.parts`` need not import ``tta.models``
(the data flow runs one way); ``tta.models.clip`` re-exports them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def resize_center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased, clamped like PIL's uint8 output), then
    take the central ``size x size`` crop (torchvision's rounding). Identity on square ``size`` images."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    if min(h, w) != size:
        scale = size / min(h, w)
        shape = (size, int(w * scale)) if h <= w else (int(h * scale), size)
        x = F.interpolate(x, size=shape, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
    top, left = int(round((x.shape[-2] - size) / 2)), int(round((x.shape[-1] - size) / 2))
    return x[..., top:top + size, left:left + size]
