"""Sample filters, sample weights and skip-the-top selectors against METHODS.md 3.3-3.6, on hand-made tensors."""
import math

import pytest
import torch
from torch import nn

from tta.adapter import Adapter, Batch, Recipe
from tta.errors import ConfigError
from tta.parts.filters import PLPD, ConfidenceDrop, EntropyMargin, Redundancy, occlude, patch_shuffle, pixel_shuffle
from tta.parts.norm import BatchStats
from tta.parts.objectives import Entropy
from tta.parts.params import NormAffine, SkipTop, norm_affine, top_modules
from tta.parts.weights import DeyoWeight, EntropyWeight


def batch_of(logits, x=None, adapter=None, update_state=True):
    x = torch.zeros(len(logits), 3, 4, 4) if x is None else x
    return Batch(x, logits.clone().requires_grad_(True), adapter, update_state)


def entropy_of(logits):
    p = logits.softmax(1)
    return -(p * p.log()).sum(1)


ALL = torch.ones(4, dtype=torch.bool)
LOGITS = torch.tensor([[8.0, 0.0, 0.0], [1.0, 0.9, 0.8], [0.0, 4.0, 0.0], [0.0, 0.0, 0.5]])


# --------------------------------------------------------------------------------- entropy margin
def test_entropy_margin_keeps_entropy_below_frac_ln_c():
    e = entropy_of(LOGITS)
    for frac in (0.1, 0.4, 0.9):
        keep = EntropyMargin(frac)(batch_of(LOGITS), ALL)
        assert torch.equal(keep, e < frac * math.log(3))
    assert EntropyMargin(0.4)(batch_of(LOGITS), ALL).tolist() == [True, False, True, False]
    # only narrows the incoming mask; num_classes overrides C
    within = torch.tensor([False, True, True, True])
    assert EntropyMargin(0.4)(batch_of(LOGITS), within).tolist() == [False, False, True, False]
    assert EntropyMargin(0.4, num_classes=1000)(batch_of(LOGITS), ALL).all()  # 0.4 ln 1000 > ln 3


def test_entropy_margin_leaves_the_graph_to_the_objective():
    b = batch_of(LOGITS)
    EntropyMargin(0.4)(b, ALL)
    assert b.entropy.requires_grad


# ------------------------------------------------------------------------------------- redundancy
def test_redundancy_first_batch_initialises_then_filters_by_cosine():
    f = Redundancy(d_margin=0.6)
    first = batch_of(LOGITS)
    mask = torch.tensor([True, False, True, False])
    assert torch.equal(f(first, mask), mask)  # nothing dropped on the first batch
    m0 = LOGITS.softmax(1)[[0, 2]].mean(0)
    assert torch.allclose(f._mean, m0)

    logits2 = torch.tensor([[6.0, 0.0, 0.0], [0.0, 0.0, 6.0], [0.0, 6.0, 0.0], [3.0, 3.0, 0.0]])
    p2 = logits2.softmax(1)
    cos = (p2 @ m0) / (p2.norm(dim=1) * m0.norm())
    keep = f(batch_of(logits2), ALL)
    assert torch.equal(keep, cos.abs() < 0.6)
    assert keep.tolist() == [False, True, False, False]  # only the one orthogonal to the mean survives
    assert torch.allclose(f._mean, 0.9 * m0 + 0.1 * p2[keep].mean(0))


def test_redundancy_state_moves_only_on_state_updates_and_resets():
    f = Redundancy(0.5)
    f(batch_of(LOGITS, update_state=False), ALL)
    assert f._mean is None
    f(batch_of(LOGITS), ALL)
    m = f._mean.clone()
    f(batch_of(LOGITS.flip(0), update_state=False), ALL)
    assert torch.equal(f._mean, m)
    f(batch_of(LOGITS), torch.zeros(4, dtype=torch.bool))  # nobody survives: unchanged
    assert torch.equal(f._mean, m)
    f.reset()
    assert f._mean is None


