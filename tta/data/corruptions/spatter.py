"""spatter (extra corruption): water drops or mud blobs from a thresholded, blurred noise layer.

Mode 0 ("water") derives a drop-edge shading from OpenCV's Canny edges, distance transform, histogram
equalisation and small filters, applied per image on CPU as METHODS.md 4.5.5 recommends (porting those
operators would be large and this corruption is not one of the 15 benchmark ones). Mode 1 ("mud") is
pure tensor code. OpenCV (``opencv-python-headless``) is needed only for mode 0 and is imported lazily.

Quirk kept: the water layer is cast to uint8 *without* clipping, as in the reference, so values above
1 wrap around modulo 256 (NumPy's behaviour on the platforms the reference ran on).
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import TTAError
from ._core import gaussian_filter, truncate01

WATER_RGB = (175 / 255, 238 / 255, 238 / 255)   # pale turquoise
MUD_RGB = (63 / 255, 42 / 255, 20 / 255)        # brown


def _water_shading(layer_u8: np.ndarray) -> np.ndarray:
    """Per-image drop shading (float32, H x W) from the 8-bit liquid layer, with OpenCV."""
    try:
        import cv2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise TTAError("spatter (water mode) needs OpenCV: pip install opencv-python-headless") from err
    dist = 255 - cv2.Canny(layer_u8, 50, 150)
    dist = cv2.distanceTransform(dist, cv2.DIST_L2, 5)
    _, dist = cv2.threshold(dist, 20, 20, cv2.THRESH_TRUNC)
    dist = cv2.blur(dist, (3, 3)).astype(np.uint8)
    dist = cv2.equalizeHist(dist)
    emboss = np.array([[-2, -1, 0], [-1, 1, 1], [0, 1, 2]])
    dist = cv2.filter2D(dist, cv2.CV_8U, emboss)
    dist = cv2.blur(dist, (3, 3)).astype(np.float32)
    return layer_u8.astype(np.float32) * dist


def spatter(x: torch.Tensor, c, generator) -> torch.Tensor:
    """Overlay water (mode 0) or mud (mode 1) blobs."""
    mean, std, blur_sigma, threshold, strength, mode = c
    batch, _, h, w = x.shape
    x = x / 255
    layer = mean + std * torch.randn((batch, h, w), generator=generator, device=x.device, dtype=x.dtype)
    layer = gaussian_filter(layer, blur_sigma, "nearest", 4.0)
    layer = torch.where(layer < threshold, torch.zeros_like(layer), layer)
    if mode == 0:
        layer_u8 = torch.remainder(torch.floor(layer * 255), 256).to(torch.uint8).cpu().numpy()
        shading = np.stack([_water_shading(img) for img in layer_u8])
        shading = torch.from_numpy(shading).to(device=x.device, dtype=torch.float64)
        peak = shading.reshape(batch, -1).amax(1).view(batch, 1, 1)
        shading = torch.where(peak > 0, shading / peak.clamp(min=1e-12), torch.zeros_like(shading)) * strength
        colour = torch.tensor(WATER_RGB, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return truncate01(x + shading[:, None] * colour)
    mask = (layer > threshold).to(x.dtype)
    mud = gaussian_filter(mask, strength, "nearest", 4.0)
    mud = torch.where(mud < 0.8, torch.zeros_like(mud), mud)[:, None]
    colour = torch.tensor(MUD_RGB, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return truncate01(x * (1 - mud) + colour * mud)
