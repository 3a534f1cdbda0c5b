"""SAM step, Fisher anchor and reset policies against METHODS.md 3.3/3.4 on a tiny model, by hand."""
import torch
import torch.nn.functional as F
from torch import nn

from tta.adapter import Adapter, Recipe
from tta.parts.filters import EntropyMargin
from tta.parts.norm import BatchStats
from tta.parts.objectives import Entropy
from tta.parts.optim import OptimizerSpec
from tta.parts.params import NormAffine
from tta.parts.regularisers import FisherAnchor
from tta.parts.resets import LossEMABelow, Periodic
from tta.parts.steps import SAM


class Tiny(nn.Module):
    """Linear -> BN (batch statistics) -> Linear: the BN affine is what adapts."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.bn, self.fc2 = nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Linear(6, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_()
            self.bn.weight.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x.flatten(1)))))


def images(n, seed=1):
    return torch.rand(n, 3, 2, 2, generator=torch.Generator().manual_seed(seed))


def sar_adapter(frac=0.9, rho=0.05, lr=0.1, resets=(), extra_filters=()):
    recipe = Recipe(norm=BatchStats(), params=NormAffine(), objective=Entropy(),
                    filters=[EntropyMargin(frac), *extra_filters],
                    step=SAM(rho), resets=resets, optimizer=OptimizerSpec("sgd", lr=lr, momentum=0.0))
    return Adapter(Tiny(), recipe)


def selected_mean_entropy(logits, within, e0):
    e = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
    keep = within & (e.detach() < e0)
    return e[keep].mean(), keep


# ---------------------------------------------------------------------------------------------- SAM
def test_sam_step_by_hand():
    x, e0 = images(16), 0.9 * torch.log(torch.tensor(4.0))
    adapter = sar_adapter()
    w, b = (p.detach().clone() for p in adapter.params)

    def logits_at(weight, bias):
        h = F.batch_norm(adapter.model.fc1(x.flatten(1)), None, None, weight, bias, True, 0.0, 1e-5)
        return adapter.model.fc2(torch.relu(h))

    w1, b1 = w.clone().requires_grad_(), b.clone().requires_grad_()
    l1, s1 = selected_mean_entropy(logits_at(w1, b1), torch.ones(16, dtype=torch.bool), e0)
    gw, gb = torch.autograd.grad(l1, (w1, b1))
    norm = torch.sqrt(gw.pow(2).sum() + gb.pow(2).sum())
    w2 = (w + 0.05 * gw / (norm + 1e-12)).requires_grad_()
    b2 = (b + 0.05 * gb / (norm + 1e-12)).requires_grad_()
    l2, s2 = selected_mean_entropy(logits_at(w2, b2), s1, e0)
    gw2, gb2 = torch.autograd.grad(l2, (w2, b2))
    assert 0 < int(s2.sum()) < 16  # the filters act in both passes

    adapter(x)
    assert torch.allclose(adapter.params[0], w - 0.1 * gw2, atol=1e-6)  # theta restored, then stepped with g'
    assert torch.allclose(adapter.params[1], b - 0.1 * gb2, atol=1e-6)
    assert abs(adapter.last["loss"] - float(l2.detach())) < 1e-6
    assert adapter.counters["backward"] == 2 and adapter.counters["steps"] == 1
    assert all(p.grad is None for p in adapter.params)


def test_sam_with_nothing_selected_takes_no_step_and_leaves_the_optimizer_untouched():
    adapter = sar_adapter(frac=1e-6)
    before = [p.detach().clone() for p in adapter.params]
    adapter(images(8))
    assert adapter.last["stepped"] is False and adapter.counters["backward"] == 0
    assert all(torch.equal(p, q) for p, q in zip(adapter.params, before))
    assert adapter.optimizer.state_dict()["state"] == {}


def test_sam_restores_theta_exactly_when_the_second_pass_selects_nothing():
    def first_pass_only(batch, mask):  # SAM's second pass does not update state: S2 is empty
        return mask if batch.update_state else torch.zeros_like(mask)

    adapter = sar_adapter(extra_filters=[first_pass_only])
    before = [p.detach().clone() for p in adapter.params]
    adapter(images(16))
    assert adapter.counters["backward"] == 1 and adapter.counters["steps"] == 0
    assert all(torch.equal(p, q) for p, q in zip(adapter.params, before))
    assert all(p.grad is None for p in adapter.params)


# -------------------------------------------------------------------------------------- Fisher anchor
def test_fisher_anchor_by_hand_and_leaves_nothing_behind():
    data = images(10, seed=3)
    anchor = FisherAnchor(data, alpha=2.0, n=10, batch_size=4)
    model = Tiny()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe(norm=BatchStats(), params=NormAffine(), objective=Entropy(), regularisers=[anchor])
    adapter = Adapter(model, recipe)

    expected = [torch.zeros_like(p) for p in adapter.params]
    for chunk in (data[:4], data[4:8], data[8:]):  # batches of 4, 4, 2
        logits = adapter.model(chunk)
        loss = F.cross_entropy(logits, logits.argmax(1))
        for e, g in zip(expected, torch.autograd.grad(loss, adapter.params)):
            e += g ** 2
    for f, e in zip(anchor.fisher, expected):
        assert torch.allclose(f, e / 3, rtol=1e-5, atol=1e-10)
    assert all(f.abs().sum() > 0 for f in anchor.fisher)

    assert all(p.grad is None for p in adapter.params)
    assert all(torch.equal(v, state[k]) for k, v in adapter.model.state_dict().items())
    assert float(anchor(adapter).detach()) == 0.0
    with torch.no_grad():
        adapter.params[0].add_(0.5)
    value = 2.0 * sum((f * (p - a) ** 2).sum() for f, p, a in zip(anchor.fisher, adapter.params, anchor.anchor))
    assert torch.allclose(anchor(adapter), value) and float(value.detach()) > 0
    assert torch.allclose(anchor(adapter), 2.0 * (anchor.fisher[0] * 0.25).sum())


def test_fisher_anchor_uses_a_seeded_subset_of_n():
    data = images(30, seed=4)
    a, b = FisherAnchor(data, 1.0, n=8, batch_size=8, seed=5), FisherAnchor(data, 1.0, n=8, batch_size=8, seed=5)
    recipe = lambda anchor: Recipe(norm=BatchStats(), params=NormAffine(), objective=Entropy(), regularisers=[anchor])
    Adapter(Tiny(), recipe(a)), Adapter(Tiny(), recipe(b))
    assert all(torch.equal(x, y) for x, y in zip(a.fisher, b.fisher))


# ------------------------------------------------------------------------------------------- resets
def test_loss_ema_below_triggers_and_clears():
    policy = LossEMABelow(0.2)
    assert policy(None, 0.5) is False and policy._ema == 0.5
    assert policy(None, None) is False and policy._ema == 0.5  # no step: unchanged
    assert policy(None, float("nan")) is False and policy._ema == 0.5
    policy(None, 0.0)
    assert abs(policy._ema - 0.45) < 1e-12
    values = [0.0] * 8
    fired = [policy(None, v) for v in values]
    assert fired.index(True) == 7  # 0.45 * 0.9^k < 0.2 first at k = 8
    policy.reset()
    assert policy._ema is None


def test_loss_ema_reset_in_the_loop_restores_source_bit_exactly():
    adapter = sar_adapter(resets=[LossEMABelow(threshold=10.0)])  # fires after the first step
    source = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    adapter(images(16))
    assert adapter.counters["resets"] == 1 and adapter.counters["steps"] == 1
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    assert adapter.recipe.resets[0]._ema is None


def test_periodic_resets_every_n_batches():
    policy = Periodic(3)
    assert [policy(None, None) for _ in range(3)] == [False, False, True]
    policy.reset()
    assert [policy(None, 1.0) for _ in range(3)] == [False, False, True]