# ------------------------------------------------------------------------------------------- PLPD
def test_patch_shuffle_permutes_tiles_independently_per_image():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = patch_shuffle(x, 4, torch.Generator().manual_seed(3))
    perm = torch.rand(2, 16, generator=torch.Generator().manual_seed(3)).argsort(1)
    for i in range(2):
        for k in range(16):  # output tile k is input tile perm[i, k]
            r, c, rs, cs = 2 * (k // 4), 2 * (k % 4), 2 * (int(perm[i, k]) // 4), 2 * (int(perm[i, k]) % 4)
            assert torch.equal(out[i, 0, r:r + 2, c:c + 2], x[i, 0, rs:rs + 2, cs:cs + 2])
    assert not torch.equal(perm[0], perm[1])
    assert torch.equal(out.flatten(1).sort(1).values, x.flatten(1).sort(1).values)


def test_patch_shuffle_resizes_sides_that_do_not_divide():
    x = torch.rand(3, 3, 10, 9)
    assert patch_shuffle(x, 4, torch.Generator().manual_seed(0)).shape == x.shape


def test_pixel_shuffle_and_occlusion():
    x = torch.rand(2, 3, 8, 8)
    out = pixel_shuffle(x, torch.Generator().manual_seed(0))
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, x.flatten(2)[:, :, perm].reshape(2, 3, 8, 8))
    occ = occlude(x)
    mean = x.mean(dim=(2, 3))
    assert torch.equal(occ[:, :, 2:6, 2:6], mean[:, :, None, None].expand(2, 3, 4, 4))
    assert torch.equal(occ[:, :, :2], x[:, :, :2])


class TopLeft(nn.Module):
    """Logits read off the mean of the top-left 2x2 tile per channel: a shuffle moves them."""

    def forward(self, x):
        return 4 * x[:, :, :2, :2].mean(dim=(2, 3))


def test_plpd_is_probability_drop_of_the_pseudo_label_on_the_shuffled_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(5, 3, 8, 8, generator=g)
    adapter = type("A", (), {})()
    adapter.model, adapter.generator = TopLeft(), torch.Generator().manual_seed(7)
    b = batch_of(TopLeft()(x), x=x, adapter=adapter)
    mask = torch.tensor([True, True, False, True, True])
    keep = PLPD(threshold=0.01)(b, mask)

    shuffled = patch_shuffle(x[mask], 4, torch.Generator().manual_seed(7))
    p, p2 = TopLeft()(x[mask]).softmax(1), TopLeft()(shuffled).softmax(1)
    y = p.argmax(1, keepdim=True)
    expected = torch.zeros(5)
    expected[mask] = (p.gather(1, y) - p2.gather(1, y)).squeeze(1)
    assert torch.allclose(b.extras["plpd"], expected)
    assert torch.equal(keep, mask & (expected > 0.01))
    assert 0 < int(keep.sum()) < 4  # the example is not degenerate


def test_plpd_on_an_empty_mask_runs_no_forward():
    adapter = type("A", (), {})()
    adapter.model, adapter.generator = None, torch.Generator()
    b = batch_of(LOGITS, adapter=adapter)
    none = torch.zeros(4, dtype=torch.bool)
    assert torch.equal(PLPD()(b, none), none)
    assert torch.equal(b.extras["plpd"], torch.zeros(4))
    with pytest.raises(ConfigError):
        PLPD(kind="rotate")


# -------------------------------------------------------------------------------- confidence drop
def tiny_adapter(recipe_filters):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(3))
    model(torch.rand(2, 3, 5, 5))
    recipe = Recipe(norm=BatchStats(), params=NormAffine(), objective=Entropy(), filters=recipe_filters)
    return Adapter(model, recipe)


def test_confidence_drop_compares_with_the_frozen_configured_source():
    f = ConfidenceDrop(margin=0.0)
    adapter = tiny_adapter([f])
    x = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        source_logits = adapter.model(x)  # batch statistics: the source copy normalises the same way
        adapter.params[0].mul_(torch.tensor([3.0, -1.0, 0.5, 2.0]))  # the adapted model moves
    out = adapter.compute_loss(x)
    p_o, p_a = source_logits.softmax(1), out.logits.detach().softmax(1)
    c_o = p_o.argmax(1, keepdim=True)
    expected = (p_a.gather(1, c_o) - p_o.gather(1, c_o)).squeeze(1) >= 0
    assert torch.equal(out.mask, expected)
    assert 0 < int(expected.sum()) < 6
    assert not any(p.requires_grad for p in f._source.parameters())
    assert f._source[1].training and not f._source[1].track_running_stats


