"""AdaContrast (METHODS-ZOO Z.11): the MoCo queue and the k-NN bank on hand-made tensors, the four views
against torchvision and PIL, and the method end to end on cifar_resnet20 with real shifted CIFAR-10."""
import copy
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn

import tta
from tta.errors import ConfigError, InputError
from tta.methods.adacontrast import PseudoLabelAndInstance
from tta.parts import moco_views as V
from tta.parts.moco import KeyQueue, KNNBank, info_nce


# ------------------------------------------------------------------------------------------ key queue
def _queue(features, labels, ptr=0, temperature=0.5, class_aware=True):
    q = KeyQueue(features.shape[1], temperature, class_aware)
    q.features, q.labels, q.ptr = features.clone(), labels.clone(), ptr
    return q


def test_queue_fill_is_column_normalised_gaussian_with_uniform_labels_from_the_generator():
    q = KeyQueue(5000)
    q.fill(3, 7, torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    raw = torch.randn(3, 5000, generator=g)
    assert torch.allclose(q.features, raw / raw.norm(dim=0, keepdim=True))
    assert torch.equal(q.labels, torch.randint(0, 7, (5000,), generator=g))
    assert q.ptr == 0 and set(q.labels.tolist()) == set(range(7))


def test_instance_logits_against_the_old_queue_masked_with_the_new_labels():
    feats = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])  # D=2, K=4
    queue = _queue(feats, torch.tensor([0, 1, 2, 1]), ptr=3)
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    k = torch.tensor([[0.6, 0.8], [0.8, 0.6]])
    labels = torch.tensor([2, 1])  # written to slots 3 and 0 (ring)
    logits = queue.instance_logits(q, k, labels)
    # by hand, T = 0.5: positives q.k; negatives q . old features
    pos = torch.tensor([0.6, 0.6]) / 0.5
    neg = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]]) / 0.5
    # labels after the push: slot0 <- 1, slot1 1, slot2 2, slot3 <- 2 => [1, 1, 2, 2]
    inf = float("-inf")
    neg[0] = torch.tensor([neg[0, 0], neg[0, 1], inf, inf])  # query 0 (label 2): slots 2, 3 masked
    neg[1] = torch.tensor([inf, inf, neg[1, 2], neg[1, 3]])  # query 1 (label 1): slots 0, 1 masked
    assert torch.equal(logits, torch.cat([pos[:, None], neg], 1))
    # slot 3 held label 1 before the push: with the old labels query 1 would have been masked there
    assert torch.equal(queue.labels, torch.tensor([1, 1, 2, 2])) and queue.ptr == 1
    assert torch.equal(queue.features[:, 3], k[0]) and torch.equal(queue.features[:, 0], k[1])
    plain = _queue(feats, torch.tensor([0, 1, 2, 1]), ptr=3, class_aware=False).instance_logits(q, k, labels)
    assert torch.isfinite(plain).all() and torch.equal(plain[:, 0], pos)


def test_ring_pointer_wraps_and_rejects_oversized_batches():
    queue = _queue(torch.zeros(2, 5), torch.zeros(5, dtype=torch.long))
    for step in range(3):  # 3 keys at a time into 5 slots: 0-2, 3,4,0, 1-3
        keys = torch.full((3, 2), float(step + 1))
        queue.push(keys, torch.full((3,), step + 1))
    assert queue.ptr == (3 * 3) % 5
    assert queue.labels.tolist() == [2, 3, 3, 3, 2]
    assert queue.features[0].tolist() == [2.0, 3.0, 3.0, 3.0, 2.0]
    with pytest.raises(InputError, match="queue"):
        queue.push(torch.zeros(6, 2), torch.zeros(6, dtype=torch.long))


def test_push_after_the_logits_keeps_their_gradient_on_the_old_queue():
    feats = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(0)), dim=0)
    queue = _queue(feats, torch.arange(8) % 3, class_aware=False)
    q = F.normalize(torch.randn(2, 4), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(2, 4), dim=1)
    info_nce(queue.instance_logits(q, k, torch.tensor([0, 1]))).sum().backward()
    direct = q.detach().clone().requires_grad_(True)
    logits = torch.cat([(direct * k).sum(1, keepdim=True), direct @ feats], 1) / 0.5
    F.cross_entropy(logits, torch.zeros(2, dtype=torch.long), reduction="sum").backward()
    assert torch.allclose(q.grad, direct.grad, atol=1e-6)


def test_info_nce_with_masked_negatives_by_hand():
    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0]])
    by_hand = -(2.0 - np.log(np.exp(2.0) + np.exp(1.0) + np.exp(0.0)))
    assert info_nce(logits).item() == pytest.approx(by_hand, rel=1e-6)


