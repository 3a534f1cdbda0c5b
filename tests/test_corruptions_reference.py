"""The corruption engine against independent references written here with SciPy / scikit-image / Pillow /
OpenCV, following docs/METHODS.md section 4 (the reference generator's operations).

Tolerances: Pillow-based ops (pixelate, jpeg_compression) must match exactly; the others within one
8-bit level (max abs diff <= 1/255), because the reference truncates and float rounding of a different
operation order can move a value across an integer.
"""
import io
import math

import numpy as np
import pytest
import torch

from tta.data import corruptions as C
from tta.data.corruptions.blur import glass_sources
from tta.data.corruptions.motion import motion_blur_levels, motion_kernel
from tta.data.corruptions.params import CIFAR
from tta.data.corruptions.weather import plasma_fractal

ONE_LEVEL = 1 / 255 + 1e-6


def _images(n=6, size=32, seed=0):
    """Smooth-plus-noise synthetic RGB images (uint8 HWC) with flat and saturated areas."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    imgs = []
    for i in range(n):
        base = np.stack([np.sin(3 * xx + i), np.cos(2 * yy - i), xx * yy], -1) * 0.5 + 0.5
        img = np.clip(base + rng.normal(0, 0.1, base.shape), 0, 1)
        img[: size // 4, : size // 4] = [1.0, 1.0, 1.0][: 3]
        img[-size // 4:, -size // 4:] = rng.uniform(0, 1, 3)
        imgs.append((img * 255).astype(np.uint8))
    return np.stack(imgs)


def _ours(u8, name, severity):
    x = torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255
    return C.corrupt(x, name, severity).permute(0, 2, 3, 1).numpy().astype(np.float64)


def _final(v01):
    """The reference's final step: clip to [0, 1], * 255, truncating uint8 cast; returned in [0, 1]."""
    return np.uint8(np.clip(v01, 0, 1) * 255) / 255


@pytest.fixture(scope="module")
def imgs():
    return _images()


@pytest.mark.parametrize("severity", [1, 2, 3, 4, 5])
def test_pixelate_matches_pillow_box(imgs, severity):
    from PIL import Image
    c = CIFAR["pixelate"][severity - 1]
    ref = []
    for img in imgs:
        im = Image.fromarray(img).resize((int(32 * c), int(32 * c)), Image.BOX).resize((32, 32), Image.BOX)
        ref.append(np.asarray(im) / 255)
    assert np.array_equal(_ours(imgs, "pixelate", severity), np.stack(ref).astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("severity", [1, 5])
def test_jpeg_matches_pillow(imgs, severity):
    from PIL import Image
    q = CIFAR["jpeg_compression"][severity - 1]
    ref = []
    for img in imgs:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=q)
        ref.append(np.asarray(Image.open(buf)) / 255)
    assert np.array_equal(_ours(imgs, "jpeg_compression", severity), np.stack(ref).astype(np.float32).astype(np.float64))


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_contrast_matches_numpy(imgs, severity):
    c = CIFAR["contrast"][severity - 1]
    x = imgs / 255.
    mean = x.mean(axis=(1, 2), keepdims=True)
    assert np.abs(_ours(imgs, "contrast", severity) - _final((x - mean) * c + mean)).max() <= ONE_LEVEL


@pytest.mark.parametrize("name,channel", [("brightness", 2), ("saturate", 1)])
@pytest.mark.parametrize("severity", [1, 3, 5])
def test_hsv_ops_match_skimage(imgs, name, channel, severity):
    from skimage.color import hsv2rgb, rgb2hsv
    c = CIFAR[name][severity - 1]
    ref = []
    for img in imgs:
        hsv = rgb2hsv(img / 255.)
        if name == "brightness":
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
        else:
            hsv[..., 1] = np.clip(hsv[..., 1] * c[0] + c[1], 0, 1)
        ref.append(_final(hsv2rgb(hsv)))
    assert np.abs(_ours(imgs, name, severity) - np.stack(ref)).max() <= ONE_LEVEL


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_gaussian_blur_matches_skimage(imgs, severity):
    from skimage.filters import gaussian
    s = CIFAR["gaussian_blur"][severity - 1]
    ref = np.stack([_final(gaussian(img / 255., sigma=s, channel_axis=-1, mode="nearest", truncate=4.0))
                    for img in imgs])
    assert np.abs(_ours(imgs, "gaussian_blur", severity) - ref).max() <= ONE_LEVEL


