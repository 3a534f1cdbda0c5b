"""ZERO, MTA and VTE (METHODS-VLM V.2, V.5, V.6): each core formula on hand-made tensors (ZERO's vote and
tie-break, official quirks included; MTA's bandwidths, kernel and inlierness-weighted mode against a
one-image transcription of the official loop; VTE's feature ensemble), then each method end to end on the
tiny random open_clip model: finite, reset exact, seeded, batch- and chunk-independent."""
import math

import pytest
import torch

import tta
from tta.errors import ConfigError
from tta.methods import Cost, info
from tta.methods.mta import bandwidths, kernel, mta_mode
from tta.methods.zero import zero_votes

from clip_helpers import tiny_clip

METHODS = ("zero", "mta", "vte")


def _x(n=4, seed=0, h=32, w=32):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def _cosines(classes, margins, num_classes=5):
    """(1, N, C) cosines: view v peaks at ``classes[v]`` by ``margins[v]`` (a larger margin: more confident)."""
    cos = torch.zeros(1, len(classes), num_classes)
    for v, (c, m) in enumerate(zip(classes, margins)):
        cos[0, v, c] = m
    return cos


# -------------------------------------------------------------------------------------------------- ZERO
def test_zero_majority_vote_of_the_most_confident_views():
    # confidence order: views 3, 1, 4 kept (floor(0.3 * 10) = 3), voting 1, 1, 0
    cos = _cosines([2, 1, 2, 1, 0, 2, 2, 2, 2, 2], [0.1, 0.8, 0.2, 0.9, 0.7, 0.3, 0.1, 0.2, 0.3, 0.1])
    votes = zero_votes(cos, scale=10.0, gamma=0.3)
    assert votes.tolist() == [[1, 2, 0, 0, 0]]  # the six votes for class 2 were not confident enough
    assert zero_votes(cos, 10.0, gamma=1.0).argmax().item() == 2  # all views: class 2 wins


def test_zero_tie_goes_to_the_first_left_out_view_voting_for_a_tied_class():
    # kept (gamma 0.4 of 10 = 4): classes 0, 0, 1, 1; left out by confidence: classes 3, 1, 0, ...
    cos = _cosines([0, 0, 1, 1, 3, 1, 0, 4, 4, 4], [0.9, 0.85, 0.8, 0.75, 0.6, 0.5, 0.4, 0.1, 0.1, 0.1])
    votes = zero_votes(cos, 10.0, gamma=0.4)
    assert votes.tolist() == [[2, 3, 0, 0, 0]]  # class 1 wins the tie and gets the extra vote


def test_zero_fallback_restricts_the_most_confident_view_to_the_tied_classes():
    # kept: classes 2 (most confident, second choice 0), 0, 0, 1, 1 -> tie 0/1; no left-out view votes 0 or 1
    cos = _cosines([2, 0, 0, 1, 1, 4, 4, 4, 4, 4], [0.9, 0.85, 0.8, 0.75, 0.7, 0.3, 0.2, 0.2, 0.1, 0.1])
    cos[0, 0, 0], cos[0, 0, 1] = 0.3, 0.2
    cos[0, 5, 2] = 0.2  # the first left-out view: class 4 first, class 2 second
    assert zero_votes(cos, 10.0, gamma=0.5).tolist() == [[3, 2, 1, 0, 0]]
    # official: the first left-out view (argmax 4), with the classes C - 1 - t = 4, 3 masked: class 2 wins,
    # a class that was not even tied
    assert zero_votes(cos, 10.0, gamma=0.5, ties="official").tolist() == [[2, 2, 2, 0, 0]]


def test_zero_soft_fp16_votes_are_fractional_for_close_cosines():
    cos = _cosines([0, 1, 2], [0.9, 0.8, 0.1], num_classes=3)
    cos[0, 1, 0] = 0.8 - 1e-4  # view 1's top two cosines are 1e-4 apart: 0.1 at temperature 2^-10
    soft = zero_votes(cos, 10.0, gamma=0.67, vote="soft_fp16")
    share = torch.sigmoid(torch.tensor(1e-4 * 1024))
    torch.testing.assert_close(soft, torch.tensor([[1 + (1 - share), share, 0.0]]))
    # hard: one vote each; view 2 (left out) votes 2, so the most confident view, view 0, decides: class 0
    assert zero_votes(cos, 10.0, gamma=0.67).tolist() == [[2, 1, 0]]
    with pytest.raises(ConfigError):
        zero_votes(cos, 10.0, vote="fractional")


