"""The speed paths of the corruption engine against the direct code they replace.

* fixed linear filters (zoom average, defocus, Gaussians) applied as cached sparse operators;
* brightness as a (V, level) table instead of the HSV round trip;
* shot noise by inverse-CDF table lookup instead of ``torch.poisson`` (checked against the exact pmf);
* one-uniform salt and pepper, float32 Gaussian draws (checked by their statistics);
* torchvision's JPEG ops against the Pillow path;
* motion blur's gather formulation against the straightforward per-tap loop.
"""
import math

import numpy as np
import pytest
import torch

from tta.data import corruptions as C
from tta.data.corruptions import digital, noise
from tta.data.corruptions._core import (apply_operator, gaussian_filter, gaussian_operator, linear_operator,
                                        truncate01, truncate255)
from tta.data.corruptions.blur import (_crop_support, _zoom_average, defocus_blur, disk_kernel,
                                       filter2d_reflect101, zoom_blur)
from tta.data.corruptions.motion import motion_blur_levels, motion_kernel
from tta.data.corruptions.params import CIFAR, IMAGENET


@pytest.fixture(scope="module")
def levels():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (40, 3, 32, 32), generator=g).double()
    x[:4] = torch.nn.functional.avg_pool2d(x[:4], 5, 1, 2).floor()       # smooth ones
    x[4, :, :16] = 255                                                   # flat saturated areas
    x[5] = 0
    return x


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_zoom_and_defocus_operators_match_direct_code(levels, severity):
    factors = CIFAR["zoom_blur"][severity - 1]
    direct = _zoom_average(levels, factors)
    via_basis = apply_operator(linear_operator(("t-zoom", factors), 32, 32, "cpu",
                                               lambda e: _zoom_average(e, factors)), levels)
    assert (via_basis - direct).abs().max() < 1e-9
    assert torch.equal(zoom_blur(levels, factors), truncate01(_zoom_average(levels / 255, factors)))
    radius, alias = CIFAR["defocus_blur"][severity - 1]
    kernel = _crop_support(disk_kernel(radius, alias))
    assert torch.equal(defocus_blur(levels, (radius, alias)), truncate01(filter2d_reflect101(levels / 255, kernel)))


@pytest.mark.parametrize("sigma,mode,truncate", [(0.05, "nearest", 4.0), (0.4, "nearest", 4.0), (1.0, "nearest", 4.0),
                                                 (0.96, "reflect", 3.0), (6.4, "reflect", 3.0)])
def test_gaussian_operator_matches_gaussian_filter(levels, sigma, mode, truncate):
    direct = gaussian_filter(levels, sigma, mode, truncate)
    fast = apply_operator(gaussian_operator(sigma, mode, truncate, 32, 32, "cpu"), levels)
    assert (fast - direct).abs().max() < 1e-9
    assert torch.equal(truncate255(fast), truncate01(gaussian_filter(levels / 255, sigma, mode, truncate)))


def test_operator_path_is_skipped_for_large_and_float32_images():
    x = torch.rand(1, 3, 64, 64, dtype=torch.float64) * 255
    assert zoom_blur(x, CIFAR["zoom_blur"][2]).shape == x.shape
    y = C.zoom_blur(torch.rand(2, 3, 32, 32), 3)
    assert y.dtype == torch.float32 and y.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("c", sorted(set(CIFAR["brightness"] + IMAGENET["brightness"])))
def test_brightness_table_equals_hsv_round_trip(c):
    g = torch.Generator().manual_seed(1)
    colours = torch.randint(0, 256, (1, 3, 300, 1000), generator=g).double()
    grays = torch.arange(256, dtype=torch.float64).view(1, 1, 1, 256).expand(1, 3, 1, 256)
    corners = torch.tensor([[0, 0, 1], [1, 0, 0], [255, 255, 254], [254, 255, 255], [0, 255, 0], [7, 7, 200]],
                           dtype=torch.float64).T.reshape(1, 3, 1, 6)
    for x in (colours, grays.contiguous(), corners):
        assert torch.equal(digital.brightness(x, c), digital.brightness_hsv(x, c))


def _poisson_level_pmf(level, scale):
    """Exact distribution of uint8(clip(Poisson(level / 255 * scale) / scale, 0, 1) * 255)."""
    lam = level / 255 * scale
    probs = np.zeros(256)
    k_max = math.ceil(scale)
    below = 0.0
    for k in range(k_max):
        p = 1.0 if (lam == 0 and k == 0) else (0.0 if lam == 0 else
                                                 math.exp(k * math.log(lam) - lam - math.lgamma(k + 1)))
        probs[int(np.uint8(np.clip(k / scale, 0, 1) * 255))] += p
        below += p
    probs[255] += max(0.0, 1 - below)
    return probs


