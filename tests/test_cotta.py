"""CoTTA parts against hand computations, the augmentation pipeline against torchvision, and the loop."""
import copy
from types import SimpleNamespace

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

import tta
from tta.errors import ConfigError
from tta.methods import cotta as cotta_mod
from tta.parts import augment as A
from tta.parts.teacher import AnchorGate, EMATeacher, StochasticRestore, TeacherCrossEntropy


def test_ema_update_matches_hand_computation():
    student = nn.Linear(3, 2)
    t = EMATeacher(0.9)
    t.build(student)
    w0 = student.weight.detach().clone()
    with torch.no_grad():
        student.weight.add_(1.0)
    t.update(student)
    assert torch.allclose(t.model.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert not any(p.requires_grad for p in t.model.parameters())
    t.build(student)  # rebuilding copies the student again
    assert torch.equal(t.model.weight, student.weight)


def test_anchor_gate_confidence_and_threshold(tiny_bn_model):
    x = torch.rand(8, 3, 16, 16)
    with torch.no_grad():
        expected = float(tiny_bn_model(x).softmax(1).max(1).values.mean())
    low, high = AnchorGate(0.0), AnchorGate(1.01)
    low.build(tiny_bn_model)
    high.build(tiny_bn_model)
    assert low(x) is False and high(x) is True
    assert low.confidence == pytest.approx(expected, abs=1e-6)


def _fake_adapter(params, source):
    return SimpleNamespace(_source_state={f"p{i}": s for i, s in enumerate(source)},
                           param_names=[f"p{i}" for i in range(len(params))])


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_restore_extremes(p):
    params = [torch.randn(5, 4), torch.randn(7)]
    source = [torch.zeros(5, 4), torch.zeros(7)]
    before = [q.clone() for q in params]
    r = StochasticRestore(p)
    r.bind(_fake_adapter(params, source))
    r(params, torch.Generator().manual_seed(0))
    for q, b, s in zip(params, before, source):
        assert torch.equal(q, s if p == 1.0 else b)


def test_restore_mask_is_seeded_bernoulli():
    params = [torch.ones(200, 50)]
    r = StochasticRestore(0.3)
    r.bind(_fake_adapter(params, [torch.zeros(200, 50)]))
    r(params, torch.Generator().manual_seed(7))
    gen = A.device_generator(torch.Generator().manual_seed(7), torch.device("cpu"))
    mask = torch.rand(200, 50, generator=gen) < 0.3
    assert torch.equal(params[0] == 0, mask)
    assert 0.27 < float(mask.float().mean()) < 0.33
    with pytest.raises(ConfigError):
        StochasticRestore(1.5)


def test_teacher_cross_entropy_soft_and_symmetric():
    student = torch.randn(4, 5, requires_grad=True)
    target = torch.randn(4, 5, requires_grad=True)
    batch = SimpleNamespace(logits=student, extras={"target": target})
    q, logp = target.softmax(1), student.log_softmax(1)
    ce = -(q * logp).sum(1)
    assert torch.allclose(TeacherCrossEntropy()(batch), ce)
    sym = TeacherCrossEntropy(symmetric=True)(batch)
    assert torch.allclose(sym, 0.5 * ce - 0.5 * (student.softmax(1) * target.log_softmax(1)).sum(1))
    sym.sum().backward()
    assert target.grad is None and student.grad is not None  # the teacher is a fixed target


def test_augmentation_pipeline_matches_torchvision_per_copy():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32)
    p = A.draw_params(4, 32, 32, g)
    mine = A.apply_augment(x, p, noise_std=0).view(4, 3, 3, 32, 32)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue, TF.adjust_gamma]
    for i in range(4):
        y = x.clone()
        for k in p["order"][i].tolist():
            y = ops[k](y, float(p["jitter"][i, k]))
        y = nn.functional.pad(y, (16,) * 4, mode="replicate")
        y = TF.affine(y, angle=float(p["angle"][i]), translate=[int(v) for v in p["shift"][i]],
                      scale=float(p["scale"][i]), shear=[0.0, 0.0], interpolation=TF.InterpolationMode.BILINEAR)
        y = TF.center_crop(TF.gaussian_blur(y, [5, 5], [float(p["sigma"][i])] * 2), [32, 32])
        y = y.flip(-1) if p["flip"][i] else y
        assert torch.allclose(y.clamp(0, 1), mine[i], atol=1e-5)


