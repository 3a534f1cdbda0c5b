"""EM-INF as a post-processor (METHODS.md 3.12) and COME's conservative entropy (METHODS-ZOO Z.14):
formulas on hand-made tensors, properties, and composition with methods."""
import copy
import math

import pytest
import torch

import tta
from tta import config
from tta.errors import ConfigError
from tta.parts.objectives import COMEEntropy
from tta.parts.postprocess import EMInf, build


def _entropy(z):
    return -(z.softmax(1) * z.log_softmax(1)).sum(1)


def test_em_inf_never_changes_the_argmax_on_random_logits():
    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 1.0, 3.0, 10.0):
        z = torch.randn(500, 10, generator=g) * scale
        for pp in (EMInf(), EMInf(steps=20, lr=0.5, kl_weight=0.0, threshold=0.0)):
            out = pp(z)
            assert torch.equal(out.argmax(1), z.argmax(1))


def test_em_inf_lowers_entropy_and_stops_below_the_threshold():
    z = torch.tensor([[1.0, 0.5, 0.0, -0.5], [8.0, 0.0, 0.0, 0.0]])  # the second row is already sharp
    assert _entropy(z)[1] < 0.3
    out = EMInf(lr=0.1, steps=50, kl_weight=0.0, threshold=0.3)(z)
    assert torch.equal(out[1], z[1])  # below the threshold from the start: untouched
    h = _entropy(out)
    assert h[0] < 0.3 and h[0] > 0.2  # stopped soon after crossing (a step of lr 0.1 is small)


def test_em_inf_first_step_is_adams_sign_step():
    z = torch.tensor([[2.0, 1.0, 0.0]])
    out = EMInf(lr=0.1, steps=1, kl_weight=0.0, threshold=0.0)(z)
    # d H / d z_j = -p_j (log p_j + H): its sign decides Adam's first step of exactly lr
    p = z.softmax(1)
    grad = -p * (p.log() + _entropy(z))
    torch.testing.assert_close(out, z - 0.1 * grad.sign(), atol=1e-6, rtol=0)


def test_em_inf_kl_weight_zero_vs_large():
    z = torch.randn(64, 10, generator=torch.Generator().manual_seed(1))
    free = EMInf(lr=0.1, steps=10, kl_weight=0.0, threshold=0.0)(z)
    held = EMInf(lr=0.1, steps=10, kl_weight=1e4, threshold=0.0)(z)
    # lambda = 0 moves every row towards a lower entropy; a huge lambda keeps the distribution in place
    assert (_entropy(free) < _entropy(z)).all()
    assert (held.softmax(1) - z.softmax(1)).abs().max() < (free.softmax(1) - z.softmax(1)).abs().max() / 5


def test_postprocess_spec_errors_and_yaml():
    assert isinstance(build("em_inf"), EMInf) and build({"name": "em_inf", "steps": 5}).steps == 5
    with pytest.raises(ConfigError, match="postprocess must be one of em_inf"):
        build("em_info")
    with pytest.raises(ConfigError, match="unknown option"):
        build({"name": "em_inf", "temperature": 2})
    with pytest.raises(ConfigError, match="must be a number"):
        build({"name": "em_inf", "lr": "fast"})
    with pytest.raises(ConfigError, match="postprocess must be one of"):
        config.from_dict({"method": {"name": "tent", "postprocess": "nope"}})


def test_postprocess_composes_with_any_method(tiny_bn_model):
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    for name in ("source", "tent", "eata"):
        kw = {"fisher_data": x} if name == "eata" else {}
        plain = tta.wrap(copy.deepcopy(tiny_bn_model), name, **kw)(x)
        sharp = tta.wrap(copy.deepcopy(tiny_bn_model), name, postprocess="em_inf", **kw)(x)
        assert torch.equal(sharp, EMInf()(plain)) and torch.equal(sharp.argmax(1), plain.argmax(1))


def test_come_entropy_against_the_formula():
    z = torch.tensor([[2.0, 0.5, -1.0], [0.0, 0.0, 0.0]])
    for k in (None, 1000.0):
        kk = 3.0 if k is None else k
        e = z.exp()
        s = e.sum(1, keepdim=True) + kk
        o = torch.cat([e / s, kk / s], 1) + 1e-7
        expected = -(o * o.log()).sum(1)
        torch.testing.assert_close(COMEEntropy(k)(z), expected)


def test_come_entropy_is_stable_and_keeps_the_norm_in_the_gradient():
    big = torch.tensor([[200.0, 0.0, -50.0]], requires_grad=True)
    h = COMEEntropy()(big)
    assert torch.isfinite(h).all()
    h.sum().backward()
    assert torch.isfinite(big.grad).all()
    # the gradient is orthogonal to z: it cannot change the logit norm to first order
    z = torch.tensor([[1.0, 2.0, -0.5]], requires_grad=True)
    COMEEntropy()(z).sum().backward()
    assert abs(float((z.grad * z.detach()).sum())) < 1e-6


def test_come_replaces_entropy_in_filter_weight_and_loss(tiny_bn_model):
    x = torch.rand(16, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    adapter = tta.wrap(tiny_bn_model, "come", host="eta", margin_frac=0.9)
    out = adapter.compute_loss(x, update_state=False)
    h = COMEEntropy()(out.batch.logits).detach()
    e0 = 0.9 * math.log(10)
    assert torch.equal(out.mask, h < e0)
    w = torch.exp(e0 - h)
    torch.testing.assert_close(out.loss, (w * h)[out.mask].mean())
    with pytest.raises(ConfigError, match="does not take"):
        tta.wrap(tiny_bn_model, "come", host="tent", d_margin=0.1)