def test_confidence_drop_margin_is_a_lower_bound_on_the_gain():
    f = ConfidenceDrop(margin=0.2)
    adapter = tiny_adapter([f])
    x = torch.rand(6, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    out = adapter.compute_loss(x)  # unadapted: gain 0 everywhere, below the margin
    assert out.selected == 0
    assert out.batch.entropy.requires_grad


# ------------------------------------------------------------------------------------------ weights
def test_entropy_weight_is_exp_of_margin_minus_entropy_detached():
    b = batch_of(LOGITS)
    w = EntropyWeight(0.4)(b)
    assert torch.allclose(w, torch.exp(0.4 * math.log(3) - entropy_of(LOGITS)))
    assert not w.requires_grad
    assert torch.allclose(EntropyWeight(0.4, num_classes=10)(b), torch.exp(0.4 * math.log(10) - entropy_of(LOGITS)))


def test_deyo_weight_terms():
    b = batch_of(LOGITS)
    plpd = torch.tensor([0.5, 0.0, 0.3, 0.0])
    b.extras["plpd"] = plpd
    ent = torch.exp(-(entropy_of(LOGITS) - 0.4 * math.log(3)))
    assert torch.allclose(DeyoWeight(0.4)(b), ent + plpd.exp())
    assert torch.allclose(DeyoWeight(0.4, plpd=False)(b), ent)
    assert torch.allclose(DeyoWeight(0.4, entropy=False)(b), plpd.exp())
    with pytest.raises(ConfigError):
        DeyoWeight(entropy=False, plpd=False)
    with pytest.raises(ConfigError, match="PLPD filter"):
        DeyoWeight()(batch_of(LOGITS))


# ------------------------------------------------------------------------------- skip-the-top rules
def _skipped(model, selector=None):
    selected = {n for n, _ in (selector or SkipTop())(model)}
    everything = {n for n, _ in NormAffine()(model)}
    return everything - selected


def test_skip_top_torchvision_resnet18():
    import torchvision
    skipped = _skipped(torchvision.models.resnet18(weights=None))
    assert skipped and all(n.startswith("layer4.") for n in skipped)
    assert len(skipped) == 2 * 5  # 2 blocks x 2 BN + downsample BN, weight and bias each


def test_skip_top_torchvision_vit_layout():
    import torchvision  # same module names as vit_b_16, a fraction of its size
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=12, num_heads=2,
                                              hidden_dim=8, mlp_dim=8)
    assert top_modules(vit) == ["encoder.layers.encoder_layer_9", "encoder.layers.encoder_layer_10",
                                "encoder.layers.encoder_layer_11", "encoder.ln"]
    assert len(_skipped(vit)) == 3 * 4 + 2


def test_skip_top_torchvision_swin_t():
    import torchvision
    swin = torchvision.models.swin_t(weights=None)
    assert top_modules(swin) == ["features.6", "features.7", "norm"]  # last patch merging + stage, final norm
    assert all(n.startswith(("features.6.", "features.7.", "norm.")) for n in _skipped(swin))


def test_skip_top_timm_vit_and_wrapped_names():
    timm = pytest.importorskip("timm")
    from tta.models.common import Normalized
    vit = Normalized(timm.create_model("vit_tiny_patch16_224", pretrained=False), (0.5,) * 3, (0.5,) * 3)
    assert top_modules(vit) == ["net.blocks.9", "net.blocks.10", "net.blocks.11", "net.norm"]
    assert "net.blocks.1.norm1.weight" not in _skipped(vit)  # blocks.1 is not blocks.1x


def test_skip_top_cifar_resnet_and_wrn():
    from tta.models.cifar_resnet import CifarResNet
    from tta.models.common import Normalized
    net = Normalized(CifarResNet(20), (0.5,) * 3, (0.5,) * 3)
    assert top_modules(net) == ["net.layer3"]
    assert len(_skipped(net)) == 3 * 2 * 2

    class WRN(nn.Module):  # the RobustBench WideResNet layout, tiny
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(3, 4, 3)
            self.block1, self.block2, self.block3 = (nn.Sequential(nn.BatchNorm2d(4)) for _ in range(3))
            self.bn1, self.fc = nn.BatchNorm2d(4), nn.Linear(4, 10)

    assert top_modules(WRN()) == ["block3", "bn1"]


def test_skip_top_unknown_layout_and_explicit_patterns():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConfigError, match="skip="):
        SkipTop()(net)
    assert _skipped(net, SkipTop(skip=[r"^3$"])) == {"3.weight", "3.bias"}
    assert isinstance(norm_affine(False), NormAffine)
    assert isinstance(norm_affine(False, skip=["x"]), SkipTop)
