"""RMT and SANTA (METHODS-ZOO Z.7, Z.10): class statistics, the SupCon loss over [prototype, clean,
augmented] and the two-view consistency losses against hand computations; the warm-up, the EMA teacher
and the reset point on a tiny network; then both methods end to end on cifar_resnet20 with real shifted
CIFAR-10 batches and real labelled source images."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tta
from tta.errors import ConfigError
from tta.methods.rmt import TwoViewConsistency
from tta.methods.santa import student_as_target
from tta.parts.contrastive import PrototypeContrast, nearest_prototypes, projector, supcon_loss
from tta.parts.objectives import symmetric_cross_entropy
from tta.parts.prototypes import ClassStats, class_prototypes, feature_stats
from tta.parts.source import SourceBatches


# --------------------------------------------------------------------------- class statistics
def test_class_stats_mean_and_unbiased_variance_by_hand():
    f = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 1.0], [10.0, -4.0], [0.5, 0.5]])
    y = torch.tensor([0, 0, 0, 2, 1])
    stats = ClassStats(num_classes=4, dim=2)
    stats.add(f[:2], y[:2])  # two batches: the accumulator sums across them
    stats.add(f[2:], y[2:])
    assert stats.count.tolist() == [3, 1, 1, 0] and stats.total == 5
    assert stats.present.tolist() == [True, True, True, False]
    # class 0: rows (1,2), (3,6), (5,1): mean (3, 3); unbiased var ((4+0+4)/2, (1+9+4)/2) = (4, 7)
    torch.testing.assert_close(stats.mean[0], torch.tensor([3.0, 3.0]))
    torch.testing.assert_close(stats.var[0], torch.tensor([4.0, 7.0]))
    torch.testing.assert_close(stats.mean[2], torch.tensor([10.0, -4.0]))
    assert torch.isnan(stats.mean[3]).all()  # unseen: no mean
    assert torch.isnan(stats.var[1:]).all()  # seen fewer than twice: no unbiased variance
    with pytest.raises(ConfigError, match="labels must lie in"):
        stats.add(f[:1], torch.tensor([4]))


def test_class_stats_variance_keeps_precision_far_from_zero():
    g = torch.Generator().manual_seed(0)
    f = 1000.0 + torch.randn(4000, 3, generator=g)  # mean^2 / var = 1e6: float32 sums would lose it
    stats = ClassStats(num_classes=1, dim=3)
    for chunk in f.split(500):
        stats.add(chunk, torch.zeros(len(chunk), dtype=torch.long))
    torch.testing.assert_close(stats.var[0], f.double().var(0).float(), rtol=1e-5, atol=0)


class _FixedEncoder:
    """``with_logits`` of a fake encoder: the features are the input rows, the logits a fixed linear map."""

    def __init__(self, weight):
        self.weight = weight

    def with_logits(self, x):
        return x, x @ self.weight


def test_feature_stats_stops_after_the_batch_exceeding_the_count_and_pseudo_labels():
    enc = _FixedEncoder(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))  # class = larger coordinate
    x = torch.tensor([[2.0, 0.0], [0.0, 3.0], [4.0, 1.0], [1.0, 5.0], [7.0, 0.0], [0.0, 9.0]])
    y = torch.tensor([0, 1, 2, 2, 0, 1])
    batches = [(x[i:i + 2], y[i:i + 2]) for i in range(0, 6, 2)]
    stats = feature_stats(enc, batches, max_count=3)  # 2 -> 4 > 3: stops after the second batch
    assert stats.total == 4 and stats.count.tolist() == [1, 1, 2]
    torch.testing.assert_close(stats.mean[2], torch.tensor([2.5, 3.0]))
    assert feature_stats(enc, batches, max_count=4).total == 6  # 4 does not exceed 4
    pseudo = feature_stats(enc, [(b, None) for b, _ in batches], pseudo_labels=True)  # arg-max of x @ W
    assert pseudo.count.tolist() == [3, 3, 0]
    torch.testing.assert_close(pseudo.mean[0], torch.tensor([13 / 3, 1 / 3]))
    torch.testing.assert_close(pseudo.var[1], torch.tensor([1 / 3, 28 / 3]))  # rows (0,3), (1,5), (0,9)
    with pytest.raises(ConfigError, match="needs labels"):
        feature_stats(enc, [(x, None)])


def test_class_prototypes_one_pass_and_only_seen_classes():
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, 4.0], [5.0, 5.0]]).view(5, 2, 1, 1)
    y = torch.tensor([0, 0, 2, 2, 0])
    enc = _FixedEncoder(torch.eye(2, 4))  # 4 classes, class 1 and 3 unseen
    flat = type("Flat", (), {"with_logits": lambda self, b: enc.with_logits(b.flatten(1))})()
    protos = class_prototypes(flat, SourceBatches(x, y, batch_size=2, seed=0))
    torch.testing.assert_close(protos, torch.tensor([[3.0, 5 / 3], [0.0, 3.0]]))  # rows of classes 0, 2


# --------------------------------------------------------------------------- contrastive loss
def _supcon_by_hand(h, views, tau, base):
    """SupCon written as its definition, one anchor and one positive at a time."""
    n, b = h.shape[0], h.shape[0] // views
    total = 0.0
    for u in range(n):
        denominator = sum(math.exp(float(h[u] @ h[w]) / tau) for w in range(n) if w != u)
        positives = [v for v in range(n) if v != u and v % b == u % b]
        total += sum(float(h[u] @ h[v]) / tau - math.log(denominator) for v in positives) / len(positives)
    return -(tau / base) * total / n


@pytest.mark.parametrize("views,b,tau,base", [(3, 2, 0.1, None), (3, 3, 0.5, 0.07), (2, 4, 1.0, None)])
def test_supcon_matches_the_definition(views, b, tau, base):
    h = F.normalize(torch.randn(views * b, 5, generator=torch.Generator().manual_seed(views + b)), dim=1)
    expected = _supcon_by_hand(h, views, tau, base or tau)
    assert float(supcon_loss(h, views, tau, base)) == pytest.approx(expected, rel=1e-5)


def test_supcon_rejects_a_row_count_not_split_into_views():
    with pytest.raises(ValueError, match="divisible"):
        supcon_loss(torch.randn(7, 3), views=3)


def test_nearest_prototype_is_by_cosine_not_distance():
    protos = torch.tensor([[10.0, 0.0], [0.5, 0.6]])
    f = torch.tensor([[1.0, 1.1], [3.0, 0.1]])  # row 0: closer to proto 0 in distance, to proto 1 in angle
    assert torch.equal(nearest_prototypes(f, protos), protos[[1, 0]])


def test_prototype_contrast_stacks_views_and_moves_only_projector_and_features():
    protos = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    head = PrototypeContrast(protos, dim=8, temperature=0.1, seed=3)
    f = torch.randn(5, 6, generator=torch.Generator().manual_seed(2), requires_grad=True)
    f_a = (f.detach() + 0.1).requires_grad_(True)
    loss = head(f, f_a)
    anchors = protos[(F.normalize(f.detach(), dim=1) @ F.normalize(protos, dim=1).T).argmax(1)]
    h = F.normalize(head.projector(torch.cat([anchors, f.detach(), f_a.detach()])), dim=1)
    assert float(loss.detach()) == pytest.approx(_supcon_by_hand(h.detach(), 3, 0.1, 0.1), rel=1e-5)
    loss.backward()
    assert f.grad.abs().sum() > 0 and f_a.grad.abs().sum() > 0
    assert all(p.grad is not None for p in head.projector.parameters())
    assert not head.prototypes.requires_grad
    with pytest.raises(ConfigError, match="temperature"):
        PrototypeContrast(protos, temperature=0.0)


def test_projector_is_seeded_without_touching_the_global_rng():
    torch.manual_seed(5)
    before = torch.random.get_rng_state()
    a, b = projector(6, 8, seed=1), projector(6, 8, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert [m.__class__ for m in a] == [nn.Linear, nn.ReLU, nn.Linear] and a[0].weight.shape == (8, 6)
    assert a[2].weight.shape == (8, 8) and all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a[0].weight, projector(6, 8, seed=2)[0].weight)


# --------------------------------------------------------------------------- two-view losses
def _two_view_batch():
    g = torch.Generator().manual_seed(0)
    z, z_a, t = (torch.randn(3, 4, generator=g).requires_grad_(True) for _ in range(3))
    batch = type("B", (), {})()
    batch.logits, batch.extras = z, {"augmented": z_a, "target": t}
    return batch, z, z_a, t


def test_rmt_consistency_is_half_sce_of_each_view_against_the_teacher():
    batch, z, z_a, t = _two_view_batch()
    def ce(q, logits):
        return -(q * logits.log_softmax(1)).sum(1)
    sce = [0.5 * ce(t.softmax(1), v) + 0.5 * ce(v.softmax(1), t) for v in (z, z_a)]
    loss = TwoViewConsistency(symmetric_cross_entropy)(batch)
    torch.testing.assert_close(loss, 0.5 * sce[0] + 0.5 * sce[1])
    loss.sum().backward()
    assert t.grad is None and z.grad.abs().sum() > 0 and z_a.grad.abs().sum() > 0


def test_santa_student_probabilities_are_the_target_gradient_through_them_only():
    batch, z, z_a, t = _two_view_batch()
    loss = TwoViewConsistency(student_as_target)(batch)
    by_hand = [-(v.softmax(1) * t.log_softmax(1)).sum(1) for v in (z, z_a)]
    torch.testing.assert_close(loss, 0.5 * by_hand[0] + 0.5 * by_hand[1])
    loss.sum().backward()
    assert t.grad is None
    # d/dz of -sum softmax(z) log q = -softmax(z) * (log q - sum softmax(z) log q), halved
    p, logq = z.softmax(1).detach(), t.log_softmax(1).detach()
    torch.testing.assert_close(z.grad, -0.5 * p * (logq - (p * logq).sum(1, keepdim=True)))


# --------------------------------------------------------------------------- the loop on a tiny net
class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(self.features(x))


def _source(n=24):
    g = torch.Generator().manual_seed(7)
    return torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8), torch.arange(n) % 4


def _tiny(name="rmt", **kw):
    torch.manual_seed(0)
    x, y = _source()
    return tta.wrap(TinyNet(), name, source_images=x, source_labels=y, source_batch_size=8, **kw)


def test_warm_up_ramps_the_lr_moves_the_teacher_and_keeps_adam_state(monkeypatch):
    seen = []
    real = torch.optim.Adam.step

    def step(self, *args, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return real(self, *args, **kw)
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    a = _tiny(warmup_samples=35, lr=0.01)  # 35 // 8 = 4 steps
    assert a.warmup_steps == 4
    assert seen == [[0.01 * (i + 1) / 4] * 2 for i in range(4)]  # both groups ramped
    assert [g["lr"] for g in a.optimizer.param_groups] == [0.01, 0.01]
    state = a.optimizer.state
    assert all(int(state[p]["step"]) == 4 for p in a.model.parameters())
    assert not any(p in state for p in a.contrast.projector.parameters())  # no gradient in the warm-up
    assert not all(torch.equal(p, q) for p, q in zip(a.teacher.parameters(), a.model.parameters()))
    assert not any(p.requires_grad for p in a.teacher.parameters())


def test_one_rmt_step_output_teacher_ema_and_reset_point():
    a = _tiny(warmup_samples=16)
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    student, teacher = copy.deepcopy(a.model), copy.deepcopy(a.teacher)
    after_warmup = copy.deepcopy(a.state_dict())
    with torch.no_grad():
        expected = student(x) + teacher(x)
    out = a(x)
    torch.testing.assert_close(out, expected)  # student + teacher logits, pre-update
    assert a.counters["backward"] == 2 and a.counters["steps"] == 1  # test loss, then the replay batch
    for t0, t1, s1 in zip(teacher.parameters(), a.teacher.parameters(), a.model.parameters()):
        torch.testing.assert_close(t1, 0.999 * t0 + 0.001 * s1)
    assert not torch.equal(a.contrast.projector[0].weight, after_warmup["contrast.projector.0.weight"])
    a.reset()  # to after the warm-up: student, teacher, projector, optimizer, source position, RNG
    assert all(torch.equal(v, after_warmup[k]) for k, v in a.state_dict().items())
    torch.testing.assert_close(a(x), out, rtol=0, atol=0)


def test_santa_anchor_stays_frozen_and_only_affine_and_projector_move():
    a = _tiny("santa")
    assert a.warmup_steps == 0
    anchor = copy.deepcopy(a.teacher.state_dict())
    conv, bn = a.model.features[0].weight.clone(), a.model.features[1].weight.clone()
    x = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = copy.deepcopy(a.model)(x)
    torch.testing.assert_close(a(x), expected)  # the student's logits, pre-update
    a(x)
    assert all(torch.equal(v, anchor[k]) for k, v in a.teacher.state_dict().items())
    assert torch.equal(a.model.features[0].weight, conv) and not torch.equal(a.model.features[1].weight, bn)
    assert a.counters["backward"] == 2 and a.counters["steps"] == 2  # no replay


def test_missing_or_bad_source_is_one_clear_error():
    for name in ("rmt", "santa"):
        with pytest.raises(ConfigError, match=f"{name} needs source data: pass source_images and source_labels"):
            tta.wrap(TinyNet(), name)
    x, y = _source()
    with pytest.raises(ConfigError, match="source_labels must be an int64"):
        tta.wrap(TinyNet(), "rmt", source_images=x, source_labels=y[:5])
    with pytest.raises(ConfigError, match="must be >= 0"):
        tta.wrap(TinyNet(), "rmt", source_images=x, source_labels=y, lambda_ce_src=-1.0)
    with pytest.raises(ConfigError, match="EMA momentum"):
        tta.wrap(TinyNet(), "rmt", source_images=x, source_labels=y, ema=1.5)


def test_registered_metadata_and_configs_load():
    from pathlib import Path
    from tta import config
    info = tta.methods.info("rmt")
    assert (info.cost.grad, info.cost.backward, info.cost.nograd, info.cost.params) == (3, 1, 1, "all")
    assert tta.methods.info("santa").cost == tta.methods.Cost(grad=2, backward=1, nograd=1)
    assert "source_labels" in info.source_data and "source_labels" in tta.methods.info("santa").source_data
    root = Path(__file__).resolve().parent.parent / "configs"
    for bench, batch in (("cifar10c", 200), ("imagenetc", 64)):
        for name in ("rmt", "santa"):
            cfg = config.load(root / bench / f"{name}.yaml")
            m = cfg["method"]
            assert m["name"] == name and m["source_batch_size"] == batch == cfg["stream"]["batch_size"]
            assert set(m) - {"name", "source"} <= set(tta.methods.method_options(name)) | set(tta.methods.COMMON_KEYS)
    assert config.load(root / "imagenetc" / "rmt.yaml")["method"]["nesterov"] is True


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def shifted(cifar_test):
    """Two REFERENCE.md shifts (noise 0.1, contrast 0.15) of 64 test images, in batches of 32."""
    x = cifar_test[0][:64].float() / 255
    noise = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    m = x.mean(dim=(2, 3), keepdim=True)
    return [*noise.split(32), *((x - m) * 0.15 + m).clamp(0, 1).split(32)]


@pytest.fixture(scope="module")
def source(data_dir):
    from tta.data.datasets import load_cifar10
    x, y = load_cifar10(data_dir, "train")
    return x[:192], y[:192]


def _real(name, data_dir, source, **kw):
    extra = dict(warmup_samples=128) if name == "rmt" else {}
    return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), name, source_images=source[0],
                    source_labels=source[1], source_batch_size=64, **extra, **kw)


def _same_optimizer_state(a, b):
    return a["param_groups"] == b["param_groups"] and a["state"].keys() == b["state"].keys() and all(
        torch.equal(a["state"][i][k], b["state"][i][k]) for i in a["state"] for k in a["state"][i])


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["rmt", "santa"])
def test_real_run_resets_bit_exactly_and_is_seeded(name, data_dir, source, shifted):
    a = _real(name, data_dir, source, seed=3)
    assert a.contrast.prototypes.shape == (10, 64) and a.warmup_steps == (2 if name == "rmt" else 0)
    start = {k: v.clone() for k, v in a.state_dict().items()}
    optim = copy.deepcopy(a.optimizer.state_dict())
    outs = []
    for x in shifted:
        outs.append(a(x))
        assert outs[-1].shape == (32, 10) and torch.isfinite(outs[-1]).all()
    assert a.counters["steps"] == 4 and a.counters["nonfinite"] == 0
    assert len(optim["param_groups"]) == 2 and not _same_optimizer_state(a.optimizer.state_dict(), optim)
    assert any(not torch.equal(v, start[k]) for k, v in a.state_dict().items())
    a.reset()
    assert all(torch.equal(v, start[k]) for k, v in a.state_dict().items())
    assert _same_optimizer_state(a.optimizer.state_dict(), optim)
    assert all(torch.equal(a(x), o) for x, o in zip(shifted[:2], outs))  # same source batches, same draws
    b = _real(name, data_dir, source, seed=3)
    assert torch.equal(b(shifted[0]), outs[0])


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["rmt", "santa"])
def test_real_small_batches_and_a_mid_stream_reset(name, data_dir, source, shifted):
    a = _real(name, data_dir, source)
    for size in (16, 2, 32, 5):
        out = a(shifted[0][:size])
        assert out.shape == (size, 10) and torch.isfinite(out).all()
    a.reset()
    assert torch.isfinite(a(shifted[2][:16])).all()