@pytest.mark.parametrize("severity", [1, 3, 4, 5])
def test_defocus_blur_matches_opencv(imgs, severity):
    cv2 = pytest.importorskip("cv2")
    radius, alias = CIFAR["defocus_blur"][severity - 1]
    grid = np.arange(-8, 9)
    xx, yy = np.meshgrid(grid, grid)
    disk = ((xx ** 2 + yy ** 2) <= radius ** 2).astype(np.float32)
    disk /= disk.sum()
    kernel = cv2.GaussianBlur(disk, ksize=(3, 3), sigmaX=alias)
    ref = []
    for img in imgs:
        x = img / 255.
        ref.append(_final(np.stack([cv2.filter2D(x[..., d], -1, kernel) for d in range(3)], -1)))
    assert np.abs(_ours(imgs, "defocus_blur", severity) - np.stack(ref)).max() <= ONE_LEVEL


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_zoom_blur_matches_scipy(imgs, severity):
    from scipy.ndimage import zoom as scizoom
    factors = np.arange(1, [1.06, 1.11, 1.16, 1.21, 1.26][severity - 1], 0.01)
    assert len(factors) == [7, 12, 16, 21, 26][severity - 1]
    assert len(CIFAR["zoom_blur"][severity - 1]) == len(factors)

    def clipped_zoom(img, z):
        ch = int(np.ceil(32 / z))
        top = (32 - ch) // 2
        out = scizoom(img[top:top + ch, top:top + ch], (z, z, 1), order=1)
        trim = (out.shape[0] - 32) // 2
        return out[trim:trim + 32, trim:trim + 32]

    ref = []
    for img in imgs:
        x = img / 255.
        acc = x.copy()
        for z in factors:
            acc += clipped_zoom(x, z)
        ref.append(_final(acc / (len(factors) + 1)))
    assert np.abs(_ours(imgs, "zoom_blur", severity) - np.stack(ref)).max() <= ONE_LEVEL


@pytest.mark.parametrize("size,delta", [(32, 1), (20, 2), (24, 3)])
def test_glass_blur_pointer_jumping_equals_sequential_copy_loop(size, delta):
    seed, batch = 7, 3
    got = glass_sources(size, size, delta, torch.Generator().manual_seed(seed), batch, "cpu").numpy()
    # Same draws, consumed by the reference's sequential loop (copy, not swap) on an image of indices.
    rows = np.arange(delta + 1, size - delta + 1)
    cols = np.arange(delta + 1, size - delta + 1)
    offsets = torch.randint(-delta, delta, (batch, 2, len(rows), len(cols)),
                            generator=torch.Generator().manual_seed(seed)).numpy()
    for b in range(batch):
        # (H, W, 1) like the reference's HWC array: img[h, w] is then a view, which is what turns the
        # intended swap into a copy.
        img = np.arange(size * size).reshape(size, size, 1)
        for h in range(size - delta, delta, -1):
            for w in range(size - delta, delta, -1):
                dx, dy = offsets[b, 0, h - delta - 1, w - delta - 1], offsets[b, 1, h - delta - 1, w - delta - 1]
                hp, wp = h + dy, w + dx
                img[h, w], img[hp, wp] = img[hp, wp], img[h, w]
        assert np.array_equal(got[b], img.reshape(-1))
    assert (got != np.arange(size * size)).any()


def test_motion_kernel_follows_imagemagick_formulas():
    w, dx, dy = motion_kernel(9, 2.5, torch.tensor([0.0, 45.0, -90.0]))
    n = 2 * math.ceil(9) + 1
    j = np.arange(n)
    expected = np.exp(-j ** 2 / (2 * 2.5 ** 2))
    assert w.numel() == 19 and np.allclose(w.numpy(), expected / expected.sum(), atol=1e-15)
    assert dx[0].tolist() == list(range(n)) and dy[0].abs().sum() == 0
    assert dx[2].abs().sum() == 0 and dy[2].tolist() == [-v for v in range(n)]
    _, dx, dy = motion_kernel(10, 3, torch.tensor([45.0]))
    assert (dx[0, 1], dy[0, 1]) == (1, 1) and (dx[0, 2], dy[0, 2]) == (1, 1)
    assert (dx[0, 5], dy[0, 5]) == (4, 4) and (dx[0, 6], dy[0, 6]) == (4, 4)


