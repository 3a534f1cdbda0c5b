"""BN-EMA, LAME and RPL (METHODS-ZOO Z.1, Z.5, Z.4): the Laplacian post-processor and the generalised
cross-entropy against their formulas on hand-made tensors, BN-EMA's two passes against a direct
implementation, then the three methods end to end on cifar_resnet20 and real shifted CIFAR-10 batches."""
import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tta import config
from tta.errors import ConfigError, InputError
from tta.methods import COMMON_KEYS, method_options
from tta.parts import laplacian as L
from tta.parts.pseudo_label import GeneralizedCrossEntropy, generalized_cross_entropy, hard_pseudo_labels

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
METHODS = ("norm_ema", "lame", "rpl")


# ------------------------------------------------------------------------------ LAME's affinities
def _circle(*degrees):
    a = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([a.cos(), a.sin()], 1)


def test_rbf_scale_counts_the_self_distance():
    f = _circle(0, 90, 180)  # distances: sqrt2 (neighbours), 2 (opposite)
    w = L.rbf_affinity(f, knn=2)  # 2nd smallest per row, self included: sqrt2 in every row -> s = sqrt2
    s2 = 2.0
    expected = torch.tensor([[1, math.exp(-2 / (2 * s2)), math.exp(-4 / (2 * s2))],
                             [math.exp(-2 / (2 * s2)), 1, math.exp(-2 / (2 * s2))],
                             [math.exp(-4 / (2 * s2)), math.exp(-2 / (2 * s2)), 1]])
    torch.testing.assert_close(w, expected)
    s = (2 + math.sqrt(2) + 2) / 3  # knn 3: the 3rd smallest is 2, sqrt2, 2
    torch.testing.assert_close(L.rbf_affinity(f, knn=3)[0, 2], torch.tensor(math.exp(-4 / (2 * s * s))))
    torch.testing.assert_close(L.rbf_affinity(f, knn=99), L.rbf_affinity(f, knn=3))  # k = min(knn, B)


def test_rbf_of_one_sample_or_identical_features_is_finite():
    assert torch.equal(L.rbf_affinity(_circle(30), knn=5), torch.ones(1, 1))
    assert torch.equal(L.rbf_affinity(_circle(30, 30, 120), knn=2)[:2, :2], torch.ones(2, 2))


def test_knn_affinity_marks_nearest_others_only():
    f = torch.tensor([[0.0], [1.0], [3.0], [7.0]])
    w = L.knn_affinity(f, knn=1)
    assert torch.equal(w, torch.tensor([[0.0, 1, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0]]))  # not symmetric
    w2 = L.knn_affinity(f, knn=2)
    assert torch.equal(w2.sum(1), torch.full((4,), 2.0)) and torch.equal(w2.diagonal(), torch.zeros(4))
    assert torch.equal(L.knn_affinity(f, knn=10), 1 - torch.eye(4))  # at most B - 1 others
    dup = torch.tensor([[0.0], [0.0], [5.0]])  # an exact duplicate is a neighbour, the sample itself never
    assert torch.equal(L.knn_affinity(dup, knn=1)[:2], torch.tensor([[0.0, 1, 0], [1, 0, 0]]))


def test_kernel_normalises_features_and_symmetrises():
    f = torch.tensor([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0]])
    lin = L.LaplacianAdjust("linear").kernel(f)
    torch.testing.assert_close(lin, torch.tensor([[1, 0.8, 0.6], [0.8, 1, 0], [0.6, 0, 1]]))
    knn = L.LaplacianAdjust("kNN", knn=1)  # the reference's spelling is accepted
    w = knn.kernel(f)
    sym = L.LaplacianAdjust("knn", knn=1, force_symmetry=True).kernel(f)
    torch.testing.assert_close(sym, 0.5 * (w + w.T))
    assert not torch.equal(w, w.T)


