"""AUG-MIX views (METHODS-ZOO Z.2; AugMix ops after Hendrycks et al., ICLR 2020), batched, for TTAug and MEMO.

One view of an image, as the reference builds it on a PIL image:

1. pre-augment: 32-px images: zero-pad by 4, random 32-px crop, horizontal flip with probability 1/2;
   larger (square) images: RandomResizedCrop to their own size (scale 0.08-1, ratio 3/4-4/3) + flip;
2. ``x0`` = the pre-augmented image in [0, 1];
3. ``w ~ Dirichlet(1, ..., 1)`` over ``mixture_width`` (3) chains, ``m ~ Beta(1, 1)``;
4. each chain starts from the pre-augmented 8-bit image and applies ``d ~ U{1, 2, 3}`` ops, each drawn
   uniformly from the nine below, with ``level ~ U(0.1, severity)`` (severity 1) and a random sign;
5. ``view = m x0 + (1 - m) sum_i w_i chain_i``.

The ops act on 8-bit images exactly as PIL does on ``uint8`` data, so each one is unit-tested against
PIL: the four pointwise ops are per-image, per-channel lookup tables (autocontrast, equalize, posterize,
solarize; exact), the five geometric ones are PIL's affine bilinear resampling (rotate, shear_x/y,
translate_x/y; sample point = matrix x (pixel centre), outside the image -> 0, neighbours clamped to the
border, result truncated to 8 bits), computed in float64 in PIL's order of operations.

Batched: every random number of a batch is drawn up front from the adapter's ``torch.Generator``
(:func:`draw`, independent draws per view, shaped ``(images, views, ...)``); :func:`render` then builds
all views of all images with tensor ops, one step of all chains at a time, each step one lookup-table
gather for the chains whose op is pointwise and one resampling pass for those whose op is geometric (ops
that are the identity at their level, rotate by 0 degrees and translate by 0 px, are skipped: PIL
returns the image unchanged for them too). Slicing the draws by image gives the same views as building
them all at once, so callers can build views chunk by chunk.

``quantize`` (default True): the reference's loader turns each float image into a PIL image with
``uint8(x * 255)`` (truncation), so even ``x0`` and the plain view lie on the 8-bit grid; with
``quantize=False`` they keep the float values (the chains still run on the 8-bit image, their ops being
defined there). Deviation for larger images: the resized crop is a bilinear resampling without
antialiasing (PIL antialiases when it shrinks; RandomResizedCrop of a 224-px image to 224 px only enlarges).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError, InputError
from .views import crop_boxes

OPS = ("autocontrast", "equalize", "posterize", "rotate", "solarize", "shear_x", "shear_y", "translate_x",
       "translate_y")
AUTOCONTRAST, EQUALIZE, POSTERIZE, ROTATE, SOLARIZE, SHEAR_X, SHEAR_Y, TRANSLATE_X, TRANSLATE_Y = range(len(OPS))
POINTWISE = (AUTOCONTRAST, EQUALIZE, POSTERIZE, SOLARIZE)
CROP_SIZE, CROP_PADDING, MAX_DEPTH = 32, 4, 3
RESAMPLE_SLACK = 1e-4  # see affine_uint8


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """``uint8(x * 255)`` with truncation, as the reference's tensor-to-PIL conversion."""
    return (x * 255).to(torch.uint8)