@pytest.mark.parametrize("scale", [3, 50, 500])
def test_shot_noise_sampler_follows_the_poisson_pmf(scale):
    n = 60000
    lv = [0, 1, 37, 128, 200, 255]
    x = torch.tensor(lv, dtype=torch.float64).view(1, 1, 1, -1).expand(n // 3, 3, 1, len(lv)).contiguous()
    out = noise.shot_noise(x, scale, torch.Generator().manual_seed(2))
    assert out.dtype == torch.float64 and torch.equal(out, out.round())
    for i, level in enumerate(lv):
        freq = np.bincount(out[..., i].reshape(-1).long().numpy(), minlength=256) / out[..., i].numel()
        p = _poisson_level_pmf(level, scale)
        assert np.all(np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 2e-4), (level, scale)


def test_gaussian_and_impulse_noise_statistics():
    x = torch.full((200, 3, 32, 32), 128.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(3)
    out = noise.gaussian_noise(x, 0.08, g)
    delta = out - 128
    assert abs(float(delta.mean()) + 0.5) < 0.1             # truncation: E[floor(v)] = E[v] - 1/2
    assert abs(float(delta.std()) - 0.08 * 255) < 0.1
    out = noise.impulse_noise(x, 0.05, g)
    assert set(out.unique().tolist()) == {0.0, 128.0, 255.0}
    assert abs(float((out == 255).double().mean()) - 0.025) < 0.002
    assert abs(float((out == 0).double().mean()) - 0.025) < 0.002


@pytest.mark.parametrize("quality", [80, 40, 7])
def test_jpeg_fast_path_equals_pillow_path(monkeypatch, quality):
    g = torch.Generator().manual_seed(4)
    x = torch.nn.functional.avg_pool2d(torch.rand(20, 3, 32, 32, generator=g), 3, 1, 1)
    levels = torch.floor(x * 255).double()
    fast = digital.jpeg_compression(levels, quality)
    monkeypatch.setattr(digital, "_torchvision_jpeg_agrees", lambda *a: False)
    assert torch.equal(fast, digital.jpeg_compression(levels, quality))


def _motion_blur_per_tap(x, radius, sigma, angle):
    """The straightforward version: one clamped shifted copy per tap, summed in tap order."""
    b, c, h, w = x.shape
    weights, dx, dy = motion_kernel(radius, sigma, angle)
    acc = torch.zeros_like(x)
    for i in range(b):
        for t in range(weights.numel()):
            rows = (torch.arange(h) + dy[i, t]).clamp(0, h - 1)
            cols = (torch.arange(w) + dx[i, t]).clamp(0, w - 1)
            acc[i] += float(weights[t]) * x[i][:, rows][:, :, cols]
    return torch.floor(torch.floor(257 * acc + 0.5).clamp(0, 65535) / 257)


@pytest.mark.parametrize("channels,radius,sigma,low", [(3, 9, 2.5, -45.0), (1, 14, 12, -135.0)])
def test_motion_blur_gather_equals_per_tap_loop(levels, channels, radius, sigma, low):
    g = torch.Generator().manual_seed(5)
    x = levels[:12, :channels].contiguous()
    angle = torch.rand(12, generator=g, dtype=torch.float64) * 90 + low
    assert torch.equal(motion_blur_levels(x, radius, sigma, angle), _motion_blur_per_tap(x, radius, sigma, angle))


def test_truncation_helpers_are_the_reference_uint8_cast():
    """``truncate255(v) = uint8(clip(v, 0, 255))`` and ``truncate01(v) = uint8(clip(v, 0, 1) * 255)``, the
    casts kept up by OUTPUT_EPS (1e-6 of a level), on hand-picked values in, at and beyond both ends."""
    from tta.data.corruptions._core import truncate01, truncate255
    v = torch.tensor([-300.0, -0.4, -1e-9, 0.0, 0.2, 1 - 1e-7, 1.0, 17.9999999, 18.0, 254.5, 255.0, 255.2, 1e9],
                     dtype=torch.float64)
    expected = [0, 0, 0, 0, 0, 1, 1, 18, 18, 254, 255, 255, 255]
    assert truncate255(v).tolist() == expected
    assert truncate255(v).dtype == torch.float64
    u = torch.tensor([-2.0, -1e-12, 0.0, 0.5, 10 / 255, 254.9 / 255, 1.0, 1.0 + 1e-9, 7.0], dtype=torch.float64)
    assert truncate01(u).tolist() == [0, 0, 0, 127, 10, 254, 255, 255, 255]
    assert torch.equal(truncate01(u), truncate255(u.clamp(0, 1) * 255))
