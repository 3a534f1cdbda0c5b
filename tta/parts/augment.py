"""CoTTA's teacher augmentations (METHODS.md 3.7; AUG-CT of METHODS-ZOO Z.0.4), for many augmented
copies of a batch at once, and its light variant AUG-CT-lite (ROID, CMF: reflect padding, no blur, no
noise).

``cotta_augment(x, copies, generator)`` returns ``copies`` augmented versions of the batch ``x``
stacked copy-major, shape ``(copies * B, C, H, W)``. As in CoTTA, each copy draws one value per
augmentation shared by all images of the batch (the transforms act on a batched tensor); only the
additive noise is drawn per pixel. Per copy, in order:

1. clip to [0, 1];
2. colour jitter, its five ops in a random order: brightness x U[0.6, 1.4], contrast U[0.7, 1.3],
   saturation U[0.5, 1.5], hue shift U[-0.06, 0.06], gamma U[0.7, 1.3] (torchvision's formulas);
3. replicate-pad by half the side;
4. affine: rotation U[-15, 15] degrees, translation up to 1/16 of the padded side (whole pixels, as
   torchvision's RandomAffine draws it), scale U[0.9, 1.1], bilinear;
5. Gaussian blur, kernel 5, sigma U[0.001, 0.5];
6. centre crop back to the original size;
7. horizontal flip with probability 1/2;
8. additive Gaussian noise with std 0.005, then clip to [0, 1].

Every op is written over all copies at once (per-copy factors broadcast along a copy axis), so the
cost is a handful of tensor ops however many copies there are. All draws come from ``generator`` (a
CPU generator); the per-pixel noise of each copy from a generator on the images' device seeded by
it, so the result is the same for the same seed on the same device, in one chunk or several.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights
RANGES = {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.5, 1.5), "hue": (-0.06, 0.06),
          "gamma": (0.7, 1.3)}
ROTATION, TRANSLATE, SCALE, BLUR_SIGMA, BLUR_KERNEL, NOISE_STD = 15.0, 1 / 16, (0.9, 1.1), (0.001, 0.5), 5, 0.005


def device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by one draw from ``generator``: large random tensors are drawn
    where they are used, yet follow the adapter's seed."""
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.empty(n).uniform_(low, high, generator=generator)


