"""Shared parts of the method zoo (METHODS-ZOO Z.17) against their formulas on hand-made tensors:
parameter EMA, symmetric cross-entropy, AUG-CT-lite, the source-batch iterator, and the adapter hooks
(after-step moves, output post-processing, the reset point of extra networks)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tta.adapter import Adapter, Recipe
from tta.errors import ConfigError
from tta.parts.augment import affine_theta, apply_augment, augment_ct, draw_params
from tta.parts.norm import BatchStats
from tta.parts.objectives import Entropy, symmetric_cross_entropy
from tta.parts.params import NormAffine
from tta.parts.source import SourceBatches, check_source
from tta.parts.teacher import ema_


def test_ema_moves_parameters_only_and_respects_trainable():
    dst, src = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    with torch.no_grad():
        dst.weight.copy_(torch.tensor([1.0, 2.0])); src.weight.copy_(torch.tensor([3.0, -2.0]))
        dst.bias.copy_(torch.tensor([0.0, 1.0])); src.bias.copy_(torch.tensor([1.0, 1.0]))
        src.running_mean.fill_(5.0)
    dst.bias.requires_grad_(False)
    ema_(dst, src, 0.75, trainable_only=True)
    assert torch.allclose(dst.weight, torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * -2]))
    assert torch.equal(dst.bias, torch.tensor([0.0, 1.0]))  # frozen: untouched
    assert torch.equal(dst.running_mean, torch.zeros(2))  # buffers never averaged
    ema_([dst.bias], [src.bias], 0.5)
    assert torch.allclose(dst.bias, torch.tensor([0.5, 1.0]))


def test_symmetric_cross_entropy_formula_and_both_gradients():
    z = torch.tensor([[1.0, 0.0, -1.0]], requires_grad=True)
    t = torch.tensor([[0.0, 2.0, 0.5]], requires_grad=True)
    p, q = z.softmax(1), t.softmax(1)
    by_hand = 0.5 * -(q * p.log()).sum() + 0.5 * -(p * q.log()).sum()
    sce = symmetric_cross_entropy(z, t)
    assert sce.shape == (1,) and torch.allclose(sce, by_hand.reshape(1))
    sce.sum().backward()
    assert z.grad.abs().sum() > 0 and t.grad.abs().sum() > 0


@pytest.mark.parametrize("pad,mode", [("reflect", "reflect"), ("edge", "replicate")])
def test_augment_lite_equals_padding_then_affine(pad, mode):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    p = draw_params(1, 32, 32, g)
    p["jitter"][:] = torch.tensor([[1.0, 1.0, 1.0, 0.0, 1.0]])  # identity colour ops
    p["flip"][:] = True
    out = apply_augment(x, p, noise_std=0.0, pad=pad, blur=False)
    padded = F.pad(x, (16, 16, 16, 16), mode=mode)
    theta = affine_theta(p["angle"], p["shift"], p["scale"], 64, 64).expand(2, 2, 3)
    grid = F.affine_grid(theta, (2, 3, 64, 64), align_corners=False)
    ref = F.grid_sample(padded, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    torch.testing.assert_close(out, ref[:, :, 16:48, 16:48].flip(-1), atol=1e-5, rtol=0)


def test_augment_ct_one_draw_per_batch_and_seeded():
    x = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    a = augment_ct(x, torch.Generator().manual_seed(3), lite=True)
    b = augment_ct(x, torch.Generator().manual_seed(3), lite=True)
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)
    # lite has no noise: the same draw on two copies of one image gives identical outputs
    same = augment_ct(torch.cat([x[:1], x[:1]]), torch.Generator().manual_seed(3), lite=True)
    assert torch.equal(same[0], same[1])
    noisy = augment_ct(torch.cat([x[:1], x[:1]]), torch.Generator().manual_seed(3))
    assert not torch.equal(noisy[0], noisy[1])


def test_source_batches_cover_every_image_each_pass_and_reset_to_the_mark():
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 2, 2).contiguous()
    labels = torch.arange(10)
    src = SourceBatches(images, labels, batch_size=4, seed=0)
    seen = [src.next() for _ in range(3)]  # one pass: 4 + 4 + 2 (no drop_last)
    assert [len(y) for _, y in seen] == [4, 4, 2]
    ids = torch.cat([y for _, y in seen])
    assert sorted(ids.tolist()) == list(range(10))
    x0, y0 = seen[0]
    assert x0.dtype == torch.float32 and torch.allclose(x0[:, 0, 0, 0] * 255, y0.float())
    second = torch.cat([src.next()[1] for _ in range(3)])
    assert sorted(second.tolist()) == list(range(10)) and not torch.equal(second, ids)  # reshuffled
    src.next()
    src.mark()
    after = [src.next()[1] for _ in range(4)]
    src.reset()
    assert all(torch.equal(a, src.next()[1]) for a in after)


def test_check_source_errors_name_the_option():
    with pytest.raises(ConfigError, match="source_images and source_labels"):
        check_source("rmt", None, None)
    with pytest.raises(ConfigError, match="source_labels must be an int64 tensor of shape \\(4,\\)"):
        check_source("rmt", torch.zeros(4, 3, 2, 2, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))
    with pytest.raises(ConfigError, match="source_images must be"):
        check_source("gtta", torch.zeros(4, 3, 2, dtype=torch.uint8), None, need_labels=False)


class _Shift:
    """An after-step hook that pulls every adapted tensor half-way back to zero."""

    def __call__(self, adapter):
        with torch.no_grad():
            for p in adapter.params:
                p.mul_(0.5)


def test_after_step_and_output_hooks_and_extra_networks_reset(tiny_bn_model):
    calls = []
    recipe = Recipe(norm=BatchStats(), params=NormAffine(), objective=Entropy(), after_step=[_Shift()],
                    output=lambda adapter, out: calls.append(out) or out.logits.detach() * 0 + 1)
    adapter = Adapter(tiny_bn_model, recipe)
    adapter.extra = nn.Linear(2, 2)  # a network of the adapter's own (a teacher, a projector)
    adapter.snapshot()
    source = {k: v.clone() for k, v in adapter.state_dict().items()}
    x = torch.rand(8, 3, 8, 8)
    assert torch.equal(adapter(x), torch.ones(8, 10)) and len(calls) == 1
    bn = adapter.model[1]
    assert bn.weight.abs().max() < 0.6  # weights started at 1, one small step, then halved
    with torch.no_grad():
        adapter.extra.weight.add_(1.0)
    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.state_dict().items())


def test_train_stats_normalise_with_the_batch_and_move_the_running_buffers(tiny_bn_model):
    from tta.parts.norm import TrainStats, uses_batch_stats
    model = TrainStats()(tiny_bn_model)
    bn = model[1]
    x = torch.rand(16, 3, 8, 8) * 3
    with torch.no_grad():
        h = model[0](x)
        model(x)
    n = h.numel() // h.shape[1]
    expected_var = 0.9 * 1.0 + 0.1 * h.var(dim=(0, 2, 3), unbiased=False) * n / (n - 1)
    torch.testing.assert_close(bn.running_mean, 0.1 * h.mean(dim=(0, 2, 3)))
    torch.testing.assert_close(bn.running_var, expected_var)
    assert uses_batch_stats(model) and not model[0].training