# ------------------------------------------------------------------------------------------ k-NN bank
def test_bank_grows_by_concatenation_overshoots_then_overwrites_at_the_reference_pointer():
    bank = KNNBank(capacity=5, neighbours=1)
    lengths, ptrs = [], []
    for step in range(6):
        bank.push(torch.full((2, 3), float(step)), torch.full((2, 4), float(step)))
        lengths.append(len(bank))
        ptrs.append(bank.ptr)
    # growth 2, 4, 6 (> 5: overshoot); ptr = (ptr + 2) mod rows: 0, 2, 4; then ring writes at 4 (the batch
    # just appended), 0, 2
    assert lengths == [2, 4, 6, 6, 6, 6] and ptrs == [0, 2, 4, 0, 2, 4]
    assert bank.features[:, 0].tolist() == [4.0, 4.0, 5.0, 5.0, 3.0, 3.0]
    assert torch.equal(bank.probs[:, 0], bank.features[:, 0])


def test_bank_refine_averages_the_stored_probabilities_of_the_cosine_nearest():
    bank = KNNBank(capacity=10, neighbours=2)
    feats = torch.tensor([[10.0, 0.0], [0.0, 1.0], [1.0, 1.1], [-1.0, 0.0]])  # unnormalised
    probs = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.2, 0.8], [0.1, 0.6, 0.3], [0.0, 0.0, 1.0]])
    bank.push(feats, probs)
    labels, avg = bank.refine(torch.tensor([[0.1, 0.0], [0.0, 5.0]]))
    # query 0 = direction (1, 0): cosine nearest rows 0 (cos 1) and 2 (cos 0.67), though row 0 is far away
    # query 1 = direction (0, 1): rows 1 (cos 1) and 2 (cos 0.74)
    expected = torch.stack([(probs[0] + probs[2]) / 2, (probs[1] + probs[2]) / 2])
    assert torch.allclose(avg, expected) and labels.tolist() == [0, 2]
    small = KNNBank(10, neighbours=5)
    small.push(torch.ones(2, 2), torch.ones(2, 3))
    with pytest.raises(InputError, match="neighbours"):
        small.refine(torch.ones(1, 2))


# -------------------------------------------------------------------------------------------- views
def test_pil_box_radius_by_hand():
    # sigma 2, 3 passes: s2 = 4/3, L = sqrt(17), l = 1, a = 3 (2 - 4) / (6 (4/3 - 4)) = 0.375
    assert V.pil_box_radius(torch.tensor([2.0])).item() == pytest.approx(1.375, abs=1e-6)
    # sigma 0.5: s2 = 1/12, l = 0, a = (0 - 0.25) / (6 (1/12 - 1)) = 1/22
    assert V.pil_box_radius(torch.tensor([0.5])).item() == pytest.approx(1 / 22, abs=1e-7)


def test_box_pass_fractional_taps_and_repeated_edges_by_hand():
    row = torch.tensor([9.0, 0.0, 0.0, 4.0, 0.0]).view(1, 1, 1, 5)
    out = V._box_pass(row, torch.tensor([0.5]))  # taps [0.5, 1, 0.5] / 2, edge pixel repeated
    expected = torch.tensor([(0.5 * 9 + 9 + 0.5 * 0) / 2, (4.5 + 0 + 0) / 2, (0 + 0 + 2) / 2, (0 + 4 + 0) / 2,
                             (2 + 0 + 0) / 2])
    assert torch.allclose(out.flatten(), expected)


@pytest.mark.realdata
def test_gaussian_blur_against_pil_on_real_images(cifar_test):
    from PIL import Image, ImageFilter
    x = cifar_test[0][:6]
    # not sigma = 1 exactly: there the box taps are 1/6, 2/3, 1/6 and a pass of integers lands on x.5
    # ties, which PIL's truncated fixed-point weights break otherwise than round-half-even (sigma drawn
    # from U[0.1, 2] hits such a value with probability 0)
    for sigma in (0.1, 0.5, 0.77, 1.1, 1.5, 2.0):
        pil = torch.stack([torch.from_numpy(np.array(Image.fromarray(img.permute(1, 2, 0).numpy())
                                                     .filter(ImageFilter.GaussianBlur(sigma)))).permute(2, 0, 1)
                           for img in x]).float()
        s = torch.full((6,), sigma)
        gridded = V.pil_gaussian_blur(x.float() / 255, s, grid=True) * 255
        floating = V.pil_gaussian_blur(x.float() / 255, s) * 255
        d_grid, d_float = (gridded - pil).abs(), (floating - pil).abs()
        assert d_grid.max() <= 2.0 and d_grid.mean() < 0.15, sigma  # measured <= 2 (rare), <= 0.09
        assert d_float.max() <= 3.0 and d_float.mean() < 0.7, sigma  # measured < 2.4, <= 0.63
        if sigma > 1.0:
            assert (x.float() - pil).abs().mean() > 5  # the comparison is not trivial