def _gray(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (GRAY[0] * r + GRAY[1] * g + GRAY[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    maxc, minc = x.max(-3).values, x.min(-3).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    s = delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    return torch.stack([h, s, maxc], -3)


def _hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    h, s, v = x.unbind(-3)
    k = (torch.tensor([5.0, 3.0, 1.0], device=x.device).view(3, 1, 1) + 6.0 * h.unsqueeze(-3)) % 6.0
    return v.unsqueeze(-3) - (v * s).unsqueeze(-3) * torch.clamp(torch.minimum(k, 4.0 - k), 0, 1)


def brightness(x, f):
    return (x * f).clamp(0, 1)


def contrast(x, f):
    return _blend(x, _gray(x).mean(dim=(-3, -2, -1), keepdim=True), f)


def saturation(x, f):
    return _blend(x, _gray(x), f)


def hue(x, f):
    hsv = _rgb_to_hsv(x)
    h = (hsv[..., 0:1, :, :] + f) % 1.0
    return _hsv_to_rgb(torch.cat([h, hsv[..., 1:, :, :]], -3))


def gamma(x, f):
    return x.clamp(0, 1).pow(f).clamp(0, 1)


JITTER = (brightness, contrast, saturation, hue, gamma)  # same order as RANGES


def colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """``x`` (N, B, C, H, W); ``factors`` (N, 5) in JITTER order; ``order`` (N, 5) a permutation per copy."""
    x = x.clone()
    for position in range(len(JITTER)):
        for k, op in enumerate(JITTER):
            sel = (order[:, position] == k).nonzero().squeeze(1)
            if len(sel):
                x[sel] = op(x[sel], factors[sel, k].view(-1, 1, 1, 1, 1).to(x))
    return x


def affine_theta(angle: torch.Tensor, translate: torch.Tensor, scale: torch.Tensor, height: int,
                 width: int) -> torch.Tensor:
    """``affine_grid`` matrices (N, 2, 3) for rotation about the centre (degrees), scale and a
    translation in pixels: the output pixel at ``p`` samples the input at ``A^-1 (p - c - t) + c``."""
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    inv = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-a) / s
    half = torch.tensor([width / 2, height / 2])
    linear = inv * half.view(1, 1, 2) / half.view(1, 2, 1)  # D^-1 A D in normalised coordinates
    shift = -(inv @ translate.unsqueeze(-1)).squeeze(-1) / half
    return torch.cat([linear, shift.unsqueeze(-1)], -1)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int = BLUR_KERNEL) -> torch.Tensor:
    """Separable blur of ``x`` (N, B, C, H, W) with one sigma per copy, "valid" mode: the result is
    ``kernel - 1`` pixels smaller in each side (the caller supplies the margin)."""
    r = torch.arange(kernel, dtype=torch.float32) - (kernel - 1) / 2
    k = torch.exp(-(r.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x).view(-1, kernel, 1, 1, 1, 1)  # per copy
    h, w = x.shape[-2] - kernel + 1, x.shape[-1] - kernel + 1
    x = sum(k[:, i] * x[..., i:i + w] for i in range(kernel))
    return sum(k[:, i] * x[..., i:i + h, :] for i in range(kernel))


def draw_params(copies: int, height: int, width: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """One draw per augmentation per copy (CPU tensors with a leading ``copies`` axis)."""
    n = copies
    ph, pw = height + 2 * (height // 2), width + 2 * (width // 2)
    max_shift = torch.tensor([TRANSLATE * pw, TRANSLATE * ph])
    return {
        "jitter": torch.stack([_uniform(n, *RANGES[k], generator) for k in RANGES], 1),
        "order": torch.rand(n, len(JITTER), generator=generator).argsort(1),
        "angle": _uniform(n, -ROTATION, ROTATION, generator),
        "shift": torch.round((torch.rand(n, 2, generator=generator) * 2 - 1) * max_shift),
        "scale": _uniform(n, *SCALE, generator),
        "sigma": _uniform(n, *BLUR_SIGMA, generator),
        "flip": torch.rand(n, generator=generator) < 0.5,
        "noise_seed": torch.randint(0, 2 ** 62, (n,), generator=generator),
    }


def slice_params(p: Dict[str, torch.Tensor], start: int, stop: int) -> Dict[str, torch.Tensor]:
    """The draws of copies ``start:stop`` (to augment in chunks with the same result as all at once)."""
    return {k: v[start:stop] for k, v in p.items()}


PADS = ("edge", "reflect")


def apply_augment(x: torch.Tensor, p: Dict[str, torch.Tensor], noise_std: float = NOISE_STD, pad: str = "edge",
                  blur: bool = True) -> torch.Tensor:
    """The pipeline with given draws ``p``; (B, C, H, W) -> (copies * B, C, H, W). Each copy's noise
    comes from its own seed, drawn on the images' device, so chunking does not change the result.
    ``pad``: ``edge`` (CoTTA) or ``reflect`` (AUG-CT-lite, torch's reflect: the edge pixel is not
    repeated); ``blur=False`` and ``noise_std=0`` skip those steps (AUG-CT-lite)."""
    if pad not in PADS:
        raise ValueError(f"pad must be one of {PADS}, got {pad!r}")
    b, c, h, w = x.shape
    n = len(p["angle"])
    pad_h, pad_w = h // 2, w // 2
    ph, pw = h + 2 * pad_h, w + 2 * pad_w
    out = colour_jitter(x.clamp(0, 1).unsqueeze(0).expand(n, -1, -1, -1, -1), p["jitter"], p["order"])
    # Only the centre crop plus the blur's margin of the padded, transformed image is ever kept, so
    # the affine is sampled there only; sampling the unpadded image with border clamping (reflection
    # about the edge pixels' centres) equals sampling its edge- (reflect-) padded version: the pad is
    # wide enough for every drawn transform.
    m = BLUR_KERNEL // 2 if blur else 0
    theta = affine_theta(p["angle"], p["shift"], p["scale"], ph, pw).to(x)
    grid = F.affine_grid(theta, (n, c, ph, pw), align_corners=False)
    grid = grid[:, pad_h - m:pad_h + h + m, pad_w - m:pad_w + w + m] * torch.tensor([pw / w, ph / h]).to(x)
    if pad == "reflect":  # the same sampling points in align_corners=True coordinates
        size = torch.tensor([w, h]).to(x)
        grid = ((grid + 1) * size - 1) / (size - 1) - 1
    out = F.grid_sample(out.reshape(n * b, c, h, w), grid.repeat_interleave(b, 0), mode="bilinear",
                        padding_mode="border" if pad == "edge" else "reflection", align_corners=pad == "reflect")
    out = out.view(n, b, c, h + 2 * m, w + 2 * m)
    if blur:
        out = gaussian_blur(out, p["sigma"])
    out = torch.where(p["flip"].to(x.device).view(n, 1, 1, 1, 1), out.flip(-1), out)
    if noise_std:
        noise = [torch.randn(out.shape[1:], generator=torch.Generator(x.device).manual_seed(int(seed)),
                             device=x.device, dtype=out.dtype) for seed in p["noise_seed"]]
        out = out + noise_std * torch.stack(noise)
    return out.clamp(0, 1).reshape(n * b, c, h, w)


def cotta_augment(x: torch.Tensor, copies: int, generator: torch.Generator) -> torch.Tensor:
    """See the module docstring. ``x`` is (B, C, H, W) in [0, 1]; returns (copies * B, C, H, W)."""
    return apply_augment(x, draw_params(copies, x.shape[-2], x.shape[-1], generator))


def augment_ct(x: torch.Tensor, generator: torch.Generator, lite: bool = False) -> torch.Tensor:
    """One AUG-CT draw for the whole batch (RoTTA, RMT, SANTA, PeTTA), or AUG-CT-lite (``lite``: reflect
    padding, no blur, no noise; ROID, CMF). ``x`` (B, C, H, W) in [0, 1] -> same shape."""
    p = draw_params(1, x.shape[-2], x.shape[-1], generator)
    if lite:
        return apply_augment(x, p, noise_std=0.0, pad="reflect", blur=False)
    return apply_augment(x, p)
