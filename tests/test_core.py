"""The core: entropy/TENT loss against hand values, parameter choice, BN batch statistics, reset,
determinism, input validation, the method registry and alpha mixing — on small hand-made tensors."""
import math

import pytest
import torch

import tta
from tta.errors import ConfigError, InputError
from tta.parts.objectives import entropy, marginal_entropy, soft_cross_entropy


def test_entropy_matches_hand_values():
    # uniform over 4 classes: ln 4; one-hot-like: ~0; p = (0.5, 0.25, 0.25): 1.5 ln 2
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0],
                           [100.0, 0.0, 0.0, 0.0],
                           [math.log(2), 0.0, 0.0, -float("inf")]])
    h = entropy(logits[:2])
    assert h[0].item() == pytest.approx(math.log(4), abs=1e-6)
    assert h[1].item() == pytest.approx(0.0, abs=1e-6)
    p = torch.tensor([[0.5, 0.25, 0.25]])
    assert entropy(p.log()).item() == pytest.approx(1.5 * math.log(2), abs=1e-6)


def test_marginal_entropy_and_soft_ce():
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])  # two confident, opposite predictions
    assert marginal_entropy(logits).item() == pytest.approx(math.log(2), abs=1e-4)
    q, p = torch.tensor([[0.0, 0.0]]), torch.tensor([[math.log(3), 0.0]])  # q uniform, p = (3/4, 1/4)
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25))
    assert soft_cross_entropy(q, p).item() == pytest.approx(expected, abs=1e-6)


def test_tent_loss_is_mean_entropy_of_first_forward(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "tent")
    x = torch.rand(6, 3, 8, 8)
    out = adapter.compute_loss(x)
    assert out.loss.item() == pytest.approx(entropy(out.logits).mean().item(), abs=1e-6)
    assert out.selected == 6


def test_tent_adapts_only_bn_affine(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "tent")
    trainable = {n for n, p in tiny_bn_model.named_parameters() if p.requires_grad}
    assert trainable == {"1.weight", "1.bias", "4.weight", "4.bias"}
    before = {n: p.detach().clone() for n, p in tiny_bn_model.named_parameters()}
    adapter(torch.rand(8, 3, 8, 8))
    for n, p in tiny_bn_model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n


def test_bn_uses_biased_batch_statistics_and_keeps_source_buffers(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "norm")
    bn = tiny_bn_model[1]
    running = bn.running_mean.clone()
    x = torch.rand(5, 3, 8, 8)
    h = tiny_bn_model[0](x)
    mu = h.mean(dim=(0, 2, 3), keepdim=True)
    var = h.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    expected = (h - mu) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(bn(h), expected, atol=1e-5, rtol=1e-5)
    adapter(x)
    assert torch.equal(bn.running_mean, running)
    adapter.eval()  # eval() on the adapter must not switch BN back to source statistics
    assert bn.training


def test_reset_is_bit_exact_after_20_steps(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "tent", lr=1e-2)
    state0 = {k: v.clone() for k, v in tiny_bn_model.state_dict().items()}
    x = torch.rand(16, 3, 8, 8)
    first = adapter(x)
    for _ in range(19):
        adapter(torch.rand(16, 3, 8, 8))
    assert adapter.counters["steps"] == 20
    assert any(not torch.equal(v, state0[k]) for k, v in tiny_bn_model.state_dict().items())
    adapter.reset()
    for k, v in tiny_bn_model.state_dict().items():
        assert torch.equal(v, state0[k]), k
    assert len(adapter.optimizer.state) == 0
    assert torch.equal(adapter(x), first)  # same input after reset: same prediction and same update