def test_strong_view_ops_match_torchvision_per_image():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(6, 3, 8, 8, generator=g)
    p = V.draw_strong(6, g)
    p["jitter"][:] = torch.tensor([True, True, True, False, True, False])
    p["gray"][:] = torch.tensor([False, True, False, False, False, True])
    p["blur"][:] = False
    p["flip"][:] = torch.tensor([True, False, False, True, False, False])
    out = V.strong_view(x, p)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(6):
        y = x[i]
        if p["jitter"][i]:
            for op in p["order"][i].tolist():
                y = ops[op](y, float(p["factors"][i, op]))
        if p["gray"][i]:
            y = TF.rgb_to_grayscale(y, num_output_channels=3)
        y = y.flip(-1) if p["flip"][i] else y
        torch.testing.assert_close(out[i], y, atol=2e-6, rtol=0)
    blurred = dict(p, jitter=torch.zeros(6, dtype=torch.bool), gray=torch.zeros(6, dtype=torch.bool),
                   blur=torch.ones(6, dtype=torch.bool), flip=torch.zeros(6, dtype=torch.bool))
    assert torch.allclose(V.strong_view(x, blurred), V.pil_gaussian_blur(x, p["radius"]))


def test_strong_draws_have_the_stated_probabilities_and_ranges():
    p = V.draw_strong(20000, torch.Generator().manual_seed(0))
    for key, prob in (("jitter", 0.8), ("gray", 0.2), ("blur", 0.5), ("flip", 0.5)):
        assert abs(p[key].float().mean().item() - prob) < 0.015, key
    f = p["factors"]
    assert f[:, :3].min() >= 0.6 and f[:, :3].max() <= 1.4 and f[:, 3].abs().max() <= 0.1
    assert torch.equal(p["order"].sort(1).values, torch.arange(4).expand(20000, 4))
    assert len({tuple(o) for o in p["order"][:500].tolist()}) == 24  # every order occurs
    assert p["radius"].min() >= 0.1 and p["radius"].max() <= 2.0


def test_views_per_image_draws_grid_and_seeding():
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(1)).expand(64, -1, -1, -1)
    t, w, q, k = V.moco_views(x, torch.Generator().manual_seed(5))
    assert torch.equal(t, torch.floor(x * 255) / 255)  # uint8(x * 255): truncation
    for v in (w, q, k):
        assert v.shape == x.shape and torch.equal(v, torch.round(v * 255) / 255)  # on the 8-bit grid
    flipped = (w == t.flip(-1)).flatten(1).all(1)
    assert ((w == t).flatten(1).all(1) | flipped).all() and 16 < int(flipped.sum()) < 48
    distinct = {tuple(v.flatten()[:50].tolist()) for v in q}
    assert len(distinct) > 40 and not torch.equal(q, k)  # identical images, independent draws
    again = V.moco_views(x, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip((t, w, q, k), again))
    t2, w2, *_ = V.moco_views(x, torch.Generator().manual_seed(5), pil_grid=False)
    assert torch.equal(t2, x) and not torch.equal(w2, w)


# ----------------------------------------------------------------------------------------- the method
def test_objective_by_hand():
    z = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    inst = torch.tensor([[1.0, 0.0, float("-inf")], [0.5, 1.5, 0.0]])
    batch = type("B", (), {"logits": z, "extras": {"pseudo_labels": torch.tensor([0, 0]), "instance_logits": inst}})
    ce = -z.log_softmax(1)[torch.arange(2), torch.tensor([0, 0])]
    nce = -inst.log_softmax(1)[:, 0]
    assert torch.allclose(PseudoLabelAndInstance(0.5, 2.0)(batch), 0.5 * ce + 2.0 * nce)


