"""ROID and CMF (METHODS-ZOO Z.8, Z.9): their parts against the formulas on hand-made tensors (weights,
soft likelihood ratio, consistency, prior correction, source ensembling, the momentum filter), the
recipes' loss and output against a direct computation, and both methods end to end on real data."""
import copy
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tta
from tta.adapter import Batch
from tta.errors import ConfigError
from tta.parts.augment import augment_ct
from tta.parts.diversity import (DiversityWeight, PriorCorrection, SoftLikelihoodRatio, WeightedConsistency,
                                 diversity_weights, minmax, prior_correction, soft_likelihood_ratio)
from tta.parts.ensembling import MomentumFilter, SourceEnsembling


# ------------------------------------------------------------------------------------ direct formulas
def weights_by_hand(probs, prior, temperature):
    """ROID's weights sample by sample in plain Python (Z.8 step 2)."""
    rows = probs.tolist()
    pi = prior.tolist()
    norm_pi = math.sqrt(sum(v * v for v in pi))
    d = [1 - sum(a * b for a, b in zip(pi, p)) / (norm_pi * math.sqrt(sum(v * v for v in p))) for p in rows]
    c = [sum(v * math.log(v) for v in p if v > 0) for p in rows]  # -H(p)

    def scale(v):
        lo, hi = min(v), max(v)
        return [(x - lo) / (hi - lo) if hi > lo else 0.0 for x in v]
    d, c = scale(d), scale(c)
    mean = sum(d) / len(d)
    keep = [x >= mean for x in d]
    return [math.exp(a * b / temperature) if k else 0.0 for a, b, k in zip(d, c, keep)], keep


def fake_batch(logits, x=None, adapter=None, update_state=True):
    adapter = adapter or SimpleNamespace()
    adapter.counters = Counter()
    x = torch.zeros(len(logits), 3, 4, 4) if x is None else x
    return Batch(x, logits, adapter, update_state)


# ------------------------------------------------------------------------------------ diversity parts
def test_minmax_scales_to_unit_range_and_maps_a_constant_vector_to_zeros():
    v, const = minmax(torch.tensor([2.0, 4.0, 3.0]))
    assert torch.allclose(v, torch.tensor([0.0, 1.0, 0.5])) and not const
    v, const = minmax(torch.full((4,), 0.7))
    assert torch.equal(v, torch.zeros(4)) and const


def test_diversity_weights_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(12, 5, generator=g)
    prior = torch.tensor([0.4, 0.1, 0.2, 0.2, 0.1])
    w, keep, const = diversity_weights(logits, prior, 1 / 3)
    w_hand, keep_hand = weights_by_hand(logits.softmax(1), prior, 1 / 3)
    assert keep.tolist() == keep_hand and const == (False, False)
    assert 0 < int(keep.sum()) < 12
    assert torch.allclose(w, torch.tensor(w_hand), rtol=1e-5)
    assert bool((w[~keep] == 0).all()) and bool((w[keep] >= 1).all())
    assert float(w.max()) <= math.exp(3) + 1e-4  # d, c in [0, 1]: w <= exp(1 / T)


def test_diversity_weights_small_example():
    """Two classes, uniform prior: the most confident sample is the most diverse and gets exp(3)."""
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]])
    w, keep, _ = diversity_weights(probs.log(), torch.tensor([0.5, 0.5]), 1 / 3)
    # d = 1 - cos: 0, 1 - 1/sqrt(2 * 0.82), 1 - 1/sqrt(2 * 0.68) -> scaled 0, 1, x < mean: sample 0 dropped
    d2 = (1 - 1 / math.sqrt(2 * 0.68)) / (1 - 1 / math.sqrt(2 * 0.82))
    h = [-(a * math.log(a) + b * math.log(b)) for a, b in probs.tolist()]
    c2 = (h[0] - h[2]) / (h[0] - h[1])
    assert keep.tolist() == [False, True, True]
    assert torch.allclose(w, torch.tensor([0.0, math.exp(3.0), math.exp(3 * d2 * c2)]), rtol=1e-5)