def plain_view(x: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """View 0: the image itself, floored to the 8-bit grid when ``quantize`` (see module docstring)."""
    return to_uint8(x).float().div(255) if quantize else x


def _magnitude(level: torch.Tensor, maxval: float) -> torch.Tensor:
    """AugMix's ``int(level * maxval / 10)`` for positive levels."""
    return torch.floor(level * maxval / 10)


# --------------------------------------------------------------------------------- pointwise ops
def apply_lut(img: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """``img`` (k, C, H, W) uint8 through per-image, per-channel tables ``lut`` (k, C or 1, 256), clipped to
    8 bits as PIL clips table entries."""
    k, c = img.shape[:2]
    table = lut.clamp(0, 255).to(torch.uint8).expand(k, c, 256)
    return table.gather(2, img.reshape(k, c, -1).long()).view_as(img)


def autocontrast_lut(img: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.autocontrast`` (cutoff 0): per channel ``int(v * 255 / (hi - lo) - lo * 255 / (hi - lo))``
    clipped to [0, 255] between the channel's lowest and highest value; the identity when they are equal."""
    k, c = img.shape[:2]
    flat = img.reshape(k, c, -1)
    lo, hi = flat.amin(2, keepdim=True).double(), flat.amax(2, keepdim=True).double()
    ix = torch.arange(256, dtype=torch.float64, device=img.device)
    scale = torch.full_like(hi, 255.0) / (hi - lo).clamp_min(1)  # a true division (``255 / t`` is 255 * (1 / t))
    lut = torch.trunc(ix * scale + (-lo * scale)).clamp(0, 255)
    return torch.where(hi > lo, lut, ix).long()


def equalize_lut(img: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.equalize``: per channel ``step = (n - h[max]) // 255`` and
    ``lut[i] = (step // 2 + sum_{j<i} h[j]) // step``; the identity when ``step`` is 0."""
    k, c = img.shape[:2]
    flat = img.reshape(k * c, -1).long()
    hist = torch.zeros(k * c, 256, dtype=torch.long, device=img.device)
    hist.scatter_add_(1, flat, torch.ones(1, 1, dtype=torch.long, device=img.device).expand_as(flat))
    top = hist.gather(1, flat.amax(1, keepdim=True))
    step = (flat.shape[1] - top) // 255
    below = hist.cumsum(1) - hist
    ix = torch.arange(256, device=img.device)
    lut = torch.where(step > 0, (step // 2 + below) // step.clamp_min(1), ix)
    return lut.view(k, c, 256)


def posterize_lut(bits: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.posterize``: keep the top ``bits`` (k,) bits of every value; (k, 1, 256) tables."""
    mask = 255 - (2 ** (8 - bits.long()) - 1)
    return torch.arange(256, device=bits.device) & mask.view(-1, 1, 1)


def solarize_lut(threshold: torch.Tensor) -> torch.Tensor:
    """PIL ``ImageOps.solarize``: values ``>= threshold`` (k,) become ``255 - v``; (k, 1, 256) tables."""
    ix = torch.arange(256, device=threshold.device)
    return torch.where(ix < threshold.long().view(-1, 1, 1), ix, 255 - ix)


# -------------------------------------------------------------------------------- geometric ops
def affine_uint8(img: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """PIL ``Image.transform(size, AFFINE, (a, b, c, d, e, f), BILINEAR)`` of square images ``img`` (k, C, S, S)
    uint8 with per-image coefficients ``coeffs`` (k, 6): output pixel (x, y) samples the input at
    ``(a (x+.5) + b (y+.5) + c, d (x+.5) + e (y+.5) + f)``; a sample point outside the image gives 0,
    neighbours beyond the border are clamped to it (border padding), and the result is truncated to 8 bits.

    The sampling grid is made in float64 (``affine_grid``), the interpolation by ``grid_sample`` in float32;
    ``RESAMPLE_SLACK`` is added before truncating so that a value PIL computes as a whole number (a flat
    region) does not drop by one through float32 rounding. Measured against PIL on CIFAR images about one
    pixel value in 10^4 differs, by one level."""
    k, c, s, _ = img.shape
    a0, a1, a2, a3, a4, a5 = coeffs.to(img.device, torch.float64).unbind(1)
    # the same map in grid_sample's normalised coordinates (pixel centre x + 0.5 <-> (g + 1) s / 2)
    theta = torch.stack([torch.stack([a0, a1, a0 + a1 + 2 * a2 / s - 1], 1),
                         torch.stack([a3, a4, a3 + a4 + 2 * a5 / s - 1], 1)], 1)
    grid = F.affine_grid(theta, [k, c, s, s], align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(-1).unsqueeze(1)
    out = F.grid_sample(img.float(), grid.float(), mode="bilinear", padding_mode="border", align_corners=False)
    return torch.where(inside, out + RESAMPLE_SLACK, 0.0).to(torch.uint8)


def rotation_coeffs(degrees: int, width: int, height: int):
    """PIL ``Image.rotate(degrees)``'s inverse affine matrix (about the image centre, no expand), computed as
    PIL computes it (cosine and sine rounded to 15 decimals)."""
    angle = -math.radians(degrees)
    a, b = round(math.cos(angle), 15), round(math.sin(angle), 15)
    d, e = round(-math.sin(angle), 15), round(math.cos(angle), 15)
    cx, cy = width / 2, height / 2
    c = a * -cx + b * -cy + 0.0 + cx
    f = d * -cx + e * -cy + 0.0 + cy
    return [a, b, c, d, e, f]


def geometric_coeffs(op: torch.Tensor, level: torch.Tensor, negative: torch.Tensor, size: int,
                     severity: float = 1.0):
    """Affine coefficients (k, 6) of the geometric ops at their levels, and which of them move the image
    (rotate by 0 degrees and translate by 0 px are the identity and skipped)."""
    sign = torch.where(negative, -1.0, 1.0).double()
    coeffs = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0], dtype=torch.float64).repeat(len(op), 1)
    top = int(severity * 30 / 10)  # largest rotation in degrees
    table = torch.tensor([rotation_coeffs(d, size, size) for d in range(-top, top + 1)], dtype=torch.float64)
    degrees = (_magnitude(level, 30) * sign).long()
    shear = level * 0.3 / 10 * sign
    shift = _magnitude(level, size / 3) * sign
    rot = op == ROTATE
    coeffs[rot] = table[degrees[rot] + top]
    coeffs[:, 1] = torch.where(op == SHEAR_X, shear, coeffs[:, 1])
    coeffs[:, 3] = torch.where(op == SHEAR_Y, shear, coeffs[:, 3])
    coeffs[:, 2] = torch.where(op == TRANSLATE_X, shift, coeffs[:, 2])
    coeffs[:, 5] = torch.where(op == TRANSLATE_Y, shift, coeffs[:, 5])
    moves = (rot & (degrees != 0)) | (op == SHEAR_X) | (op == SHEAR_Y) | \
        (((op == TRANSLATE_X) | (op == TRANSLATE_Y)) & (shift != 0))
    return coeffs, moves


def pointwise_lut(img: torch.Tensor, op: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """The (k, C, 256) tables of the pointwise ops ``op`` (k,) at ``level`` (k,) for the images ``img``."""
    c = img.shape[1]
    lut = torch.where((op == POSTERIZE).view(-1, 1, 1), posterize_lut(4 - _magnitude(level, 4)),
                      solarize_lut(256 - _magnitude(level, 256))).expand(-1, c, -1).clone()
    for kind, table in ((AUTOCONTRAST, autocontrast_lut), (EQUALIZE, equalize_lut)):
        sel = torch.nonzero(op == kind).flatten()
        if len(sel):
            lut[sel] = table(img[sel])
    return lut


# ------------------------------------------------------------------------------------------ draws
@dataclass
class AugMixDraws:
    """Every random number of the AUG-MIX views of a batch; leading dimensions (images, views)."""

    crop: torch.Tensor  # (b, n, 2) top/left in the padded image, or (b, n, 4) top/left/h/w boxes (resized crop)
    flip: torch.Tensor  # (b, n) bool
    weights: torch.Tensor  # (b, n, width) float32, Dirichlet(1, ..., 1)
    mix: torch.Tensor  # (b, n) float32, Beta(1, 1)
    depth: torch.Tensor  # (b, n, width) ops per chain
    ops: torch.Tensor  # (b, n, width, MAX_DEPTH) op indices into OPS
    levels: torch.Tensor  # (b, n, width, MAX_DEPTH) float64, U(0.1, severity)
    negative: torch.Tensor  # (b, n, width, MAX_DEPTH) bool, the sign of signed ops
    severity: float = 1.0

    def __getitem__(self, index) -> "AugMixDraws":
        """The draws of the images ``index`` (a slice or index tensor over the first dimension)."""
        return AugMixDraws(*(getattr(self, f.name)[index] for f in fields(self)[:-1]), severity=self.severity)

    @property
    def shape(self):
        return tuple(self.flip.shape)


def draw(images: int, views: int, size: int, generator: torch.Generator, *, severity: float = 1.0,
         mixture_width: int = 3, mixture_depth: Optional[int] = None) -> AugMixDraws:
    """The random numbers of ``views`` AUG-MIX views of each of ``images`` square ``size``-px images, all from
    ``generator`` (CPU). ``mixture_depth`` None: each chain draws its depth from U{1, 2, 3}."""
    if not 0.1 < severity <= 10 or mixture_width < 1 or mixture_depth not in (None, 1, 2, 3):
        raise ConfigError(f"AUG-MIX needs 0.1 < severity <= 10, mixture_width >= 1 and mixture_depth in "
                          f"(None, 1, 2, 3); got {severity}, {mixture_width}, {mixture_depth}")
    b, n, g = images, views, generator
    if size == CROP_SIZE:
        crop = torch.randint(0, 2 * CROP_PADDING + 1, (b, n, 2), generator=g)
    else:
        crop = crop_boxes(b * n, size, size, g).view(b, n, 4)
    flip = torch.rand(b, n, generator=g) < 0.5
    weights = torch.empty(b, n, mixture_width, dtype=torch.float64).exponential_(generator=g)
    weights = (weights / weights.sum(2, keepdim=True)).float()
    mix = torch.rand(b, n, generator=g)
    chains = (b, n, mixture_width)
    depth = torch.randint(1, MAX_DEPTH + 1, chains, generator=g) if mixture_depth is None \
        else torch.full(chains, mixture_depth)
    ops = torch.randint(0, len(OPS), chains + (MAX_DEPTH,), generator=g)
    levels = 0.1 + (severity - 0.1) * torch.rand(chains + (MAX_DEPTH,), generator=g, dtype=torch.float64)
    negative = torch.rand(chains + (MAX_DEPTH,), generator=g) < 0.5
    return AugMixDraws(crop, flip, weights, mix, depth, ops, levels, negative, severity)


# ----------------------------------------------------------------------------------------- views
def _padded_crops(img: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """RandomCrop(size, padding 4, zero fill) + flip: (b, n, C, S, S) from ``img`` (b, C, S, S)."""
    b, c, s, _ = img.shape
    padded = F.pad(img, (CROP_PADDING,) * 4)
    side = padded.shape[-1]
    j = torch.arange(s, device=img.device)
    rows = crop[..., 0:1] + j
    cols = crop[..., 1:2] + torch.where(flip.unsqueeze(-1), s - 1 - j, j)
    index = (rows.unsqueeze(-1) * side + cols.unsqueeze(-2)).view(b, 1, -1).expand(b, c, -1)
    return padded.view(b, c, -1).gather(2, index).view(b, c, -1, s, s).transpose(1, 2)


def _resized_crops(img: torch.Tensor, boxes: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop(size) + flip by bilinear resampling: (b, n, C, S, S) from ``img`` (b, C, S, S). As the
    crop is cut out before it is resized, samples are clamped to the crop's own border pixels."""
    b, c, s, _ = img.shape
    n = boxes.shape[1]
    top, left, h, w = (t.reshape(-1, 1).to(img) for t in boxes.unbind(-1))
    centre = (torch.arange(s, device=img.device, dtype=img.dtype) + 0.5) / s  # output pixel centres in (0, 1)

    def normalised(start, length):  # crop-pixel index of each output pixel, clamped into the crop
        index = torch.minimum(torch.maximum(start + centre * length - 0.5, start), start + length - 1)
        return (2 * index + 1) / s - 1

    gx, gy = normalised(left, w), normalised(top, h)
    gx = torch.where(flip.reshape(-1, 1), gx.flip(1), gx)
    grid = torch.stack([gx.unsqueeze(1).expand(-1, s, s), gy.unsqueeze(2).expand(-1, s, s)], -1)
    source = img.unsqueeze(1).expand(b, n, c, s, s).reshape(b * n, c, s, s)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.view(b, n, c, s, s)


def run_chains(chains: torch.Tensor, draws: AugMixDraws) -> torch.Tensor:
    """Apply every chain's ops to ``chains`` (k, C, S, S) uint8, k = images x views x width, one step at a time:
    per step one table lookup for the pointwise ops and one resampling for the geometric ones."""
    size = chains.shape[-1]
    depth = draws.depth.reshape(-1).to(chains.device)
    ops, levels, negative = (t.reshape(-1, MAX_DEPTH).to(chains.device)
                             for t in (draws.ops, draws.levels, draws.negative))
    pointwise = torch.tensor(POINTWISE, device=chains.device)
    for step in range(MAX_DEPTH):
        active = depth > step
        op, level = ops[:, step], levels[:, step]
        sel = torch.nonzero(active & torch.isin(op, pointwise)).flatten()
        if len(sel):
            chains[sel] = apply_lut(chains[sel], pointwise_lut(chains[sel], op[sel], level[sel]))
        coeffs, moves = geometric_coeffs(op.cpu(), level.cpu(), negative[:, step].cpu(), size, draws.severity)
        sel = torch.nonzero(active & moves.to(chains.device)).flatten()
        if len(sel):
            chains[sel] = affine_uint8(chains[sel], coeffs[sel.cpu()])
    return chains


def render(x: torch.Tensor, draws: AugMixDraws, quantize: bool = True) -> torch.Tensor:
    """The AUG-MIX views (b, n, C, S, S) of the images ``x`` (b, C, S, S) in [0, 1] for ``draws``."""
    b, c, h, w = x.shape
    if h != w:
        raise InputError(f"AUG-MIX views need square images, got {h}x{w}")
    if draws.shape[0] != b:
        raise InputError(f"{draws.shape[0]} images' draws for a batch of {b}")
    n, width = draws.shape[1], draws.weights.shape[-1]
    crop, flip = draws.crop.to(x.device), draws.flip.to(x.device)
    u8 = to_uint8(x)
    if crop.shape[-1] == 2:
        pre = _padded_crops(u8, crop, flip)
        x0 = pre.float().div(255) if quantize else _padded_crops(x, crop, flip)
    else:
        pre = _resized_crops(u8.float(), crop, flip).round().to(torch.uint8)
        x0 = pre.float().div(255) if quantize else _resized_crops(x, crop, flip)
    chains = pre.unsqueeze(2).expand(b, n, width, c, h, w).reshape(-1, c, h, w).contiguous()
    chains = run_chains(chains, draws).view(b, n, width, c, h, w)
    weights = draws.weights.to(x.device).view(b * n, 1, width) / 255
    mix = torch.bmm(weights, chains.view(b * n, width, -1).float()).view(b, n, c, h, w)
    return torch.lerp(mix, x0, draws.mix.to(x.device).view(b, n, 1, 1, 1))  # m x0 + (1 - m) mix


def view_chunks(x: torch.Tensor, views: int, generator: torch.Generator, chunk: int, *, quantize: bool = True,
                severity: float = 1.0, mixture_width: int = 3, mixture_depth: Optional[int] = None):
    """For consecutive chunks of ``chunk`` images of ``x``: (slice, plain views (k, C, S, S), AUG-MIX views
    (k, views, C, S, S)). All draws are made for the whole batch first, so the views do not depend on
    ``chunk``, which only bounds memory."""
    b, _, h, w = x.shape
    if h != w:
        raise InputError(f"AUG-MIX views need square images, got {h}x{w}")
    draws = draw(b, views, h, generator, severity=severity, mixture_width=mixture_width,
                 mixture_depth=mixture_depth)
    for start in range(0, b, chunk):
        part = slice(start, start + chunk)
        yield part, plain_view(x[part], quantize), render(x[part], draws[part], quantize)
