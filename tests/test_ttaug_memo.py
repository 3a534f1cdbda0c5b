"""Grouped per-image execution (METHODS-ZOO Z.17) against per-image reference computations, and the TTAug and
MEMO methods (Z.2, Z.3) end to end on cifar_resnet20 with real CIFAR-10 images."""
import copy

import pytest
import torch
from torch import nn

import tta
from tta.errors import ConfigError, InputError
from tta.methods import Cost
from tta.parts.augmix import view_chunks
from tta.parts.norm import AlphaStats
from tta.parts.objectives import view_marginal_entropy
from tta.parts.optim import OptimizerSpec
from tta.parts.per_image import (GroupedAlphaStats, bn_groups, episodic_step_predict, functional_update,
                                 view_average)


def test_grouped_alpha_bn_by_hand():
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([1.0, -1.0]))
        bn.running_var.copy_(torch.tensor([2.0, 0.5]))
        bn.weight.copy_(torch.tensor([1.5, 0.5]))
        bn.bias.copy_(torch.tensor([0.1, 0.2]))
    x = torch.randn(6, 2, 3, 3)  # 2 groups of 3 samples
    GroupedAlphaStats(0.25)(bn)
    with bn_groups(bn, 2):
        out = bn(x)
    for g in range(2):
        part = x[3 * g:3 * g + 3]
        mu = part.mean((0, 2, 3))
        var = part.var((0, 2, 3), unbiased=True)
        m = 0.75 * torch.tensor([1.0, -1.0]) + 0.25 * mu
        v = 0.75 * torch.tensor([2.0, 0.5]) + 0.25 * var
        expected = (part - m.view(1, 2, 1, 1)) / torch.sqrt(v.view(1, 2, 1, 1) + bn.eps)
        expected = expected * torch.tensor([1.5, 0.5]).view(1, 2, 1, 1) + torch.tensor([0.1, 0.2]).view(1, 2, 1, 1)
        assert torch.allclose(out[3 * g:3 * g + 3], expected, atol=1e-5)
    with pytest.raises(InputError):
        with bn_groups(bn, 4):
            bn(x)
    assert bn._tta_groups == 1  # restored after the block


def test_grouped_equals_alpha_stats_on_each_group_alone(tiny_bn_model):
    grouped = GroupedAlphaStats(0.1)(copy.deepcopy(tiny_bn_model))
    alone = AlphaStats(0.1)(copy.deepcopy(tiny_bn_model))
    views = torch.rand(4, 5, 3, 16, 16)
    with torch.no_grad():
        expected = torch.stack([alone(v) for v in views])
        with bn_groups(grouped, 4):
            out = grouped(views.view(20, 3, 16, 16)).view(4, 5, -1)
        assert torch.allclose(out, expected, atol=1e-5)
        assert torch.allclose(grouped(views[0]), alone(views[0]), atol=1e-5)  # outside the block: one group
        assert torch.allclose(view_average(grouped, views), expected.mean(1), atol=1e-5)
    # gradients reach the weights but not through the batch moments, as with AlphaStats
    for model in (grouped, alone):
        model.zero_grad()
        model(views[1]).square().sum().backward()
    for (name, a), (_, b) in zip(grouped.named_parameters(), alone.named_parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name
    with pytest.raises(ConfigError):
        bn_groups(nn.Linear(2, 2), 2).__enter__()


OPTIMIZERS = [OptimizerSpec("sgd", lr=0.1, momentum=0.9, nesterov=True),
              OptimizerSpec("sgd", lr=0.1, momentum=0.9, weight_decay=0.01),
              OptimizerSpec("sgd", lr=0.1, momentum=0.0),
              OptimizerSpec("adam", lr=0.01, weight_decay=0.01),
              OptimizerSpec("adamw", lr=0.01, weight_decay=0.1)]


@pytest.mark.parametrize("spec", OPTIMIZERS, ids=lambda s: f"{s.name}-{s.nesterov}-{s.weight_decay}")
def test_functional_update_equals_torch_optimizers_per_image(spec):
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    grads = [torch.randn(2, 4, 3) for _ in range(3)]  # 2 images, 3 steps
    params, state = {"w": start}, {}
    for t, g in enumerate(grads, 1):
        params, state = functional_update(spec, params, {"w": g}, state, t)
    for i in range(2):
        w = nn.Parameter(start.clone())
        opt = spec.build([w])
        for g in grads:
            w.grad = g[i].clone()
            opt.step()
        assert torch.allclose(params["w"][i], w.detach(), atol=1e-6)
    first, _ = functional_update(OPTIMIZERS[0], {"w": start}, {"w": grads[0]}, {}, 1)
    assert torch.allclose(first["w"], start - 1.9 * 0.1 * grads[0], atol=1e-6)  # fresh Nesterov: 1.9 lr g


@pytest.mark.parametrize("steps, spec", [(1, OptimizerSpec("sgd", lr=0.05, momentum=0.9, nesterov=True)),
                                         (2, OptimizerSpec("adam", lr=0.01))])
def test_episodic_step_predict_equals_a_loop_of_single_image_episodes(tiny_bn_model, steps, spec):
    model = GroupedAlphaStats(0.1)(copy.deepcopy(tiny_bn_model).double())
    views, plain = torch.rand(3, 6, 3, 16, 16).double(), torch.rand(3, 3, 16, 16).double()
    names = [n for n, _ in model.named_parameters()]
    source = copy.deepcopy(model.state_dict())
    logits, loss = episodic_step_predict(model, names, views, plain, view_marginal_entropy, spec, steps)
    assert all(torch.equal(v, source[k]) for k, v in model.state_dict().items())  # the model is not changed
    for i in range(3):
        ref = AlphaStats(0.1)(copy.deepcopy(tiny_bn_model).double())
        opt = spec.build(list(ref.parameters()))
        for t in range(steps):
            value = view_marginal_entropy(ref(views[i]))
            if t == 0:
                assert torch.allclose(loss[i], value.detach())
            opt.zero_grad()
            value.backward()
            opt.step()
        with torch.no_grad():
            assert torch.allclose(logits[i], ref(plain[i:i + 1])[0], atol=1e-10)
    with pytest.raises(ConfigError):
        episodic_step_predict(model, names, views, plain, view_marginal_entropy, spec, 0)


def test_registration():
    assert tta.methods.info("ttaug").cost == Cost(nograd=33, params="none")
    assert tta.methods.info("memo").cost == Cost(grad=32, backward=1, nograd=1, params="all", per_image=True)
    with pytest.raises(ConfigError):
        tta.wrap(nn.Sequential(nn.Conv2d(3, 2, 1)), "ttaug")  # no BN layer to mix
    with pytest.raises(ConfigError):
        tta.wrap(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2)), "memo", chunk=0)
    with pytest.raises(ConfigError):
        GroupedAlphaStats()(AlphaStats()(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))))
    with pytest.raises(ConfigError):
        GroupedAlphaStats(alpha=1.5)