# --------------------------------------------------------------------------------------------------- MTA
def test_mta_bandwidths_and_kernel_by_hand():
    x = torch.tensor([0.0, 1, 3, 6]).view(1, 4, 1)
    h = bandwidths(x, neighbours=0.5)  # k = floor(0.5 * 3) = 1 nearest other point
    torch.testing.assert_close(h, torch.tensor([[math.sqrt(0.5), math.sqrt(0.5), math.sqrt(2), math.sqrt(4.5)]]))
    h2 = bandwidths(x, neighbours=1.0)  # all 3 others: mean squared distance
    torch.testing.assert_close(h2[0, 0], torch.tensor(math.sqrt(0.5 * (1 + 9 + 36) / 3)))
    k = kernel(x, torch.tensor([[1.0]]), h)
    torch.testing.assert_close(k, torch.exp(-torch.tensor([[1.0, 0, 4, 25]]) / (2 * h ** 2)))


def _official_mta(x, logits, lambda_y=0.2, lambda_q=4.0, iters=5, th=1e-6):
    """One image, transcribed from the spec's loop (while-loops with their own breaks)."""
    n = x.shape[0]
    dist = torch.cdist(x, x).sort(1).values[:, 1:int(0.3 * (n - 1)) + 1] ** 2
    h = (0.5 * dist.mean(1)).sqrt()
    a = logits.softmax(1) @ logits.softmax(1).t()
    y, mode = torch.ones(n) / n, x[0]
    for _ in range(iters):
        density = torch.exp(-(x - mode).norm(dim=-1) ** 2 / (2 * h ** 2))
        for _ in range(iters):
            old, y = y, torch.softmax((density + lambda_q * (a * y.unsqueeze(0)).sum(1)) / lambda_y, -1)
            if (old - y).norm() < th:
                break
        for _ in range(iters):
            old = mode
            w = torch.exp(-(x - mode).norm(dim=-1) ** 2 / (2 * h ** 2)) * y
            mode = (w.unsqueeze(1) * x).sum(0) / w.sum()
            mode = mode / mode.norm()
            if (old - mode).norm() < th:
                break
    return mode, y