def test_augmentation_draws_differ_per_copy_and_are_seeded():
    x = torch.rand(2, 3, 16, 16)
    a = A.cotta_augment(x, 3, torch.Generator().manual_seed(1))
    b = A.cotta_augment(x, 3, torch.Generator().manual_seed(1))
    assert a.shape == (6, 3, 16, 16) and torch.equal(a, b)
    assert not torch.allclose(a[0:2], a[2:4])
    noise = A.apply_augment(x, A.draw_params(1, 16, 16, torch.Generator().manual_seed(2))) - \
        A.apply_augment(x, A.draw_params(1, 16, 16, torch.Generator().manual_seed(2)), noise_std=0)
    assert 0.003 < float(noise.std()) < 0.007


def _cotta(model, **kw):
    return tta.wrap(model, "cotta", augmentations=kw.pop("augmentations", 4), **kw)


def test_prediction_is_the_teacher_output_when_the_gate_is_off(tiny_bn_model):
    a = _cotta(tiny_bn_model, threshold=0.0)
    x = torch.rand(8, 3, 16, 16)
    teacher = copy.deepcopy(a.teacher_model)
    with torch.no_grad():
        expected = teacher(x)
    out = a(x)
    assert torch.allclose(out, expected, atol=1e-6)
    assert a.counters["augmented"] == 0 and a.counters["steps"] == 1


def test_gate_on_batches_all_augmented_views_into_one_forward(tiny_bn_model, monkeypatch):
    a = _cotta(tiny_bn_model, threshold=1.01, augmentations=32, aug_batch=32)
    shapes, calls = [], []
    real = cotta_mod.apply_augment

    def recording(x, p):
        views = real(x, p)
        shapes.append(views.shape)
        return views
    monkeypatch.setattr(cotta_mod, "apply_augment", recording)
    a.teacher_model.register_forward_hook(lambda *args: calls.append(1))
    a(torch.rand(6, 3, 16, 16))
    assert len(calls) == 1  # one teacher forward for the 32 copies (and no plain teacher pass)
    assert shapes == [torch.Size([32 * 6, 3, 16, 16])]
    assert a.counters["augmented"] == 1


def test_chunked_augmented_teacher_equals_one_forward(tiny_bn_model):
    """vmap keeps per-copy BN statistics, so any chunking gives the same average."""
    x = torch.rand(6, 3, 16, 16)
    outs = []
    for chunk in (1, 3, 8):
        a = _cotta(copy.deepcopy(tiny_bn_model), threshold=1.01, augmentations=8, aug_batch=chunk)
        outs.append(a.teacher_output(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5) and torch.allclose(outs[0], outs[2], atol=1e-5)
    # ... and equals separate forwards of each augmented copy
    a = _cotta(copy.deepcopy(tiny_bn_model), threshold=1.01, augmentations=8)
    views = A.cotta_augment(x, 8, torch.Generator().manual_seed(a.seed)).view(8, 6, 3, 16, 16)
    with torch.no_grad():
        manual = torch.stack([a.teacher_model(v) for v in views]).mean(0)
    assert torch.allclose(outs[0], manual, atol=1e-5)


def test_student_teacher_anchor_roles_and_reset(tiny_bn_model):
    a = _cotta(tiny_bn_model, threshold=1.01, restore=0.1)
    assert len(a.params) == len(list(tiny_bn_model.parameters()))  # every weight is trained
    x = torch.rand(8, 3, 16, 16)
    first = [a(x) for _ in range(3)]
    src = a._source_state
    assert any(not torch.equal(p, src[n]) for n, p in a.model.named_parameters())
    assert any(not torch.equal(p, src[n]) for n, p in a.teacher_model.named_parameters())
    assert all(torch.equal(p, src[n]) for n, p in a.anchor_model.named_parameters())  # frozen anchor
    a.reset()
    for m in (a.model, a.teacher_model, a.anchor_model):
        assert all(torch.equal(p, src[n]) for n, p in m.named_parameters())
    again = [a(x) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(first, again))  # reset restores the generator too


def test_cotta_options_validated(tiny_bn_model):
    with pytest.raises(ConfigError, match="loss"):
        tta.wrap(tiny_bn_model, "cotta", loss="kl")
    a = tta.wrap(tiny_bn_model, "cotta", loss="symmetric", optimizer="sgd", lr=0.01, nesterov=True)
    assert a.recipe.objective.symmetric and isinstance(a.optimizer, torch.optim.SGD)