# ---------------------------------------------------------------------- LAME's bound optimisation
def _direct_lame(unary, kernel, max_iter=100):
    """The Z.5 loop written out: all iterates and energies, and the index where the rule stops."""
    y, ys, energies = (-unary).softmax(1), [], []
    for t in range(max_iter):
        p = kernel @ y
        y = (-unary + p).softmax(1)
        energies.append(float((unary * y - p * y + y * torch.log(y.clamp_min(1e-20))).sum()))
        ys.append(y)
        if t > 1 and abs(energies[t] - energies[t - 1]) <= 1e-8 * abs(energies[t - 1]):
            return ys, energies, t
    return ys, energies, max_iter - 1


def test_energy_by_hand():
    y = torch.tensor([[0.5, 0.5]])
    a = torch.tensor([[1.0, 2.0]])
    p = torch.tensor([[0.2, 0.0]])
    by_hand = 0.5 * 1 + 0.5 * 2 - 0.5 * 0.2 + 2 * 0.5 * math.log(0.5)
    assert float(L.laplacian_energy(y, a, p)) == pytest.approx(by_hand, rel=1e-6)


def test_bound_optimisation_matches_the_direct_loop_and_its_stopping_index(monkeypatch):
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(12, 4, generator=g)
    feats = torch.randn(12, 6, generator=g)
    adjust = L.LaplacianAdjust()
    kernel = adjust.kernel(feats)
    unary = -torch.log(logits.softmax(1) + 1e-10)
    ys, energies, stop = _direct_lame(unary, kernel)
    calls = []
    real = L.laplacian_energy
    monkeypatch.setattr(L, "laplacian_energy", lambda *a: calls.append(1) or real(*a))
    y = adjust(feats, logits)
    assert len(calls) == stop + 1 and 2 < stop < 99
    torch.testing.assert_close(y, ys[stop], rtol=0, atol=1e-6)
    torch.testing.assert_close(y.sum(1), torch.ones(12))
    assert not torch.allclose(y, logits.softmax(1), atol=1e-3)  # the graph term moved the predictions
    # near the fixed point: Y = softmax(-a + W Y)
    torch.testing.assert_close(y, (kernel @ y - unary).softmax(1), rtol=0, atol=1e-4)
    calls.clear()
    one = L.LaplacianAdjust(max_iter=1)(feats, logits)
    assert len(calls) == 1
    torch.testing.assert_close(one, ys[0], rtol=0, atol=1e-6)


def test_bound_optimisation_runs_at_least_three_updates(monkeypatch):
    calls = []
    real = L.laplacian_energy
    monkeypatch.setattr(L, "laplacian_energy", lambda *a: calls.append(1) or real(*a))
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = L.LaplacianAdjust(lam=0.0)(torch.randn(2, 5), logits)  # no graph term: constant energy from the start
    assert len(calls) == 3
    torch.testing.assert_close(y, logits.softmax(1), rtol=0, atol=1e-6)


def test_laplacian_adjust_rejects_bad_options_and_inputs():
    for kw in (dict(affinity="cosine"), dict(knn=0), dict(knn=2.5), dict(max_iter=0), dict(tol=-1.0)):
        with pytest.raises(ConfigError):
            L.LaplacianAdjust(**kw)
    with pytest.raises(InputError, match="one feature row per logit row"):
        L.LaplacianAdjust()(torch.randn(3, 4), torch.randn(2, 10))


# ------------------------------------------------------------------------- generalised cross-entropy
def test_gce_by_hand_and_its_limits():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(4.0)]])  # p = (.75, .25), (.2, .8)
    labels = torch.tensor([0, 0])
    got = generalized_cross_entropy(logits.log_softmax(1), labels, 0.5)
    torch.testing.assert_close(got, torch.tensor([(1 - 0.75 ** 0.5) / 0.5, (1 - 0.2 ** 0.5) / 0.5]))
    torch.testing.assert_close(generalized_cross_entropy(logits.log_softmax(1), labels, 1.0),
                               torch.tensor([0.25, 0.8]))
    ce = torch.tensor([-math.log(0.75), -math.log(0.2)])
    torch.testing.assert_close(generalized_cross_entropy(logits.log_softmax(1), labels, 1e-6), ce, rtol=1e-5, atol=0)


