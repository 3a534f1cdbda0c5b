import pytest
import torch

import tta
from tta.errors import ConfigError
from tta.methods.tpt import PromptTuned
from tta.models.clip import resize_center_crop
from tta.parts.clip_losses import max_log_prob, otsu_threshold
from tta.parts.views import augmented_views, crop_boxes

from clip_helpers import tiny_clip


def _x(n=6, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_cliptta_predicts_after_its_steps_fills_memory_and_resets():
    m = tiny_clip()
    a = tta.wrap(m, "cliptta", sample_size=3, lr=1e-2)
    assert a.steps == 10 and a.optimizer.defaults["eps"] == 1e-6 and a.per_class == 1
    source = {k: v.clone() for k, v in a.model.state_dict().items()}
    x = _x()
    out = a(x)
    assert a.counters["steps"] == 10 and len(a.memory) > 0
    with torch.no_grad():
        torch.testing.assert_close(out, a.model(x))
    assert out.shape == (6, 3) and a.last_ood_score.shape == (6,)
    a.reset()
    assert len(a.memory) == 0
    assert all(torch.equal(v, source[k]) for k, v in a.model.state_dict().items())
    torch.testing.assert_close(a(x), out)  # bit-for-bit reset -> same run again


def test_cliptta_open_set_threshold_starts_at_otsu_of_the_batch_scores():
    m = tiny_clip()
    x = _x(8)
    with torch.no_grad():
        expected = otsu_threshold(max_log_prob(m(x), m.logit_scale.exp()))
    a = tta.wrap(m, "cliptta", open_set=True, lr=0.0, steps=1)
    assert "oce.alpha" in a.param_names
    a(x)
    assert float(a.oce.alpha) == pytest.approx(float(expected))
    assert a.last["selected"] == int((max_log_prob(a.model(x), m.logit_scale.exp()) > expected).sum())


def test_views_shape_first_view_and_boxes_in_bounds():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(3, 40, 56)
    v = augmented_views(img, 64, 32, g)
    assert v.shape == (64, 3, 32, 32)
    torch.testing.assert_close(v[0], resize_center_crop(img[None], 32)[0])
    top, left, h, w = crop_boxes(500, 40, 56, g).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 40).all() and (left + w <= 56).all()
    area = h * w / (40 * 56)
    assert area.min() >= 0.07 and area.max() <= 1.0


def test_tpt_initial_prompt_reproduces_the_zero_shot_classifier():
    m = tiny_clip()
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(PromptTuned(m)(x), m(x), atol=1e-5, rtol=1e-5)
    assert PromptTuned(m).ctx.shape[0] == 4


def test_tpt_selects_views_tunes_only_the_prompt_and_resets_per_image():
    a = tta.wrap(tiny_clip(), "tpt")
    assert a.param_names == ["ctx"]
    ctx0 = a.model.ctx.detach().clone()
    x = _x(2)
    both = a(x)
    assert a.last["selected"] == 6 and a.last["views"] == 64
    assert not torch.equal(a.model.ctx, ctx0)  # tuned on the last image
    one_by_one = torch.cat([a(x[:1]), a(x[1:])])
    torch.testing.assert_close(both, one_by_one)  # each image starts from the source prompt
    b = tta.wrap(tiny_clip(), "tpt", views=16, keep=0.25)
    b(x[:1])
    assert b.last["selected"] == 4


def test_adte_views_q_range_and_online_memory():
    a = tta.wrap(tiny_clip(), "adte_views", gap=0.0, min_entries=2, views=8)
    x = _x(5)
    out = a(x)
    assert out.shape == (5, 3) and a.last["selected"] == 1  # floor(0.1 * 8) = 0 -> at least 1
    assert a.score.entries == 5  # online: every image entered the memory after being scored
    q = a.score.class_q()
    assert (q >= 0.01 - 1e-7).all() and (q <= 0.9 + 1e-7).all()
    assert a.score.bias_estimate is not None
    a.reset()
    assert a.score.entries == 0


def test_adte_views_two_pass_needs_fit_and_freezes_the_estimate():
    a = tta.wrap(tiny_clip(), "adte_views", bias="two_pass", gap=0.0, views=8)
    with pytest.raises(ConfigError, match="fit_bias"):
        a(_x(1))
    a.fit_bias(_x(4, seed=1))
    assert a.score.entries == 4
    a(_x(3))
    assert a.score.entries == 4
    with pytest.raises(ConfigError):
        tta.wrap(tiny_clip(), "adte_views", bias="sometimes")