def test_motion_blur_smears_a_point_against_the_angle():
    x = torch.zeros(1, 1, 32, 32, dtype=torch.float64)
    x[0, 0, 16, 20] = 255
    out = motion_blur_levels(x, 6, 2, torch.tensor([0.0]))[0, 0]
    w, _, _ = motion_kernel(6, 2, torch.tensor([0.0]))
    expected = np.floor(np.floor(257 * 255 * w.numpy() + 0.5) / 257)
    assert np.array_equal(out[16, 8:21].flip(0).numpy(), expected)   # pixel 20 - j gets weight j
    assert out[16, 21:].sum() == 0 and out[15].sum() == 0


def test_fog_plasma_noise_amplitude_is_wibble_squared():
    gen = torch.Generator().manual_seed(0)
    raw = plasma_fractal(20000, 2, 3.0, gen, "cpu", normalise=False)
    centre = raw[:, 1, 1]            # first level: corners all 0, so pure 100 * U(-100, 100)
    assert float(centre.abs().max()) <= 1e4
    assert abs(float(centre.std()) - 1e4 / math.sqrt(3)) < 150
    maps = plasma_fractal(4, 32, 3.0, gen, "cpu")
    assert float(maps.amin()) == 0 and float(maps.amax()) == 1


def test_frost_downscale_matches_opencv(frost_dir_real):
    cv2 = pytest.importorskip("cv2")
    from tta.data.corruptions.frost import FROST_FILES, load_frost
    stack, sizes = load_frost(0.2, frost_dir_real)
    for i, name in enumerate(FROST_FILES[:3]):      # PNGs: decoder-independent
        ref = cv2.resize(cv2.imread(str(frost_dir_real / name)), (0, 0), fx=0.2, fy=0.2)[..., ::-1]
        h, w = sizes[i].tolist()
        assert (h, w) == ref.shape[:2]
        assert np.array_equal(stack[i, :, :h, :w].permute(1, 2, 0).numpy(), ref)


@pytest.fixture
def frost_dir_real():
    import os
    from pathlib import Path
    root = os.environ.get("TTA_DATA_DIR")
    folder = Path(root) / "corruption_assets" / "frost" if root else None
    if folder is None or not folder.is_dir():
        pytest.skip("needs TTA_DATA_DIR with corruption_assets/frost")
    return folder


@pytest.mark.parametrize("severity", [1, 2, 5])
def test_elastic_transform_matches_opencv_and_scipy(imgs, severity):
    """Same random draws (affine jitter, then the two fields) fed to cv2.warpAffine + map_coordinates."""
    cv2 = pytest.importorskip("cv2")
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian
    alpha, sigma, affine = CIFAR["elastic_transform"][severity - 1]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).double() / 255
    ours = C.corrupt(x, "elastic_transform", severity, seed=3).permute(0, 2, 3, 1).numpy()
    gen = torch.Generator().manual_seed(3)
    jitter = (torch.rand((len(imgs), 3, 2), generator=gen, dtype=torch.float64) * 2 * affine - affine).numpy()
    fields = (torch.rand((len(imgs), 2, 32, 32), generator=gen, dtype=torch.float64) * 2 - 1).numpy()
    pts1 = np.float32([[26, 26], [26, 6], [6, 6]])
    for i, img in enumerate(imgs):
        image = np.float32(img) / 255.
        m = cv2.getAffineTransform(pts1, (pts1 + jitter[i]).astype(np.float32))
        image = cv2.warpAffine(image, m, (32, 32), borderMode=cv2.BORDER_REFLECT_101)
        if alpha:
            dx = gaussian(fields[i, 0], sigma, mode="reflect", truncate=3) * alpha
            dy = gaussian(fields[i, 1], sigma, mode="reflect", truncate=3) * alpha
            yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")
            image = np.stack([map_coordinates(image[..., ch], (yy + dy, xx + dx), order=1, mode="reflect")
                              for ch in range(3)], -1)
        # OpenCV quantises warp positions to 1/32 px: allow 2 levels, and nearly all pixels within 1.
        diff = np.abs(ours[i] - _final(image))
        assert diff.max() <= 2 / 255 + 1e-6 and (diff > ONE_LEVEL).mean() < 0.01