# ------------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def batches(cifar_test):
    x, y = cifar_test
    x = x[:24].float() / 255
    noise = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    return [noise[:8], noise[8:16], x[16:24]], y[:24]


@pytest.fixture(scope="module")
def resnet(data_dir):
    return tta.models.load("cifar_resnet20", data_dir=data_dir)


def make(resnet, name, **kw):
    kw = {"views": 6, "chunk": 3, **kw}
    return tta.wrap(copy.deepcopy(resnet), name, **kw)


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["ttaug", "memo"])
def test_runs_resets_and_is_seeded(name, resnet, batches):
    xs, _ = batches
    adapter = make(resnet, name)
    source = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    outs = [adapter(x) for x in xs]
    assert all(o.shape == (8, 10) and torch.isfinite(o).all() for o in outs)
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())  # weights never move
    assert not torch.allclose(outs[0], make(resnet, name, seed=1)(xs[0]))  # the views are random
    adapter.reset()
    assert torch.equal(adapter(xs[0]), outs[0]) and torch.equal(adapter(xs[1]), outs[1])
    other = make(resnet, name)
    assert all(torch.equal(other(x), o) for x, o in zip(xs, outs))
    small = adapter(xs[2][:3])  # any batch size, including a single image
    assert small.shape == (3, 10) and adapter(xs[2][:1]).shape == (1, 10)
    if name == "memo":
        assert adapter.counters["steps"] == 8 * 5 + 3 + 1 and adapter.last["selected"] == 1  # reset keeps counters


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["ttaug", "memo"])
def test_each_image_depends_only_on_itself_and_its_draws(name, resnet, batches):
    xs, _ = batches
    a = make(resnet, name)(xs[0][:4])
    swapped = torch.cat([xs[0][:2], xs[1][:2]])  # same positions, same draws: images 0-1 unchanged
    b = make(resnet, name, chunk=4)(swapped)  # another chunking: the draws are made for the whole batch
    assert torch.allclose(a[:2], b[:2], atol=1e-4)
    assert not torch.allclose(a[2:], b[2:], atol=1e-2)


@pytest.mark.realdata
def test_ttaug_equals_the_reference_at_batch_size_one(resnet, batches):
    x = batches[0][0]
    out = make(resnet, "ttaug", seed=5)(x)
    alone = AlphaStats(0.1)(copy.deepcopy(resnet))
    _, plain, views = next(view_chunks(x, 6, torch.Generator().manual_seed(5), len(x)))
    with torch.no_grad():
        ref = torch.stack([alone(torch.cat([plain[i:i + 1], views[i]])).mean(0) for i in range(len(x))])
    assert torch.allclose(out, ref, atol=1e-4)


@pytest.mark.realdata
def test_memo_equals_the_reference_at_batch_size_one(resnet, batches):
    x = batches[0][0][:4]
    adapter = make(resnet, "memo", seed=5)
    out = adapter(x)
    _, plain, views = next(view_chunks(x, 6, torch.Generator().manual_seed(5), len(x)))
    refs, losses = [], []
    for i in range(len(x)):  # the reference: restore, one SGD-Nesterov step on one image's views, predict
        ref = AlphaStats(0.1)(copy.deepcopy(resnet))
        opt = torch.optim.SGD(ref.parameters(), lr=0.005, momentum=0.9, nesterov=True)
        loss = view_marginal_entropy(ref(views[i]))
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        with torch.no_grad():
            refs.append(ref(plain[i:i + 1])[0])
    assert torch.allclose(out, torch.stack(refs), atol=2e-3)
    assert adapter.last["loss"] == pytest.approx(sum(losses) / 4, rel=1e-4)
    with torch.no_grad():
        unadapted = torch.stack([AlphaStats(0.1)(copy.deepcopy(resnet))(p[None])[0] for p in plain])
    assert (out - unadapted).abs().max() > 0.05  # the step matters