def test_same_seed_same_predictions(tiny_bn_model):
    import copy
    xs = [torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    runs = []
    for _ in range(2):
        adapter = tta.wrap(copy.deepcopy(tiny_bn_model), "tent", seed=3)
        runs.append(torch.cat([adapter(x) for x in xs]))
    assert torch.equal(runs[0], runs[1])


def test_source_predicts_with_running_stats_and_without_grad(tiny_bn_model):
    x = torch.rand(4, 3, 8, 8)
    with torch.no_grad():
        expected = tiny_bn_model.eval()(x)
    adapter = tta.wrap(tiny_bn_model, "source")
    assert adapter.optimizer is None
    torch.testing.assert_close(adapter(x), expected)


def test_norm_alpha_interpolates_source_and_batch(tiny_bn_model):
    import copy
    x = torch.rand(32, 3, 8, 8)
    src = tta.wrap(copy.deepcopy(tiny_bn_model), "source")(x)
    batch = tta.wrap(copy.deepcopy(tiny_bn_model), "norm")(x)
    torch.testing.assert_close(tta.wrap(copy.deepcopy(tiny_bn_model), "norm_alpha", alpha=0.0)(x), src)
    # alpha = 1 uses the unbiased batch variance (m/(m-1) with m = 32*8*8 here), so close, not equal
    torch.testing.assert_close(tta.wrap(copy.deepcopy(tiny_bn_model), "norm_alpha", alpha=1.0)(x), batch,
                               atol=2e-3, rtol=2e-3)
    with pytest.raises(ConfigError, match="alpha"):
        tta.wrap(copy.deepcopy(tiny_bn_model), "norm_alpha", alpha=1.5)


@pytest.mark.parametrize("bad, message", [
    (torch.rand(0, 3, 8, 8), "empty batch"),
    (torch.rand(3, 8, 8), "shape"),
    ((torch.rand(2, 3, 8, 8) * 255).to(torch.uint8), "dtype"),
    (torch.rand(2, 1, 8, 8), "channels"),
    (torch.rand(2, 3, 8, 8) * 255, "range"),
    (torch.full((2, 3, 8, 8), float("nan")), "NaN"),
    (torch.full((2, 3, 8, 8), float("inf")), "NaN or Inf"),
    ([[0.5]], "torch.Tensor"),
])
def test_bad_input_gets_one_clear_error_and_changes_nothing(tiny_bn_model, bad, message):
    adapter = tta.wrap(tiny_bn_model, "tent")
    state0 = {k: v.clone() for k, v in tiny_bn_model.state_dict().items()}
    with pytest.raises(InputError, match=message):
        adapter(bad)
    assert all(torch.equal(v, state0[k]) for k, v in tiny_bn_model.state_dict().items())
    assert adapter.counters["batches"] == 0


def test_batch_of_one_under_batch_stats_names_the_sliding_window(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "tent")
    with pytest.raises(InputError, match="sliding window"):
        adapter(torch.rand(1, 3, 8, 8))
    tta.wrap(tiny_bn_model, "source")(torch.rand(1, 3, 8, 8))  # source statistics: a batch of 1 is fine


def test_registry_errors_are_clear(tiny_bn_model):
    with pytest.raises(ConfigError, match="did you mean tent"):
        tta.wrap(tiny_bn_model, "tnet")
    with pytest.raises(ConfigError, match="unknown option"):
        tta.wrap(tiny_bn_model, "tent", learning_rate=1.0)
    with pytest.raises(ConfigError, match="unknown optimizer"):
        tta.wrap(tiny_bn_model, "tent", optimizer="lbfgs")
    assert {"source", "norm", "norm_alpha", "tent"} <= set(tta.methods.available())


def test_optimizer_overrides_reach_the_optimizer(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "tent", optimizer="sgd", lr=0.5, momentum=0.8, nesterov=True)
    group = adapter.optimizer.param_groups[0]
    assert isinstance(adapter.optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["nesterov"]) == (0.5, 0.8, True)


def test_nonfinite_loss_skips_the_step(tiny_bn_model):
    adapter = tta.wrap(tiny_bn_model, "tent")
    with torch.no_grad():
        tiny_bn_model[-1].weight.fill_(float("nan"))
    state0 = {k: v.clone() for k, v in tiny_bn_model.state_dict().items()}
    adapter(torch.rand(4, 3, 8, 8))
    assert adapter.counters["nonfinite"] == 1 and adapter.counters["steps"] == 0
    assert all(torch.equal(v, state0[k]) or torch.isnan(v).any() for k, v in tiny_bn_model.state_dict().items())
    assert len(adapter.optimizer.state) == 0


def test_import_tta_is_lazy():
    import subprocess
    import sys
    code = ("import sys, tta; heavy = [m for m in ('torch', 'timm', 'open_clip', 'robustbench', 'yaml') "
            "if m in sys.modules]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_alpha_mixing_fast_path_equals_the_differentiable_one(tiny_bn_model):
    import copy
    x = torch.rand(16, 3, 8, 8)
    fast = tta.wrap(copy.deepcopy(tiny_bn_model), "norm_alpha", alpha=0.3)(x)  # no autograd: fused path
    model = tta.wrap(copy.deepcopy(tiny_bn_model), "norm_alpha", alpha=0.3).model
    slow = model(x.requires_grad_())  # autograd: moments as constants, F.batch_norm
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    assert slow.requires_grad