def test_constant_diversity_or_certainty_is_guarded_and_counted():
    """All samples alike: the reference's 0/0 gives NaN; here every sample is kept with weight 1."""
    part = DiversityWeight()
    batch = fake_batch(torch.tensor([[1.0, 0.0, 2.0]]).repeat(4, 1))
    w = part(batch)
    assert torch.equal(w, torch.ones(4)) and bool(batch.extras["roid_keep"].all())
    c = batch.adapter.counters
    assert c["constant_diversity"] == 1 and c["constant_certainty"] == 1 and c["kept"] == 4
    # same certainty, different diversity (a permutation of one distribution): only certainty is constant
    batch = fake_batch(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    w = part(batch)
    assert torch.isfinite(w).all() and batch.adapter.counters["constant_certainty"] == 1
    assert batch.adapter.counters["constant_diversity"] == 0
    assert torch.equal(w, batch.extras["roid_keep"].float())  # exp(d * 0) = 1 for the kept


def test_class_prior_ema_over_all_samples_and_reset_to_uniform():
    part = DiversityWeight(momentum=0.9)
    logits = torch.tensor([[4.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 0.0], [2.0, 2.0, -1.0]])
    part(fake_batch(logits))
    expected = 0.9 * torch.full((3,), 1 / 3) + 0.1 * logits.softmax(1).mean(0)
    assert torch.allclose(part._prior, expected)
    part(fake_batch(logits, update_state=False))  # a re-evaluation leaves the prior alone
    assert torch.allclose(part._prior, expected)
    # the second batch's weights use the updated prior
    w, _, _ = diversity_weights(logits, expected, 1 / 3)
    assert torch.equal(part(fake_batch(logits)), w)
    part.reset()
    batch = fake_batch(logits)
    assert torch.equal(part(batch), diversity_weights(logits, torch.full((3,), 1 / 3), 1 / 3)[0])


def test_soft_likelihood_ratio_by_hand_including_the_clip():
    p = [0.5, 0.3, 0.2]
    by_hand = -sum(v * math.log(v / (1 - v) + 1e-5) for v in p)
    assert soft_likelihood_ratio(torch.tensor([p]).log()).item() == pytest.approx(by_hand, rel=1e-5)
    q = [0.995, 0.005]  # clipped to 0.99 before the ratio
    clipped = -(0.99 * math.log(0.99 / 0.01 + 1e-5) + 0.005 * math.log(0.005 / 0.995 + 1e-5))
    assert soft_likelihood_ratio(torch.tensor([q]).log()).item() == pytest.approx(clipped, rel=1e-5)
    z = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    SoftLikelihoodRatio()(fake_batch(z)).sum().backward()
    assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="clip"):
        SoftLikelihoodRatio(clip=1.0)


def test_prior_correction_scales_logits_by_the_smoothed_prior():
    logits = torch.tensor([[2.0, -1.0, 0.5], [1.0, 1.0, -3.0]])
    p = logits.softmax(1).mean(0).tolist()
    s = max(1 / 2, 1 / 3) / max(p)
    pi = [(v + s) / (1 + 3 * s) for v in p]
    expected = torch.tensor([[2.0 * pi[0], -1.0 * pi[1], 0.5 * pi[2]], [pi[0], pi[1], -3.0 * pi[2]]])
    assert torch.allclose(prior_correction(logits), expected)
    out = SimpleNamespace(logits=logits.clone().requires_grad_())
    corrected = PriorCorrection()(None, out)
    assert torch.allclose(corrected, expected) and not corrected.requires_grad


def test_weighted_consistency_is_weighted_sce_on_one_lite_view_of_the_kept(tiny_bn_model):
    model = tta.parts.norm.BatchStats()(copy.deepcopy(tiny_bn_model))
    x = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    adapter = SimpleNamespace(model=model, generator=torch.Generator().manual_seed(5))
    logits = model(x)
    batch = fake_batch(logits, x, adapter)
    w = DiversityWeight()(batch)
    keep = batch.extras["roid_keep"]
    term = WeightedConsistency()(batch)
    # direct: the same draw, the kept subset's own batch statistics
    z_a = model(augment_ct(x[keep], torch.Generator().manual_seed(5), lite=True))
    z_k = logits[keep]
    sce = -0.5 * (z_k.softmax(1) * z_a.log_softmax(1)).sum(1) - 0.5 * (z_a.softmax(1) * z_k.log_softmax(1)).sum(1)
    assert torch.allclose(term, (sce * w[keep]).sum() / 6, rtol=1e-5)
    grads = torch.autograd.grad(term, [logits, model[1].weight])
    assert all(g.abs().sum() > 0 for g in grads)  # both the clean logits and the augmented forward


def test_weighted_consistency_needs_the_weight_part():
    with pytest.raises(ConfigError, match="DiversityWeight"):
        WeightedConsistency()(fake_batch(torch.zeros(2, 3)))


# ------------------------------------------------------------------------------------ ensembling parts
def test_source_ensembling_is_an_ema_towards_the_bind_time_values():
    p = [nn.Parameter(torch.tensor([1.0, 2.0])), nn.Parameter(torch.tensor([[0.0], [4.0]]))]
    adapter = SimpleNamespace(params=p)
    part = SourceEnsembling(0.75)
    part.bind(adapter)
    with torch.no_grad():
        p[0].copy_(torch.tensor([3.0, -2.0]))
        p[1].copy_(torch.tensor([[8.0], [0.0]]))
    part(adapter)
    assert torch.allclose(p[0], torch.tensor([0.75 * 3 + 0.25 * 1, 0.75 * -2 + 0.25 * 2]))
    assert torch.allclose(p[1], torch.tensor([[6.0], [1.0]]))
    with pytest.raises(ConfigError, match="momentum_src"):
        SourceEnsembling(1.5)


