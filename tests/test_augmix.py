"""AUG-MIX views (METHODS-ZOO Z.2) against PIL: each op on uint8 images (exact for the lookup-table ops, at most
one level on about 1e-4 of the pixels for the resampling ones), whole views against a PIL pipeline written
from the spec with the same draws, and the draws themselves (seeded, per view, independent of chunking)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from tta.errors import ConfigError, InputError
from tta.parts import augmix as A

G = torch.Generator


def images(k=24, size=32, seed=0):
    """Random uint8 images, half of them smoothed (natural-image-like), plus hand-made edge cases."""
    g = G().manual_seed(seed)
    img = torch.randint(0, 256, (k, 3, size, size), generator=g, dtype=torch.uint8)
    img[k // 2:] = F.avg_pool2d(img[k // 2:].float(), 5, 1, 2).round().to(torch.uint8)
    img[0] = 7  # flat: autocontrast/equalize leave it alone
    img[1] = torch.randint(100, 104, (3, size, size), generator=g).to(torch.uint8)  # low contrast
    img[2, 0] = 255  # one flat channel
    img[3] = 10
    img[3, :, : size // 2 + 5] = 255  # two levels: equalize's table overflows 255 and is clipped
    return img


def to_pil(img):
    return [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in img]


def from_pil(ims):
    return torch.stack([torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1) for im in ims])


def assert_resampled_close(ours, ref):
    diff = (ours.int() - ref.int()).abs()
    assert diff.max() <= 1
    assert (diff > 0).float().mean() < 1e-3


def test_lookup_table_ops_match_pil_exactly():
    img = images()
    pil = to_pil(img)
    assert torch.equal(A.apply_lut(img, A.autocontrast_lut(img)), from_pil([ImageOps.autocontrast(p) for p in pil]))
    assert torch.equal(A.apply_lut(img, A.equalize_lut(img)), from_pil([ImageOps.equalize(p) for p in pil]))
    bits = torch.arange(len(img)) % 8 + 1
    assert torch.equal(A.apply_lut(img, A.posterize_lut(bits)),
                       from_pil([ImageOps.posterize(p, int(b)) for p, b in zip(pil, bits)]))
    threshold = torch.linspace(0, 256, len(img)).long()
    assert torch.equal(A.apply_lut(img, A.solarize_lut(threshold)),
                       from_pil([ImageOps.solarize(p, int(t)) for p, t in zip(pil, threshold)]))


def test_equalize_table_by_hand():
    img = torch.zeros(1, 1, 4, 8, dtype=torch.uint8)
    img[..., :3] = 5
    img[..., 3:5] = 9
    img[..., 5:] = 200  # histogram: 12 at 5, 8 at 9, 12 at 200 -> step = (32 - 12) // 255 = 0 -> identity
    assert torch.equal(A.apply_lut(img, A.equalize_lut(img)), img)
    big = torch.zeros(1, 1, 40, 40, dtype=torch.uint8)  # 1600 pixels
    big.view(-1)[:1000] = 3
    big.view(-1)[1000:1300] = 50
    big.view(-1)[1300:] = 90  # step = (1600 - 300) // 255 = 5: lut[3] = 2 // 5, lut[50] = (2 + 1000) // 5, ...
    out = A.apply_lut(big, A.equalize_lut(big)).view(-1)
    assert out[0] == 0 and out[1000] == 200 and out[1300] == 255  # (2 + 1300) // 5 = 260, clipped


def test_resampling_ops_match_pil_within_one_level():
    img = images(seed=1)
    pil = to_pil(img)
    k = len(img)
    for degrees in (-2, -1, 1, 2, 17):
        coeffs = torch.tensor([A.rotation_coeffs(degrees, 32, 32)] * k, dtype=torch.float64)
        ref = from_pil([p.rotate(degrees, resample=Image.BILINEAR) for p in pil])
        assert_resampled_close(A.affine_uint8(img, coeffs), ref)
    shear = torch.linspace(-0.03, 0.03, k, dtype=torch.float64)
    for which in (1, 3):  # shear_x, shear_y
        coeffs = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * k, dtype=torch.float64)
        coeffs[:, which] = shear
        ref = from_pil([p.transform((32, 32), Image.AFFINE, tuple(c.tolist()), resample=Image.BILINEAR)
                        for p, c in zip(pil, coeffs)])
        assert_resampled_close(A.affine_uint8(img, coeffs), ref)
    for which in (2, 5):  # translate_x, translate_y: whole pixels, exact
        coeffs = torch.tensor([[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]] * k, dtype=torch.float64)
        coeffs[:, which] = torch.arange(k) % 7 - 3.0
        ref = from_pil([p.transform((32, 32), Image.AFFINE, tuple(c.tolist()), resample=Image.BILINEAR)
                        for p, c in zip(pil, coeffs)])
        assert torch.equal(A.affine_uint8(img, coeffs), ref)


def test_severity_one_magnitudes():
    level = torch.tensor([0.1, 0.33, 0.34, 0.66, 0.67, 0.93, 0.94, 0.999], dtype=torch.float64)
    n = len(level)
    for op, size, expected in ((A.ROTATE, 32, [0, 0, 1, 1, 2, 2, 2, 2]),
                               (A.TRANSLATE_X, 32, [0, 0, 0, 0, 0, 0, 1, 1]),
                               (A.TRANSLATE_Y, 224, [0, 2, 2, 4, 5, 6, 7, 7])):
        coeffs, moves = A.geometric_coeffs(torch.full((n,), op), level, torch.zeros(n, dtype=torch.bool), size)
        got = [round(-np.degrees(np.arcsin(c[1]))) for c in coeffs.tolist()] if op == A.ROTATE else \
            coeffs[:, 2 if op == A.TRANSLATE_X else 5].tolist()
        assert got == [float(e) if op != A.ROTATE else e for e in expected]
        assert moves.tolist() == [e != 0 for e in expected]
    coeffs, moves = A.geometric_coeffs(torch.full((n,), A.SHEAR_X), level, torch.ones(n, dtype=torch.bool), 32)
    assert torch.allclose(coeffs[:, 1], -0.03 * level) and moves.all()
    lut = A.pointwise_lut(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.full((n,), A.POSTERIZE), level)
    assert torch.equal(lut[:, 0], (torch.arange(256) & 0xF0).expand(n, 256))  # always 4 bits
    lut = A.pointwise_lut(torch.zeros(n, 1, 2, 2, dtype=torch.uint8), torch.full((n,), A.SOLARIZE), level)
    thresholds = (lut[:, 0] != torch.arange(256)).float().argmax(1)  # first inverted value
    assert thresholds.tolist() == [256 - int(v * 25.6) for v in level.tolist()]


def pil_op(im, op, level, negative, size):
    """One AugMix op at severity 1, written from the spec (Z.2) with PIL."""
    sign = -1 if negative else 1
    name = A.OPS[op]
    if name == "autocontrast":
        return ImageOps.autocontrast(im)
    if name == "equalize":
        return ImageOps.equalize(im)
    if name == "posterize":
        return ImageOps.posterize(im, 4 - int(level * 4 / 10))
    if name == "rotate":
        return im.rotate(sign * int(level * 30 / 10), resample=Image.BILINEAR)
    if name == "solarize":
        return ImageOps.solarize(im, 256 - int(level * 256 / 10))
    shear, shift = sign * level * 0.3 / 10, sign * int(level * (size / 3) / 10)
    data = {"shear_x": (1, shear, 0, 0, 1, 0), "shear_y": (1, 0, 0, shear, 1, 0),
            "translate_x": (1, 0, shift, 0, 1, 0), "translate_y": (1, 0, 0, 0, 1, shift)}[name]
    return im.transform((size, size), Image.AFFINE, data, resample=Image.BILINEAR)


def pil_view(image, d, i, v):
    """View ``v`` of image ``i`` as the reference builds it from a PIL image, with the draws ``d``."""
    to_tensor = lambda im: torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255  # noqa: E731
    top, left = d.crop[i, v].tolist()
    pre = ImageOps.expand(image, border=4, fill=0).crop((left, top, left + 32, top + 32))
    pre = ImageOps.mirror(pre) if d.flip[i, v] else pre
    mix = torch.zeros(3, 32, 32)
    for c in range(d.weights.shape[-1]):
        chain = pre.copy()
        for s in range(int(d.depth[i, v, c])):
            chain = pil_op(chain, int(d.ops[i, v, c, s]), float(d.levels[i, v, c, s]), bool(d.negative[i, v, c, s]), 32)
        mix += d.weights[i, v, c] * to_tensor(chain)
    return d.mix[i, v] * to_tensor(pre) + (1 - d.mix[i, v]) * mix


def test_views_match_a_pil_pipeline_with_the_same_draws():
    x = images(4, seed=2).float() / 255 + 0.3 / 255  # between grid points: quantize floors them back
    d = A.draw(4, 6, 32, G().manual_seed(3))
    ours = A.render(x, d)
    pil = to_pil(A.to_uint8(x))
    ref = torch.stack([torch.stack([pil_view(pil[i], d, i, v) for v in range(6)]) for i in range(4)])
    diff = (ours - ref).abs()
    assert ours.shape == (4, 6, 3, 32, 32)
    assert diff.max() <= 1 / 255 + 1e-6 and diff.mean() < 1e-5


def test_draws_are_seeded_per_view_and_in_range():
    a, b = A.draw(3, 16, 32, G().manual_seed(0)), A.draw(3, 16, 32, G().manual_seed(0))
    assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("crop", "flip", "weights", "mix", "ops", "levels"))
    assert torch.allclose(a.weights.sum(-1), torch.ones(3, 16))
    assert a.crop.min() >= 0 and a.crop.max() <= 8 and set(a.depth.unique().tolist()) <= {1, 2, 3}
    assert a.levels.min() >= 0.1 and a.levels.max() < 1
    assert len(a.ops.unique()) == 9 and len(a.mix.unique()) == 48  # independent draws per view
    c = A.draw(3, 16, 32, G().manual_seed(1))
    assert not torch.equal(a.mix, c.mix)
    assert (A.draw(2, 2, 32, G(), mixture_depth=2).depth == 2).all()
    with pytest.raises(ConfigError):
        A.draw(2, 2, 32, G(), mixture_depth=4)


def test_render_is_chunk_invariant_and_quantize_floors():
    x = torch.rand(5, 3, 32, 32)
    d = A.draw(5, 4, 32, G().manual_seed(0))
    whole = A.render(x, d)
    assert torch.equal(torch.cat([A.render(x[:2], d[:2]), A.render(x[2:], d[2:])]), whole)
    d.mix.fill_(1.0)  # the view is then the pre-augmented image alone
    d.flip.fill_(False)
    d.crop.fill_(4)  # the unshifted crop: the image itself
    assert torch.equal(A.render(x, d)[:, 0], (x * 255).floor() / 255)
    assert torch.allclose(A.render(x, d, quantize=False)[:, 0], x)
    assert torch.equal(A.plain_view(x), (x * 255).to(torch.uint8).float() / 255)
    assert torch.equal(A.plain_view(x, quantize=False), x)
    chunks = list(A.view_chunks(x, 4, G().manual_seed(0), 2))
    assert [c[0] for c in chunks] == [slice(0, 2), slice(2, 4), slice(4, 6)]
    assert torch.equal(torch.cat([c[2] for c in chunks]), whole)
    with pytest.raises(InputError):
        next(A.view_chunks(torch.rand(2, 3, 32, 30), 4, G(), 2))


def test_resized_crop_branch_for_larger_images():
    x = torch.rand(2, 3, 48, 48)
    d = A.draw(2, 5, 48, G().manual_seed(0))
    assert d.crop.shape == (2, 5, 4)
    views = A.render(x, d)
    assert views.shape == (2, 5, 3, 48, 48) and 0 <= views.min() and views.max() <= 1
    d.mix.fill_(1.0)
    d.flip[:] = torch.tensor([[False, True, False, False, False]] * 2)
    d.crop[:] = torch.tensor([0.0, 0.0, 48.0, 48.0])  # the whole image
    plain = A.render(x, d)
    assert torch.allclose(plain[:, 0], A.plain_view(x), atol=1e-6)
    assert torch.allclose(plain[:, 1], A.plain_view(x).flip(-1), atol=1e-6)
    d.crop[:] = torch.tensor([12.0, 0.0, 24.0, 24.0])  # left half of the middle rows, enlarged 2x
    half = A.render(x, d, quantize=False)[:, 0]
    expected = F.interpolate(x[:, :, 12:36, :24], scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(half, expected, atol=1e-5)