def test_gce_part_uses_the_same_forward_hard_labels_and_its_gradient():
    z = torch.tensor([[1.0, 2.0, -0.5], [0.3, -1.0, 0.1]], requires_grad=True)
    batch = tta.adapter.Batch(torch.zeros(2, 3, 1, 1), z, adapter=None)
    assert torch.equal(hard_pseudo_labels(batch), torch.tensor([1, 0]))
    loss = GeneralizedCrossEntropy(0.8)(batch)
    p = z.detach().softmax(1)
    py = p[[0, 1], [1, 0]]
    torch.testing.assert_close(loss.detach(), (1 - py ** 0.8) / 0.8)
    loss.sum().backward()
    onehot = torch.tensor([[0.0, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(z.grad, -(py ** 0.8).unsqueeze(1) * (onehot - p))  # d/dz of -(p_y^q)/q
    other = GeneralizedCrossEntropy(0.8, labels=lambda b: torch.tensor([2, 2]))(batch).detach()
    torch.testing.assert_close(other, (1 - p[:, 2] ** 0.8) / 0.8)
    for q in (0.0, -0.1, 1.5):
        with pytest.raises(ConfigError):
            GeneralizedCrossEntropy(q)


# --------------------------------------------------------------------------------- BN-EMA passes
def test_norm_ema_is_train_pass_then_eval_pass(tiny_bn_model):
    direct = copy.deepcopy(tiny_bn_model)
    adapter = tta.wrap(tiny_bn_model, "norm_ema")
    g = torch.Generator().manual_seed(0)
    xs = [torch.rand(6, 3, 8, 8, generator=g) for _ in range(3)]
    bn0 = direct[1]
    mean0, var0 = bn0.running_mean.clone(), bn0.running_var.clone()
    with torch.no_grad():
        h = direct[0](xs[0])  # the first BN's input in pass 1
    for x in xs:
        out = adapter(x)
        direct.train()
        with torch.no_grad():
            direct(x)
            direct.eval()
            expected = direct(x)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        if x is xs[0]:  # r <- 0.9 r + 0.1 stat, unbiased variance
            bn = adapter.model[1]
            torch.testing.assert_close(bn.running_mean, 0.9 * mean0 + 0.1 * h.mean((0, 2, 3)))
            torch.testing.assert_close(bn.running_var, 0.9 * var0 + 0.1 * h.var((0, 2, 3), unbiased=True))
    assert adapter.optimizer is None and not any(p.requires_grad for p in adapter.model.parameters())


def test_norm_ema_toggles_only_norm_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(64, 2))
    adapter = tta.wrap(model.eval(), "norm_ema")
    x = torch.rand(4, 3, 6, 6)
    adapter(x)
    with torch.no_grad():
        h = model[0](x)  # dropout stayed off in the update pass
    torch.testing.assert_close(model[2].running_mean, 0.1 * h.mean((0, 2, 3)))
    assert not model[1].training and model[2].training  # BN keeps the configured (N-train) mode between batches


# ----------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("bench", ["cifar10c", "imagenetc"])
@pytest.mark.parametrize("name", METHODS)
def test_configs_load_and_name_only_known_options(bench, name):
    cfg = config.load(CONFIGS / bench / f"{name}.yaml")
    method = dict(cfg["method"])
    assert method.pop("name") == name and cfg["name"] == f"{bench}_{name}"
    assert set(method) <= set(method_options(name)) | set(COMMON_KEYS)
    if name == "rpl":
        assert method["q"] == 0.8
        expected = dict(optimizer="adam", lr=0.001) if bench == "cifar10c" else \
            dict(optimizer="sgd", lr=0.0005, momentum=0.9, nesterov=True)
        assert expected.items() <= method.items()


# ------------------------------------------------------------------------------ real data, end to end
@pytest.fixture(scope="module")
def batches(cifar_test):
    """Two CIFAR-10-C-style domains from the corruption engine (severity 5), two batches of 64 each."""
    from tta.data.corruptions import corrupt_dataset
    from tta.data.datasets import to_float
    x = cifar_test[0][:128]
    domains = [to_float(corrupt_dataset(x, name, 5, seed=0)) for name in ("gaussian_noise", "contrast")]
    return [b for d in domains for b in d.split(64)]


def make(name, data_dir, **kw):
    return tta.wrap(tta.models.load("cifar_resnet20", data_dir=data_dir), name, seed=1, **kw)


def state_of(adapter):
    return {k: v.clone() for k, v in adapter.model.state_dict().items()}


@pytest.mark.realdata
@pytest.mark.parametrize("name", METHODS)
def test_method_runs_resets_and_repeats_bit_exactly(name, batches, data_dir):
    adapter = make(name, data_dir)
    source = state_of(adapter)
    outs = []
    for x in batches:
        logits = adapter(x)
        assert logits.shape == (64, 10) and torch.isfinite(logits).all()
        outs.append(logits)
    moved = {k for k, v in adapter.model.state_dict().items() if not torch.equal(v, source[k])}
    if name == "lame":
        assert not moved
    elif name == "norm_ema":
        assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)
    else:
        assert moved and all(k.endswith((".weight", ".bias")) and ".bn" in k for k in moved)
        assert adapter.counters["steps"] == 4 and adapter.counters["backward"] == 4

    adapter.reset()
    assert all(torch.equal(v, source[k]) for k, v in adapter.model.state_dict().items())
    if adapter.optimizer is not None:
        assert adapter.optimizer.state_dict()["state"] == {}
    again = [adapter(x) for x in batches]
    fresh = make(name, data_dir)
    twin = [fresh(x) for x in batches]
    for a, b, c in zip(outs, again, twin):
        assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.realdata
@pytest.mark.parametrize("name", METHODS)
def test_method_takes_small_batches_and_mid_stream_resets(name, batches, data_dir):
    adapter = make(name, data_dir)
    full = make(name, data_dir)
    for size in (16, 5, 2):
        out = adapter(batches[0][:size])
        assert out.shape == (size, 10) and torch.isfinite(out).all()
    if name == "lame":  # no batch statistics: one image is a batch (its graph is its self-affinity)
        assert torch.isfinite(adapter(batches[0][:1])).all()
    else:
        with pytest.raises(InputError, match="batch of 1"):
            adapter(batches[0][:1])
    adapter.reset()  # reset_each_shift: back to the source in the middle of the stream
    assert torch.equal(adapter(batches[2]), full(batches[2]))


@pytest.mark.realdata
def test_lame_returns_log_of_the_smoothed_probabilities(batches, data_dir):
    adapter = make("lame", data_dir)
    x = batches[0]
    out = adapter(x)
    with torch.no_grad():
        features, logits = tta.models.split(adapter.model)[0].with_logits(x)
        assert features.shape == (64, 64)
        torch.testing.assert_close(logits, adapter.model(x))  # source statistics: eval mode
    y = L.LaplacianAdjust()(features, logits)
    torch.testing.assert_close(out.softmax(1), y, rtol=0, atol=1e-6)
    assert torch.equal(out.argmax(1), y.argmax(1))
    assert (y.argmax(1) != logits.argmax(1)).any()  # smoothing changed some predictions
    assert not torch.allclose(y, logits.softmax(1), atol=1e-3)


@pytest.mark.realdata
def test_rpl_loss_is_gce_of_its_own_arg_max(batches, data_dir):
    adapter = make("rpl", data_dir, q=0.5)
    out = adapter.compute_loss(batches[0], update_state=False)
    p = out.logits.detach().softmax(1)
    py = p.gather(1, p.argmax(1, keepdim=True)).squeeze(1)
    torch.testing.assert_close(out.loss.detach(), ((1 - py ** 0.5) / 0.5).mean())
    assert isinstance(adapter.optimizer, torch.optim.Adam) and len(adapter.params) == 38
