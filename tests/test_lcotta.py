"""LCoTTA's subspace projection: window rule, cached SVD, projection algebra, and the method recipe."""
from types import SimpleNamespace

import pytest
import torch

import tta
from tta.errors import ConfigError
from tta.parts.filters import EntropyMargin, Redundancy
from tta.parts.gradients import SubspaceProjection
from tta.parts.weights import EntropyWeight


def fake_adapter(shapes=((3, 4), (5,))):
    return SimpleNamespace(params=[torch.zeros(s, requires_grad=True) for s in shapes])


def step(proj, adapter, gen):
    """Give every parameter a fresh random gradient, run the transform; returns (raw, projected) flat."""
    for p in adapter.params:
        p.grad = torch.randn(p.shape, generator=gen)
    raw = torch.cat([p.grad.reshape(-1) for p in adapter.params])
    proj(adapter)
    return raw, torch.cat([p.grad.reshape(-1) for p in adapter.params])


def test_window_appends_at_multiples_of_every_and_is_fifo():
    proj, ad, gen = SubspaceProjection(k=2, every=3, window=2), fake_adapter(), torch.Generator().manual_seed(0)
    raws, sizes = [], []
    for _ in range(11):  # t = 0..10: appends at t = 3, 6, 9
        raws.append(step(proj, ad, gen)[0])
        sizes.append(len(proj.stored))
    assert sizes == [0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2]
    assert torch.equal(proj.stored[0], raws[6]) and torch.equal(proj.stored[1], raws[9])  # t=3 dropped


def test_plain_step_before_k_entries_then_projection():
    proj, ad, gen = SubspaceProjection(k=3, every=1, window=10), fake_adapter(), torch.Generator().manual_seed(1)
    for t in range(6):
        raw, out = step(proj, ad, gen)
        if t < 3:  # after this call the window holds t entries (appends from t=1)
            assert torch.equal(raw, out)
        else:
            assert not torch.allclose(raw, out)
    assert [p.grad.shape for p in ad.params] == [torch.Size([3, 4]), torch.Size([5])]


def test_projection_is_idempotent_orthogonal_and_spans_the_top_k_pca_directions():
    proj, ad, gen = SubspaceProjection(k=3, every=1, window=8), fake_adapter(), torch.Generator().manual_seed(2)
    for _ in range(9):
        step(proj, ad, gen)
    g = torch.randn(17, generator=gen)
    pg = proj.project(g)
    assert torch.allclose(proj.project(pg), pg, atol=1e-5)  # P(Pg) = Pg
    u = proj.basis()
    assert torch.allclose(u @ u.T, torch.eye(3), atol=1e-5)
    assert torch.allclose(u @ (g - pg), torch.zeros(3), atol=1e-5)  # nothing left along kept directions
    # the removed part is orthogonal to the projected one
    assert abs(float((g - pg) @ pg)) < 1e-4
    # same subspace as an independent PCA of the centred window (float64)
    w = torch.stack(proj.stored).double()
    _, _, vh = torch.linalg.svd(w - w.mean(0), full_matrices=False)
    ref = vh[:3].T @ vh[:3]
    assert torch.allclose((u.T @ u).double(), ref, atol=1e-4)


def test_svd_only_when_the_window_changes():
    proj, ad, gen = SubspaceProjection(k=2, every=4, window=3), fake_adapter(), torch.Generator().manual_seed(3)
    calls = []
    for _ in range(21):  # appends at 4, 8, 12, 16, 20; projection from t=8 on
        step(proj, ad, gen)
        calls.append(proj.svd_calls)
    assert calls[:8] == [0] * 8
    assert calls[8:12] == [1] * 4 and calls[12:16] == [2] * 4 and calls[16:20] == [3] * 4 and calls[20] == 4


def test_missing_gradients_count_as_zero_and_reset_clears():
    proj, gen = SubspaceProjection(k=1, every=1, window=4), torch.Generator().manual_seed(4)
    ad = fake_adapter()
    for _ in range(3):
        step(proj, ad, gen)
    ad.params[1].grad = None
    proj(ad)
    assert ad.params[1].grad is not None and ad.params[1].grad.shape == (5,)
    proj.reset()
    assert proj.stored == [] and proj.t == 0 and proj.svd_calls == 0 and proj.basis() is None


def test_bad_arguments():
    with pytest.raises(ConfigError):
        SubspaceProjection(k=5, every=1, window=3)
    with pytest.raises(ConfigError):
        SubspaceProjection(k=2, every=0, window=3)


def test_lcotta_is_eta_plus_projection(tiny_bn_model):
    a = tta.wrap(tiny_bn_model, "lcotta", k=2, every=1, window=4, margin_frac=1.0, d_margin=1.0)
    f = a.recipe.filters
    assert isinstance(f[0], EntropyMargin) and isinstance(f[1], Redundancy)
    assert isinstance(a.recipe.weight, EntropyWeight)
    (proj,) = a.recipe.grad_transforms
    assert isinstance(proj, SubspaceProjection) and (proj.k, proj.every, proj.window) == (2, 1, 4)
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        a(torch.rand(16, 3, 16, 16, generator=gen))
    assert proj.t == a.counters["steps"] > 0 and proj.svd_calls > 0
    a.reset()
    assert proj.t == 0 and proj.stored == []