def test_options_validated_and_small_model(tiny_bn_model):
    model = nn.Sequential(OrderedDict(body=tiny_bn_model[:-1], fc=tiny_bn_model[-1]))  # a splittable head
    with pytest.raises(ConfigError, match="warmup_samples"):
        tta.wrap(model, "adacontrast", warmup_samples=5, neighbours=10)
    with pytest.raises(ConfigError, match="ema"):
        tta.wrap(model, "adacontrast", ema=1.5)
    with pytest.raises(ConfigError, match="queue_size"):
        tta.wrap(model, "adacontrast", queue_size=0)
    a = tta.wrap(model, "adacontrast", queue_size=8, warmup_samples=10)
    with pytest.raises(InputError, match="batch of 1"):
        a(torch.rand(1, 3, 16, 16))
    for n in (6, 6, 2):  # the bank overshoots 8 (6 + 6), k-NN from the third batch
        assert a(torch.rand(n, 3, 16, 16)).shape == (n, 10)
    assert len(a.bank) == 12 and a.queue.features.shape == (16, 8) and a.last["knn"]
    with pytest.raises(InputError, match="queue"):
        a(torch.rand(9, 3, 16, 16))


OPTIONS = dict(queue_size=256, warmup_samples=32, seed=1)


@pytest.fixture(scope="module")
def batches(dev_domains):
    noise, contrast = dev_domains["noise"], dev_domains["contrast"]
    return [noise[:32], noise[32:64], contrast[:32], contrast[32:64], contrast[64:80], contrast[80:82]]


def _make(data_dir, **kw):
    return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), "adacontrast", **dict(OPTIONS, **kw))


def _memories(a):
    return (a.queue.features.clone(), a.queue.labels.clone(), a.queue.ptr, a.bank.features.clone(),
            a.bank.probs.clone(), a.bank.ptr, a.n_seen)


@pytest.mark.realdata
def test_runs_resets_bit_exactly_and_is_seeded(batches, data_dir):
    a = _make(data_dir)
    assert isinstance(a.optimizer, torch.optim.SGD) and a.optimizer.defaults["nesterov"]
    assert a.optimizer.defaults["weight_decay"] == 1e-4 and len(a.params) == len(list(a.model.parameters()))
    state0 = {k: v.clone() for k, v in a.state_dict().items()}
    outs, lasts = [], []
    for x in batches:  # 32, 32, 32, 32, 16, 2 images: k-NN from the second batch on
        out = a(x)
        assert out.shape == (len(x), 10) and torch.isfinite(out).all()
        outs.append(out)
        lasts.append(dict(a.last))
    assert [l["knn"] for l in lasts] == [False, True, True, True, True, True]
    assert a.counters["steps"] == 6 and a.counters["backward"] == 6 and a.n_seen == 32
    assert len(a.bank) == 32 * 4 + 16 + 2 and a.queue.ptr == 146
    memories = _memories(a)

    a.reset()
    assert all(torch.equal(v, state0[k]) for k, v in a.state_dict().items())  # student, key net, BN buffers
    assert a.queue.empty and len(a.bank) == 0 and a.n_seen == 0
    assert not any(s for s in a.optimizer.state.values())
    again = [a(x) for x in batches]
    assert all(torch.equal(u, v) for u, v in zip(outs, again))
    assert all(torch.equal(u, v) if torch.is_tensor(u) else u == v for u, v in zip(memories, _memories(a)))

    b = _make(data_dir)
    assert all(torch.equal(b(x), o) for x, o in zip(batches[:2], outs[:2]))
    a.reset()  # mid-stream reset = a fresh adapter
    assert torch.equal(a(batches[2]), _make(data_dir)(batches[2]))


@pytest.mark.realdata
def test_order_of_one_batch(batches, data_dir):
    """Key = EMA of the student before the step; two N-train updates of the student and of the key;
    prediction = the updated student in eval mode on the plain view (truncated to the 8-bit grid)."""
    a = _make(data_dir, ema=0.9)
    a(batches[0])
    student0 = [p.detach().clone() for p in a.model.parameters()]
    key0 = [p.detach().clone() for p in a.key_model.parameters()]
    tracked = [m.num_batches_tracked.item() for m in (a.model.net.bn1, a.key_model.net.bn1)]
    out = a(batches[1])
    for k0, s0, k1 in zip(key0, student0, a.key_model.parameters()):
        torch.testing.assert_close(k1, 0.9 * k0 + 0.1 * s0, atol=1e-6, rtol=1e-5)
    assert any(not torch.equal(s0, s1) for s0, s1 in zip(student0, a.model.parameters()))
    assert [a.model.net.bn1.num_batches_tracked.item(), a.key_model.net.bn1.num_batches_tracked.item()] == \
        [t + 2 for t in tracked]
    model = copy.deepcopy(a.model).eval()
    with torch.no_grad():
        expected = model(torch.floor(batches[1] * 255) / 255)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert a.model.net.bn1.training and not a.model.training  # N-train mode again after the prediction