def gains_by_hand(q, alpha, n):
    """CMF's gain sequence written out from Z.9 step 2."""
    P, out = 0.0, []
    for _ in range(n):
        pm = alpha ** 2 * P + q
        beta = (1 - q) / (pm + 1 - q)
        if beta <= 0.89:
            beta = 0.89
        if beta >= 0.9999:
            beta = 1.0
        P = beta * pm
        out.append(beta)
    return out, P


def test_momentum_filter_gain_recursion_clamps_and_q_scaling():
    adapter = SimpleNamespace(params=[nn.Parameter(torch.zeros(1376))])  # ResNet-20's BN affine count
    f = MomentumFilter(alpha=0.99, gamma=0.99, q=0.005)
    f.bind(adapter)
    assert f.process_noise == pytest.approx(0.005 * 1376 / 38400)
    betas, P = gains_by_hand(0.005 * 1376 / 38400, 0.99, 300)
    got = [f.gain() for _ in range(300)]
    assert got == pytest.approx(betas, rel=1e-12) and f.variance == pytest.approx(P, rel=1e-12)
    assert got[0] == pytest.approx(0.99982, abs=1e-5) and got[-1] == pytest.approx(0.99328, abs=1e-5)  # Z.9
    small = MomentumFilter()  # 48 values: beta = 1 - 6.25e-6 >= 0.9999 -> 1
    small.bind(SimpleNamespace(params=[nn.Parameter(torch.zeros(48))]))
    assert small.gain() == 1.0
    big = MomentumFilter(q=40.0)  # q ~ 0.5 for 38,400/80 values: beta < 0.89 -> 0.89
    big.bind(SimpleNamespace(params=[nn.Parameter(torch.zeros(480))]))
    assert big.gain() == 0.89
    for bad in (dict(alpha=1.1), dict(gamma=-0.1), dict(q=0.0)):
        with pytest.raises(ConfigError):
            MomentumFilter(**bad)


def test_momentum_filter_moves_hidden_and_model_as_the_three_step_filter_and_resets():
    src = torch.tensor([1.0, -1.0, 0.5])
    p = nn.Parameter(src.clone())
    adapter = SimpleNamespace(params=[p])
    f = MomentumFilter(alpha=0.9, gamma=0.8, q=0.1 * 38400 / 3)  # 3 values: q = 0.1, beta below 0.9999
    f.bind(adapter)
    hidden, P = src.clone(), 0.0
    for step in range(3):
        with torch.no_grad():
            p.add_(torch.tensor([0.3, 0.1, -0.2]))  # the optimizer's move
        theta = p.detach().clone()
        f(adapter)
        pm = 0.81 * P + 0.1
        beta = min(max(0.9 / (pm + 0.9), 0.89), 1.0)
        P = beta * pm
        hidden = 0.9 * hidden + 0.1 * src
        hidden = beta * hidden + (1 - beta) * theta
        assert f.last_beta == pytest.approx(beta)
        assert torch.allclose(f._hidden[0], hidden, atol=1e-6)
        assert torch.allclose(p, 0.8 * theta + 0.2 * hidden, atol=1e-6)
    f.reset()
    assert torch.equal(f._hidden[0], src) and f.variance == 0.0  # the reference keeps P; we reset it