def test_adte_label_adjustment_flag_changes_the_vote():
    x, fit = _x(3), _x(6, seed=2)
    outs = []
    for adjust in (True, False):
        a = tta.wrap(tiny_clip(), "adte_views", bias="two_pass", gap=0.0, views=8, label_adjust=adjust)
        a.fit_bias(fit)
        outs.append(a(x))
    assert not torch.allclose(outs[0], outs[1])


def test_sar_and_deyo_skip_the_top_of_the_clip_visual_tower():
    from tta.parts.params import top_modules
    model = tiny_clip()
    assert top_modules(model) == ["visual.transformer.resblocks.1", "visual.ln_post"]  # 2 blocks: top quarter = 1
    for method in ("sar", "deyo"):
        adapter = tta.wrap(tiny_clip(), method)
        assert adapter.param_names and all(n.startswith("visual.") for n in adapter.param_names)
        assert not any("resblocks.1." in n or "ln_post" in n for n in adapter.param_names)
        logits = adapter(_x(8))
        assert torch.isfinite(logits).all()


# ------------------------------------------------- CLIPTTA additions (METHODS.md 3.9, gap 7)
def test_cliptta_adapt_text_moves_only_layernorms_predicts_with_them_and_resets_them():
    from tta.models.clip_text import classifier_text
    m = tiny_clip()
    text0 = {k: v.clone() for k, v in m.text.state_dict().items()}
    vis0 = {k: v.clone() for k, v in m.visual.state_dict().items()}
    cached = m.text_features.clone()
    a = tta.wrap(m, "cliptta", adapt_text=True, lr=1e-2, sample_size=3)
    text_names = [n for n in a.param_names if n.startswith("text.")]
    assert text_names and all(".ln" in n or n.startswith("text.ln_final") for n in text_names)
    assert a.recipe.objective.text_to_image  # both directions of L_sc once text adapts (reference)
    x = _x(6)
    out = a(x)
    moved = {k for k, v in m.text.state_dict().items() if not torch.equal(v, text0[k])}
    assert moved and moved <= {n[len("text."):] for n in text_names}
    assert {k for k, v in m.visual.state_dict().items() if not torch.equal(v, vis0[k])} <= \
        {n[len("visual."):] for n in a.param_names}
    with torch.no_grad():
        expected = m.logits_from_features(m.encode_image(x), classifier_text(m, m.templates))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, m(x).detach())  # the cached prototypes are the source ones, left alone
    torch.testing.assert_close(m.text_features, cached, rtol=0, atol=0)
    a.reset()
    assert all(torch.equal(v, text0[k]) for k, v in m.text.state_dict().items())
    assert all(torch.equal(v, vis0[k]) for k, v in m.visual.state_dict().items())
    assert torch.equal(a(x), out)


def test_cliptta_memory_only_loss_is_the_memory_sample_terms_alone():
    from tta.adapter import Batch
    from tta.parts.clip_losses import SoftContrastive
    from tta.parts.objectives import marginal_entropy
    x = _x(6)
    losses = {}
    for memory_only in (False, True):  # lr 0: the memory sample is scored by the source model
        a = tta.wrap(tiny_clip(), "cliptta", memory_only=memory_only, steps=1, lr=0.0, sample_size=3)
        a(x)
        losses[memory_only] = a.last["loss"]
    assert len(a.memory) > 0 and a.memory_only
    sample = a.memory.sample(a.per_class, torch.Generator().manual_seed(a.seed))
    with torch.no_grad():
        z = a.model(sample)
        expected = SoftContrastive()(Batch(sample, z, a)).mean() - marginal_entropy(z)
    assert losses[True] == pytest.approx(float(expected), rel=1e-5)
    assert losses[False] != pytest.approx(losses[True], rel=1e-3)  # the batch terms are the difference


@pytest.mark.parametrize("options", [{"adapt_text": True}, {"memory_only": True},
                                     {"memory_only": True, "open_set": True}])
def test_cliptta_variants_are_deterministic_and_reset_exactly(options):
    x = _x(6)
    a = tta.wrap(tiny_clip(), "cliptta", lr=1e-2, sample_size=3, steps=3, **options)
    source = {k: v.clone() for k, v in a.state_dict().items()}
    out = a(x)
    assert torch.isfinite(out).all() and a.counters["steps"] == 3
    a.reset()
    assert all(torch.equal(v, source[k]) for k, v in a.state_dict().items())
    assert torch.equal(a(x), out)
    b = tta.wrap(tiny_clip(), "cliptta", lr=1e-2, sample_size=3, steps=3, **options)
    assert torch.equal(b(x), out)
