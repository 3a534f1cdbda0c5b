"""The shared CLIP view generator (METHODS-VLM V.14 / V.15.2) and the view selection and aggregators (V.15.3):
view 0, torchvision's crop rule, PIL's bilinear resize, AugMix as a convex mix of its chains, per-image seeds
(batched = one by one), and every aggregator on hand-made tensors."""
import math

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torchvision.transforms import InterpolationMode

from tta.errors import ConfigError
from tta.models.clip import resize_center_crop
from tta.parts import augmix as A
from tta.parts import view_select as V
from tta.parts.clip_views import CLIPViews, crop_flip, image_seeds, resample_matrix
from tta.parts.objectives import view_marginal_entropy

from clip_helpers import tiny_clip


def _images(b=3, h=40, w=56, seed=0):
    """Smooth random images on the 8-bit grid (natural-image-like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (b, 3, h, w), generator=g).float()
    return torch.nn.functional.avg_pool2d(x, 3, 1, 1).round() / 255


# ------------------------------------------------------------------------------------------- generator
def test_view_zero_is_the_resized_centre_crop_and_shapes_follow_the_policy():
    x = _images()
    for policy, n in (("crop_flip", 8), ("augmix", 5), ("none", 1)):
        views = CLIPViews(policy, n, 32)(x, image_seeds(torch.Generator().manual_seed(0), 3))
        assert views.shape == (3, n, 3, 32, 32)
        torch.testing.assert_close(views[:, 0], resize_center_crop(x, 32), rtol=0, atol=0)
        assert views.min() >= 0 and views.max() <= 1
    assert CLIPViews("crop-flip", 4, 32).policy == "crop_flip"  # the spec's spelling is accepted


@pytest.mark.parametrize("bad", [dict(policy="jitter"), dict(policy="none", views=4), dict(views=0),
                                 dict(scale=(0.5, 0.1)), dict(flip=2.0), dict(policy="augmix", severity=0)])
def test_bad_view_options_are_one_config_error(bad):
    with pytest.raises(ConfigError):
        CLIPViews(**{"policy": "crop_flip", "views": 8, "size": 32, **bad})


def _torchvision_rule(height, width, areas, log_ratios, u_pos, ratio=(3 / 4, 4 / 3)):
    """``RandomResizedCrop.get_params`` written out scalar by scalar, fed the attempts' area fractions and log
    aspect ratios and the two position uniforms."""
    for a, r in zip(areas, log_ratios):
        target, aspect = height * width * a, math.exp(r)
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return [math.floor(u_pos[0] * (height - h + 1)), math.floor(u_pos[1] * (width - w + 1)), h, w]
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w]


@pytest.mark.parametrize("height,width,scale", [(40, 56, (0.08, 1.0)), (4, 200, (0.5, 1.0)), (200, 4, (0.5, 1.0))])
def test_crop_boxes_follow_torchvisions_rule(height, width, scale):
    """Each image's generator draws the 10 attempts' area and log-ratio uniforms, then the position ones; the
    box is the first attempt that fits, else the centred fallback (the thin images always fall back)."""
    seeds = image_seeds(torch.Generator().manual_seed(3), 4)
    draws = CLIPViews("crop_flip", 17, 32, scale=scale).draw(seeds, height, width)
    for b, seed in enumerate(seeds.tolist()):
        g = torch.Generator().manual_seed(seed)
        u_area = torch.empty(16, 10).uniform_(*scale, generator=g)
        u_ratio = torch.empty(16, 10).uniform_(math.log(3 / 4), math.log(4 / 3), generator=g)
        u_pos = torch.rand(16, 2, generator=g)
        flips = torch.rand(16, generator=g) < 0.5
        for v in range(16):
            expected = _torchvision_rule(height, width, u_area[v].tolist(), u_ratio[v].tolist(), u_pos[v].tolist())
            assert draws.boxes[b, v].tolist() == pytest.approx(expected, abs=1e-6)
        assert torch.equal(draws.flip[b], flips)


def test_resample_matrix_is_pils_bilinear_filter_by_hand():
    same = resample_matrix(torch.tensor([0.0]), torch.tensor([6.0]), 6, 6)[0]
    torch.testing.assert_close(same, torch.eye(6))  # a full crop at its own size: the identity
    half = resample_matrix(torch.tensor([0.0]), torch.tensor([8.0]), 4, 10)[0]
    # shrinking by 2 widens the triangle to 2 px: interior rows weigh (0.25, 0.75, 0.75, 0.25) / 2
    torch.testing.assert_close(half[1, 1:5], torch.tensor([0.125, 0.375, 0.375, 0.125]))
    torch.testing.assert_close(half[0, :3], torch.tensor([0.75, 0.75, 0.25]) / 1.75)  # border: renormalised
    assert (half[:, 8:] == 0).all()  # pixels outside the crop never count
    torch.testing.assert_close(half.sum(1), torch.ones(4))


def test_crop_flip_views_match_torchvision_on_pil_images():
    """``resized_crop`` + ``hflip`` of a PIL image (crop then resize, BILINEAR, antialiased when shrinking):
    within one 8-bit level everywhere (PIL rounds each of its two passes, the views stay float)."""
    x = _images(1, 60, 80)
    pil = Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy())
    boxes = torch.tensor([[[5.0, 7, 40, 50], [0, 0, 60, 80], [10, 20, 12, 9], [3, 3, 33, 33]]])
    flip = torch.tensor([[False, True, False, True]])
    for size in (24, 48):
        ours = (crop_flip(x, boxes, flip, size)[0] * 255).round()
        for v in range(4):
            top, left, h, w = (int(t) for t in boxes[0, v])
            ref = TF.resized_crop(pil, top, left, h, w, [size, size], InterpolationMode.BILINEAR)
            ref = torch.from_numpy(np.asarray(TF.hflip(ref) if flip[0, v] else ref).copy()).permute(2, 0, 1)
            diff = (ours[v] - ref.float()).abs()
            assert diff.max() <= 1 and diff.mean() < 0.3


def test_augmix_views_are_convex_mixes_of_the_crop_flip_canvas_and_its_chains():
    """Same seeds: the crop-flip views are the AugMix canvases; with every chain one posterize (4 bits at
    severity 1) the view is ``m canvas + (1 - m) posterize(round(255 canvas)) / 255``; with identity ops it is
    the canvas up to the 8-bit rounding of the chains."""
    x = _images(2, 36, 44)
    seeds = image_seeds(torch.Generator().manual_seed(5), 2)
    gen = CLIPViews("augmix", 6, 32)
    canvas = CLIPViews("crop_flip", 6, 32)(x, seeds)[:, 1:]
    draws = gen.draw(seeds, 36, 44)
    m = draws.augmix
    torch.testing.assert_close(m.weights.sum(-1), torch.ones(2, 5))
    assert (m.mix >= 0).all() and (m.mix <= 1).all()
    m.depth.fill_(1)
    m.ops[..., 0] = A.POSTERIZE
    views = gen.render(x, draws)[:, 1:]
    chain = ((canvas * 255).round().to(torch.uint8) & 0xF0).float() / 255
    mix = m.mix.view(2, 5, 1, 1, 1)
    torch.testing.assert_close(views, mix * canvas + (1 - mix) * chain)
    m.ops[..., 0], m.levels[..., 0] = A.ROTATE, 0.2  # rotate by floor(3 * 0.2) = 0 degrees: the identity
    views = gen.render(x, draws)[:, 1:]
    assert (views - canvas).abs().max() <= 0.5 / 255 + 1e-6


@pytest.mark.parametrize("policy", ["crop_flip", "augmix"])
def test_seeded_batched_views_equal_the_per_image_views(policy):
    x = _images(4)
    gen = CLIPViews(policy, 8, 32)
    seeds = image_seeds(torch.Generator().manual_seed(1), 4)
    together = gen(x, seeds)
    one_by_one = torch.cat([gen(x[i:i + 1], seeds[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(together, one_by_one, rtol=0, atol=1e-6)
    torch.testing.assert_close(gen(x, seeds), together, rtol=0, atol=0)  # same seeds, same views
    assert not torch.allclose(together[0, 1:], together[1, 1:])  # different seeds, different boxes


def test_image_seeds_do_not_depend_on_the_batch_size():
    g = torch.Generator().manual_seed(0)
    whole = image_seeds(g, 10)
    g.manual_seed(0)
    pieces = torch.cat([image_seeds(g, k) for k in (1, 3, 6)])
    assert torch.equal(whole, pieces) and len(set(whole.tolist())) == 10


def test_features_do_not_depend_on_the_chunk_and_are_normalised():
    model, x = tiny_clip(), _images(5)
    gen = CLIPViews("crop_flip", 4, model.image_size)
    seeds = image_seeds(torch.Generator().manual_seed(0), 5)
    with torch.no_grad():
        a, b = gen.features(model, x, seeds, chunk=1), gen.features(model, x, seeds, chunk=4)
        torch.testing.assert_close(a[:, 0], model.encode_image(x))  # view 0: the classifier's own input
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(5, 4))


# ------------------------------------------------------------------------------ selection, aggregators
def _logits():
    """(2, 4, 3): image 0's views by confidence 2, 0, 3, 1; image 1's views 0 and 3 equally confident."""
    return torch.tensor([[[3.0, 0, 0], [0.1, 0, 0], [9, 0, 0], [1, 0, 0]],
                         [[5.0, 0, 0], [0, 0, 0], [0, 1, 0], [5, 0, 0]]])


def test_view_entropy_and_confident_selection_by_hand():
    z = _logits()
    p = z.softmax(-1)
    torch.testing.assert_close(V.view_entropy(z), -(p * p.log()).sum(-1))
    torch.testing.assert_close(V.view_entropy(z, eps=1e-6), -(p * (p + 1e-6).log()).sum(-1))
    assert V.rank_views(z)[0].tolist() == [2, 0, 3, 1]
    assert V.select_confident(z, 0.5).tolist() == [[2, 0], [0, 3]]  # the tie keeps the view order
    assert V.select_confident(z, 0.1).shape == (2, 1)  # floor(0.4) = 0 -> at least one view
    assert [V.confident_count(64, r) for r in (0.1, 0.3)] == [6, 19]
    assert V.select_lowest(torch.tensor([[3.0, 1, 2, 1]]), 0.75).tolist() == [[1, 3, 2]]
    with pytest.raises(ConfigError):
        V.select_confident(z, 0.0)


def test_aggregators_by_hand():
    z = _logits()
    f = torch.arange(2 * 4 * 2, dtype=torch.float).view(2, 4, 2)
    idx = torch.tensor([[2, 0], [3, 1]])
    assert V.take(f, idx).tolist() == [[f[0, 2].tolist(), f[0, 0].tolist()], [f[1, 3].tolist(), f[1, 1].tolist()]]
    torch.testing.assert_close(V.mean_logits(z), z.mean(1))
    torch.testing.assert_close(V.mean_features(f), f.mean(1))  # not re-normalised
    torch.testing.assert_close(V.mean_probs(z), z.softmax(-1).mean(1))
    p = z.softmax(-1).mean(1)
    torch.testing.assert_close(V.entropy_of_mean_prob(z), -(p * p.log()).sum(-1))
    torch.testing.assert_close(V.entropy_of_mean_prob(z), torch.stack([view_marginal_entropy(zi) for zi in z]))
    zz = z.clone().requires_grad_()
    V.entropy_of_mean_prob(zz).sum().backward()
    assert torch.isfinite(zz.grad).all() and zz.grad.abs().sum() > 0  # usable as a loss (TPT, C-TPT)


def test_vote_counts_and_their_logits():
    z = _logits()
    counts = V.vote_counts(z)
    assert counts.tolist() == [[4, 0, 0], [3, 1, 0]]  # image 1, view 1 (all equal): argmax -> class 0
    out = V.vote_logits(counts)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1].softmax(-1), torch.tensor([0.75, 0.25, 0.0]), atol=1e-7, rtol=0)
    assert out[0, 0] == 0 and out[0, 1] == pytest.approx(math.log(1e-12))