# ------------------------------------------------------------------------------------ the recipes
def test_roid_loss_and_output_match_a_direct_computation(tiny_bn_model):
    a = tta.wrap(tiny_bn_model, "roid")
    x = torch.rand(10, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(a.model)
    state = a.generator.get_state()
    out = a.compute_loss(x, update_state=False)
    z = model(x)
    w_hand, keep = weights_by_hand(z.detach().softmax(1), torch.full((10,), 0.1), 1 / 3)
    w, keep = torch.tensor(w_hand), torch.tensor(keep)
    slr = soft_likelihood_ratio(z)
    z_a = model(augment_ct(x[keep], torch.Generator().set_state(state), lite=True))
    sce = 0.5 * (-(z[keep].softmax(1) * z_a.log_softmax(1)).sum(1)) + \
        0.5 * (-(z_a.softmax(1) * z[keep].log_softmax(1)).sum(1))
    expected = (slr * w).sum() / 10 + (sce * w[keep]).sum() / 10
    assert torch.allclose(out.loss, expected, rtol=1e-5)
    # the prediction: the pre-update logits times the smoothed prior
    a.generator.set_state(state)
    assert torch.allclose(a(x), prior_correction(z.detach()), atol=1e-6)


def test_roid_step_then_source_ensembling_and_cmf_first_step(tiny_bn_model):
    """One step with ensembling = the same step without it, then 0.99 theta + 0.01 theta_src. CMF's first
    gain is 1 on a small model, so its first step equals ROID's with momentum_src = gamma."""
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    plain = tta.wrap(copy.deepcopy(tiny_bn_model), "roid", momentum_src=1.0)
    ens = tta.wrap(copy.deepcopy(tiny_bn_model), "roid")
    cmf = tta.wrap(copy.deepcopy(tiny_bn_model), "cmf", gamma=0.99)
    src = [p.detach().clone() for p in ens.params]
    for a in (plain, ens, cmf):
        a(x)
    for p0, p1, p2, s in zip(plain.params, ens.params, cmf.params, src):
        assert not torch.equal(p0, s)
        assert torch.allclose(p1, 0.99 * p0 + 0.01 * s, atol=1e-7)
        assert torch.allclose(p2, p1, atol=1e-7)
    f = cmf.recipe.after_step[0]
    assert f.last_beta == 1.0
    cmf(x)
    assert f.variance == pytest.approx(gains_by_hand(0.005 * sum(p.numel() for p in cmf.params) / 38400, 0.99, 2)[1])


def test_switches_and_bad_options(tiny_bn_model):
    a = tta.wrap(copy.deepcopy(tiny_bn_model), "roid", consistency=False, prior_correction=False)
    assert a.recipe.batch_terms == [] and a.recipe.output is None
    x = torch.rand(6, 3, 16, 16)
    logits = a(x)
    assert logits.shape == (6, 10) and a.counters["steps"] == 1
    with pytest.raises(ConfigError, match="temperature"):
        tta.wrap(copy.deepcopy(tiny_bn_model), "roid", temperature=0.0)
    with pytest.raises(ConfigError, match="type"):
        tta.wrap(copy.deepcopy(tiny_bn_model), "cmf", type="op")
    assert tta.methods.info("roid").cost == tta.methods.info("cmf").cost == tta.methods.Cost(1.7, 1, 0)


# ------------------------------------------------------------------------------------ real data
@pytest.fixture(scope="module")
def batches(dev_domains):
    """The dev stream's last two shifts (REFERENCE.md: blur, dark) on 128 test images, batches of 64."""
    return [*dev_domains["blur"][:128].split(64), *dev_domains["dark"][:128].split(64)]


def part_state(adapter):
    """Every piece of state the parts keep, cloned."""
    weight, after = adapter.recipe.weight, adapter.recipe.after_step[0]
    state = {"prior": None if weight._prior is None else weight._prior.clone()}
    if isinstance(after, MomentumFilter):
        state.update(hidden=[t.clone() for t in after._hidden], variance=after.variance)
    return state


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["roid", "cmf"])
def test_method_on_real_data_resets_bit_exactly_and_is_seeded(name, batches, data_dir):
    def make():
        return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), name)
    adapter = make()
    source = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    fresh = part_state(adapter)
    runs = []
    for x in batches:
        logits = adapter(x)
        assert logits.shape == (64, 10) and torch.isfinite(logits).all()
        runs.append((logits, dict(adapter.last)))
    c = adapter.counters
    assert c["steps"] == 4 and c["nonfinite"] == 0 and 4 * 16 < c["kept"] < 4 * 64
    assert c["constant_diversity"] == 0
    assert any(not torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    assert part_state(adapter)["prior"] is not None

    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    after = part_state(adapter)
    assert after["prior"] is None
    if name == "cmf":
        assert after["variance"] == 0.0 and all(torch.equal(h, s) for h, s in zip(after["hidden"], fresh["hidden"]))
    assert adapter.optimizer.state_dict()["state"] == {}
    for x, (logits, last) in zip(batches, runs):
        assert torch.equal(adapter(x), logits) and adapter.last == last

    twin = make()  # same seed, fresh adapter: identical predictions
    assert torch.equal(twin(batches[0]), runs[0][0])


@pytest.mark.realdata
@pytest.mark.parametrize("name", ["roid", "cmf"])
def test_smaller_batches_and_mid_stream_reset(name, batches, data_dir):
    adapter = tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), name)
    for size in (64, 16, 3, 2):
        logits = adapter(batches[0][:size])
        assert logits.shape == (size, 10) and torch.isfinite(logits).all()
        assert adapter.last["stepped"]
    adapter.reset()  # as reset_each_shift does between domains
    assert torch.isfinite(adapter(batches[2][:16])).all()