def test_mta_mode_matches_the_official_loop_image_by_image():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(3, 64, 16, generator=g) + 2 * torch.randn(3, 1, 16, generator=g)
    x = torch.nn.functional.normalize(spread, dim=-1)
    text = torch.nn.functional.normalize(torch.randn(5, 16, generator=g), dim=-1)
    logits = 100 * x @ text.t()
    mode, y = mta_mode(x, logits)
    for b in range(3):
        ref_mode, ref_y = _official_mta(x[b], logits[b])
        torch.testing.assert_close(mode[b], ref_mode, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(y[b], ref_y, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(y.sum(-1), torch.ones(3))  # a softmax over the views
    torch.testing.assert_close(mode.norm(dim=-1), torch.ones(3))


def test_mta_inlierness_drops_a_view_whose_prediction_disagrees():
    """Views alike in feature space, one predicting another class: the affinity term ``A y`` (agreement of
    predictions) gives it the lowest inlierness, and the mode stays with the others."""
    g = torch.Generator().manual_seed(1)
    centre = torch.nn.functional.normalize(torch.randn(8, generator=g), dim=0)
    x = torch.nn.functional.normalize(centre + 0.05 * torch.randn(12, 8, generator=g), dim=-1)
    logits = torch.zeros(1, 12, 3)
    logits[0, :, 0] = 10
    logits[0, 5] = torch.tensor([0.0, 0, 10])
    mode, y = mta_mode(x.unsqueeze(0), logits)
    assert y[0].argmin() == 5 and y[0, 5] < 0.5 * y[0].median()
    flat, y_flat = mta_mode(x.unsqueeze(0), torch.zeros(1, 12, 3))  # without disagreement it weighs more
    assert y_flat[0, 5] > y[0, 5]
    assert torch.dot(mode[0], centre) > 0.99
    single, _ = mta_mode(x[:1].unsqueeze(0), logits[:, :1])
    torch.testing.assert_close(single, x[:1])  # one view: its own embedding


# --------------------------------------------------------------------------------------------------- VTE
def test_vte_averages_the_features_of_the_most_confident_views():
    a = tta.wrap(tiny_clip(), "vte", rho=0.5, templates=None)
    f = torch.tensor([[[1.0, 0], [0.6, 0.8], [0, 1], [0.8, 0.6]]])
    text = torch.eye(2)
    # logits 10 f: entropies lowest for views 0 and 2 (one-hot), the mixed views 1 and 3 are left out
    torch.testing.assert_close(a.aggregate(f, text, torch.tensor(10.0)), torch.tensor([[5.0, 5.0]]))
    a.normalize = True
    torch.testing.assert_close(a.aggregate(f, text, torch.tensor(10.0)), torch.tensor([[10 / 2 ** 0.5] * 2]))


# ------------------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("method", METHODS)
def test_end_to_end_finite_reset_exact_and_seeded(method):
    x = _x(4)
    a = tta.wrap(tiny_clip(), method, views=16)
    out = a(x)
    assert out.shape == (4, 3) and torch.isfinite(out).all()
    assert a.counters["views"] == 64 and a.last["views"] == 16
    second = a(x)  # the next images of the stream get other views
    a.reset()
    assert torch.equal(a(x), out)
    assert torch.equal(tta.wrap(tiny_clip(), method, views=16)(x), out)  # same seed, same numbers
    if method != "zero":  # votes of a random 3-class model rarely move; the soft methods always do
        assert not torch.equal(second, out)
        assert not torch.equal(tta.wrap(tiny_clip(), method, views=16, seed=1)(x), out)


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_one_by_one_and_chunking_changes_nothing(method):
    x = _x(5, seed=2, h=40, w=48)  # not the model's size: view 0 is resized and centre-cropped
    out = tta.wrap(tiny_clip(), method, views=8, chunk=2)(x)
    a = tta.wrap(tiny_clip(), method, views=8, chunk=8)
    pieces = torch.cat([a(x[:1]), a(x[1:4]), a(x[4:])])
    torch.testing.assert_close(pieces, out, rtol=1e-4, atol=1e-5)


def test_zero_outputs_log_vote_shares_and_policies_and_templates_apply():
    x = _x(3)
    share = tta.wrap(tiny_clip(), "zero", views=10, gamma=0.3)(x).exp()  # 3 votes (+1 after a tie)
    torch.testing.assert_close(share.sum(-1), torch.ones(3))
    on_grid = [((share * k) - (share * k).round()).abs().max(-1).values < 1e-5 for k in (3, 4)]
    assert (on_grid[0] | on_grid[1]).all()
    soft = tta.wrap(tiny_clip(), "zero", views=10, vote="soft_fp16", ties="official")(x)
    assert torch.isfinite(soft).all()
    torch.testing.assert_close(soft.exp().sum(-1), torch.ones(3))
    b = tta.wrap(tiny_clip(), "vte", views=6, policy="augmix")
    assert b.templates is not None and len(b.templates) == 80  # VTE: CLIP's 80 templates by default
    assert not torch.allclose(b.text_features(), b.model.text_features)
    assert torch.isfinite(b(x)).all()
    assert tta.wrap(tiny_clip(), "zero", templates="ensemble").own_text.shape == (3, 64)


@pytest.mark.parametrize("method,bad", [
    ("zero", dict(vote="fractional")), ("zero", dict(ties="random")), ("zero", dict(gamma=0.0)),
    ("mta", dict(lambda_y=0.0)), ("mta", dict(neighbours=1.5)), ("vte", dict(rho=2.0)),
    ("vte", dict(policy="jitter")), ("zero", dict(chunk=0)), ("mta", dict(view_options={"hue": 0.1})),
    ("vte", dict(templates="no-such-set")), ("zero", dict(policy="none")), ("tpt", dict(chunk=0)),
    ("adte_views", dict(policy="jitter")), ("tpt", dict(view_options={"scale": (0.5, 0.1)}))])
def test_bad_options_are_one_config_error(method, bad):
    with pytest.raises(ConfigError):
        tta.wrap(tiny_clip(), method, **bad)


def test_non_clip_models_are_refused(tiny_bn_model):
    with pytest.raises(ConfigError, match="CLIP"):
        tta.wrap(tiny_bn_model, "mta")


def test_registered_cost_and_the_view_policy_of_tpt_and_adte():
    for method in METHODS:
        assert info(method).cost == Cost(nograd=64, params="none") and info(method).adapts == "nothing"
    x = _x(2)
    for method, kw in (("tpt", {}), ("adte_views", dict(gap=0.0, min_entries=1))):
        a = tta.wrap(tiny_clip(), method, views=8, policy="augmix", **kw)
        assert a.view_gen.policy == "augmix"
        out = a(x)
        a.reset()
        assert torch.isfinite(out).all() and torch.equal(a(x), out)
