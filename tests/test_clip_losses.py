import math

import pytest
import torch

from tta.adapter import Batch
from tta.parts.clip_losses import (ClassMemory, OutlierContrast, SoftContrastive, caption_similarity,
                                   max_log_prob, otsu_threshold)
from tta.parts.objectives import entropy


def _h(row):
    p = [math.exp(v) for v in row]
    z = sum(p)
    return -sum(q / z * math.log(q / z) for q in p)


def test_soft_contrastive_equals_hand_computation_on_3x3():
    z = torch.tensor([[5.0, 1.0, 0.0], [0.0, 4.0, 2.0], [1.0, 3.0, 2.5]])
    # pseudo-labels 0, 1, 1 -> S = columns 0, 1, 1 of z
    s = [[5.0, 1.0, 1.0], [0.0, 4.0, 4.0], [1.0, 3.0, 3.0]]
    torch.testing.assert_close(caption_similarity(z), torch.tensor(s))
    i2t = [_h(r) for r in s]
    t2i = [_h([s[i][j] for i in range(3)]) for j in range(3)]
    got = SoftContrastive()(Batch(None, z, None))
    torch.testing.assert_close(got, torch.tensor(i2t), atol=1e-6, rtol=1e-6)
    got2 = SoftContrastive(text_to_image=True)(Batch(None, z, None))
    torch.testing.assert_close(got2, (torch.tensor(i2t) + torch.tensor(t2i)) / 2, atol=1e-6, rtol=1e-6)


def test_batch_aware_no_gradient_when_all_pseudo_labels_agree():
    """Every image's pseudo-label is class 0: each row of S is constant, P_i. is uniform, L_sc = log B
    exactly and its gradient w.r.t. the image features is zero; TENT's entropy on the same batch has a
    gradient, and a descent step on it raises p(class 0) for every image (it pushes toward class 0)."""
    torch.manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    u = torch.nn.functional.normalize(text[0] + 0.3 * torch.randn(5, 8), dim=1).requires_grad_()
    logits = 100 * u @ text.T
    assert (logits.argmax(1) == 0).all()
    loss = SoftContrastive()(Batch(None, logits, None)).mean()
    assert abs(loss.item() - math.log(5)) < 1e-5
    (grad,) = torch.autograd.grad(loss, u)
    assert grad.abs().max() < 1e-6
    z = 10 * u @ text.T  # a softer scale so TENT's gradient is not numerically zero
    (g_tent,) = torch.autograd.grad(entropy(z).mean(), u)
    assert g_tent.abs().max() > 1e-4
    stepped = (u - 0.1 * g_tent).detach()
    assert ((10 * stepped @ text.T).softmax(1)[:, 0] > z.softmax(1)[:, 0]).all()
    # a batch with two pseudo-classes does get a gradient
    mixed = torch.cat([u[:3], torch.nn.functional.normalize(text[1] + 0.3 * torch.randn(2, 8), dim=1)])
    mixed = mixed.detach().requires_grad_()
    (g_mixed,) = torch.autograd.grad(SoftContrastive()(Batch(None, 100 * mixed @ text.T, None)).mean(), mixed)
    assert g_mixed.abs().max() > 1e-6


def _brute_otsu(s):
    best, best_t = -1.0, None
    vals = sorted(set(s.tolist()))
    for t in vals[:-1]:
        lo, hi = s[s <= t].double(), s[s > t].double()
        w0, w1 = len(lo) / len(s), len(hi) / len(s)
        v = w0 * w1 * (lo.mean() - hi.mean()) ** 2
        if v > best:
            best, best_t = v, t
    return best_t


@pytest.mark.parametrize("seed", range(5))
def test_otsu_threshold_equals_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.cat([torch.randn(30, generator=g) - 2, torch.randn(20, generator=g) + 1])
    s = (s * 4).round() / 4  # ties
    assert float(otsu_threshold(s)) == pytest.approx(_brute_otsu(s))


def test_oce_threshold_membership_and_loss():
    scores = torch.tensor([-2.3, -2.2, -2.25, -0.1, -0.2, -0.15])
    oce = OutlierContrast(gamma=0.005)
    oce.init_threshold(scores)
    assert float(oce.alpha) == pytest.approx(float(otsu_threshold(scores))) == pytest.approx(-2.2)
    assert oce.is_id(scores).tolist() == [False, False, False, True, True, True]
    w = torch.sigmoid((scores - oce.alpha) / 0.005)
    mu_in, mu_out = (w * scores).sum() / w.sum(), ((1 - w) * scores).sum() / (1 - w).sum()
    torch.testing.assert_close(oce(scores), -(mu_in - mu_out) ** 2)
    oce(scores).backward()
    assert oce.alpha.grad is not None


def test_max_log_prob_uses_temperature_one():
    z = torch.tensor([[100.0, 0.0]])
    assert float(max_log_prob(z, 100.0)) == pytest.approx(float(torch.tensor([1.0, 0.0]).log_softmax(0)[0]))


def test_memory_keeps_top_k_per_class_and_samples_per_class():
    mem = ClassMemory(num_classes=3, k=2)
    images = torch.arange(6.0).view(6, 1)
    mem.add(images, torch.tensor([0, 0, 0, 1, 1, 2]), torch.tensor([0.1, 0.9, 0.5, 0.3, 0.2, 0.7]))
    assert len(mem) == 5
    assert sorted(mem.images[0, :2].flatten().tolist()) == [1.0, 2.0]  # confidences 0.9, 0.5
    mem.add(torch.tensor([[10.0]]), torch.tensor([0]), torch.tensor([0.6]))
    assert sorted(mem.images[0].flatten().tolist()) == [1.0, 10.0]
    g = torch.Generator().manual_seed(0)
    assert len(mem.sample(1, g)) == 3  # one per class
    assert len(mem.sample(5, g)) == 5  # all when fewer
    mem.reset()
    assert len(mem) == 0 and mem.sample(1, g) is None
