"""WATT and CLIPArTT (METHODS-VLM V.10, V.11) and their shared parts: the pseudo-caption contrastive loss,
top-K captions, weight averaging, and the per-prompt text-classifier builder."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import tta
from tta.errors import ConfigError
from tta.models import clip_text
from tta.parts import weight_average as wa
from tta.parts.captions import TopKCaptions, caption_targets, caption_text, pseudo_caption_loss
from tta.parts.params import NormAffine

from clip_helpers import tiny_clip


def _x(n=8, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _softmax(row):
    e = [math.exp(v - max(row)) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------- the shared loss
F3 = [[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]]
U3 = [[0.8, 0.6], [0.8, 0.6], [0.0, 1.0]]


def _dot(a, b):
    return sum(p * q for p, q in zip(a, b))


def _hand_q(f, u, tau):
    return [_softmax([((_dot(f[i], f[j]) + _dot(u[i], u[j])) / 2) / tau for j in range(len(f))])
            for i in range(len(f))]


def test_caption_targets_are_the_row_softmax_of_the_mean_similarity():
    q = caption_targets(torch.tensor(F3), torch.tensor(U3), 0.5)
    torch.testing.assert_close(q, torch.tensor(_hand_q(F3, U3, 0.5)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(3))
    assert not torch.allclose(q.sum(0), torch.ones(3))  # so the transposed weights are not distributions


@pytest.mark.parametrize("targets", ["transposed", "rows"])
def test_pseudo_caption_loss_equals_hand_computation(targets):
    tau, s = 0.5, 3.0
    q = _hand_q(F3, U3, tau)
    expected = []
    for i in range(3):
        logp = [math.log(p) for p in _softmax([s * _dot(F3[i], U3[j]) for j in range(3)])]
        weight = [q[j][i] if targets == "transposed" else q[i][j] for j in range(3)]
        expected.append(-sum(w * lp for w, lp in zip(weight, logp)))
    got = pseudo_caption_loss(torch.tensor(F3), torch.tensor(U3), s, tau, targets)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_targets_are_not_detached_and_one_image_has_zero_loss():
    f = torch.tensor(F3, requires_grad=True)
    u = torch.tensor(U3)
    (g_live,) = torch.autograd.grad(pseudo_caption_loss(f, u, 3.0, 0.5).mean(), f)
    q = caption_targets(f, u, 0.5).detach()
    (g_fixed,) = torch.autograd.grad((-(q.t() * (3.0 * f @ u.t()).log_softmax(1)).sum(1)).mean(), f)
    assert (g_live - g_fixed).abs().max() > 1e-3  # the targets' own gradient is part of the update
    one = torch.tensor([[0.6, 0.8]], requires_grad=True)
    loss = pseudo_caption_loss(one, torch.tensor([[1.0, 0.0]]), 100.0).mean()
    (g,) = torch.autograd.grad(loss, one)
    assert loss.item() == 0.0 and torch.count_nonzero(g) == 0


# --------------------------------------------------------------------------------- top-K captions
def test_caption_text_and_top_k_bank_encode_each_distinct_caption_once_per_batch():
    assert caption_text("a photo of a {}", ["cat", "dog", "ship"]) == "a photo of a cat or dog or ship"
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return torch.tensor([[float(len(t)), float(t.count("dog"))] for t in texts])

    bank = TopKCaptions(["cat", "dog", "ship"], "a photo of a {}", encode)
    idx = torch.tensor([[0, 1], [1, 0], [0, 1], [2, 1]])
    out = bank(idx)
    texts = ["a photo of a cat or dog", "a photo of a dog or cat", "a photo of a cat or dog",
             "a photo of a ship or dog"]
    torch.testing.assert_close(out, torch.tensor([[float(len(t)), float(t.count("dog"))] for t in texts]))
    assert sorted(calls[0]) == sorted(set(texts))  # order matters: "cat or dog" and "dog or cat" differ
    bank(idx[:2])
    assert len(calls) == 1  # cached within the batch
    bank.clear()
    bank(idx[:1])
    assert calls[-1] == ["a photo of a cat or dog"]


# ------------------------------------------------------------------------------- weight averaging
def test_snapshot_load_and_average_on_hand_made_tensors():
    a, b = torch.nn.Parameter(torch.tensor([1.0, 2.0])), torch.nn.Parameter(torch.tensor([[3.0], [4.0]]))
    s1 = wa.snapshot([a, b])
    assert s1.tolist() == [1.0, 2.0, 3.0, 4.0]
    s2 = torch.tensor([3.0, 0.0, 5.0, 8.0])
    s3 = torch.tensor([2.0, 1.0, 1.0, 0.0])
    avg = wa.average([s1, s2, s3])
    assert avg.tolist() == [2.0, 1.0, 3.0, 4.0]
    ident = id(a)
    wa.load([a, b], s2)
    assert id(a) == ident and a.tolist() == [3.0, 0.0] and b.tolist() == [[5.0], [8.0]]
    s2[0] = 99.0
    assert a[0].item() == 3.0  # a copy, not a view of the snapshot
    with pytest.raises(ConfigError):
        wa.load([a], s2)
    with pytest.raises(ConfigError):
        wa.average([])


# ------------------------------------------------------------------------------- text classifier
def test_builder_reproduces_the_classifier_and_keeps_per_prompt_embeddings():
    templates = ["a photo of a {}.", "art of the {}."]
    m = tiny_clip(templates=tuple(templates))
    torch.testing.assert_close(clip_text.classifier_text(m, templates), m.text_features, rtol=1e-5, atol=1e-6)
    per = clip_text.classifier_text(m, templates, per_prompt=True)
    assert per.shape == (3, 2, m.text_features.shape[1])
    with torch.no_grad():
        one = F.normalize(m.text(m.tokenizer(["art of the dog."])), dim=-1)[0]
    torch.testing.assert_close(per[1, 1], one, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(per.norm(dim=-1), torch.ones(3, 2))


def test_builder_pools_unequal_prompt_lists_and_rejects_them_per_prompt():
    m = tiny_clip()
    prompts = [["a cat.", "a small cat.", "cat art."], ["a dog."]]
    got = clip_text.class_text_features(m.text, m.tokenizer, prompts)
    with torch.no_grad():
        feats = [F.normalize(m.text(m.tokenizer(p)), dim=-1) for p in prompts]
    expected = torch.stack([F.normalize(f.mean(0), dim=-1) for f in feats])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="same number"):
        clip_text.class_text_features(m.text, m.tokenizer, prompts, per_prompt=True)
    with pytest.raises(ConfigError, match="at least one prompt"):
        clip_text.class_text_features(m.text, m.tokenizer, [["a cat."], []])


def test_an_overlong_prompt_is_one_clear_error_and_a_full_one_is_not():
    m = tiny_clip()
    length = clip_text.context_length(m.text)
    fits = " ".join(["cat"] * (length - 2))  # SOT + 75 words + EOT = 77 tokens
    assert clip_text.tokenize(m.tokenizer, [fits], length).shape == (1, length)
    with pytest.raises(ConfigError, match="longer than the text encoder's 77 tokens"):
        clip_text.tokenize(m.tokenizer, ["a photo.", fits + " cat"], length)


def test_prompt_sets():
    assert len(clip_text.prompt_set("watt8")) == 8 and clip_text.prompt_set("watt8")[0] == "a photo of a {}"
    assert clip_text.prompt_set("clipartt") == ["a photo of a {}"]
    assert clip_text.prompt_set("single") == ["a photo of a {}."]  # falls back to the bundled sets
    with pytest.raises(ConfigError):
        clip_text.prompt_set("watt9")


# ----------------------------------------------------------------------- the methods, end to end
def _spread(text: torch.Tensor, f: torch.Tensor, shift: int = 0) -> None:
    """Class embeddings set to the normalised features of images ``shift..shift+C``: a random tiny CLIP puts
    every image in one class, and with one caption for all the loss has no gradient."""
    text.copy_(f[shift:shift + text.shape[0]])


def _visual_features(m, x):
    with torch.no_grad():
        return m.encode_image(x)


def _reference_loss(model, x, u, scale):
    """The official loss line by line: caption-by-image logits, targets, CE of the transposes."""
    f = model.encode_image(x)
    logits = scale * u @ f.t()
    q = (((f @ f.t() + u @ u.t()) / 2) / 0.01).softmax(-1)
    return (-q.t() * logits.t().log_softmax(-1)).sum(1).mean()


def _reference_watt(m, x, texts, eval_text, steps, rounds, mode, lr):
    """WATT from the spec's steps, with the official separate no-grad forward for the pseudo-labels."""
    params = [p for _, p in NormAffine()(m)]
    m.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    start, opt0 = [p.detach().clone() for p in params], copy.deepcopy(opt.state_dict())

    def load(values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
    scale, avg, loss = m.logit_scale.exp(), None, None
    for r in range(rounds):
        if mode == "sequential" and r > 0:
            load(avg)
        snaps = []
        for text in texts:
            if mode == "parallel":
                load(start if r == 0 else avg)
                if r == 0:
                    opt.load_state_dict(copy.deepcopy(opt0))
            for _ in range(steps):
                with torch.no_grad():
                    labels = (100 * m.encode_image(x) @ text.t()).softmax(1).argmax(1)
                loss = _reference_loss(m, x, text[labels], scale)
                loss.backward()
                opt.step()
                opt.zero_grad()
            snaps.append([p.detach().clone() for p in params])
        avg = [sum(s[i] for s in snaps) / len(snaps) for i in range(len(params))]
    load(avg)
    with torch.no_grad():
        return scale * m.encode_image(x) @ eval_text.t(), loss.item()


@pytest.mark.parametrize("mode", ["sequential", "parallel"])
def test_watt_matches_a_line_by_line_reference(mode):
    x = _x(8)
    a = tta.wrap(tiny_clip(), "watt", mode=mode, rounds=2, templates=["a photo of a {}", "art of the {}."])
    f = _visual_features(a.model, x)
    for t, text in enumerate(a.template_text):
        _spread(text, f, shift=2 * t)
    a.eval_text.copy_(F.normalize(a.template_text.mean(0), dim=-1))
    out = a(x)
    assert a.counters["steps"] == 2 * 2 * 2  # rounds x templates x steps
    ref, last_loss = _reference_watt(tiny_clip(), x, a.template_text.clone(), a.eval_text.clone(), 2, 2, mode, 1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert a.last["loss"] == pytest.approx(last_loss, rel=1e-5)
    source = tiny_clip()(x)
    assert (out - source.detach()).abs().max() > 1e-4  # it did adapt


def test_watt_parallel_lands_on_the_average_of_single_template_runs():
    x = _x(8)
    templates = ["a photo of a {}", "itap of a {}"]
    f = _visual_features(tiny_clip(), x)
    ends = []
    for t, template in enumerate(templates + [None]):
        a = tta.wrap(tiny_clip(), "watt", mode="parallel", rounds=1, steps=1,
                     templates=templates if template is None else [template])
        for i, text in enumerate(a.template_text):
            _spread(text, f, shift=2 * (t if template is not None else i))
        a(x)
        ends.append(wa.snapshot(a.params))
    torch.testing.assert_close(ends[2], (ends[0] + ends[1]) / 2, rtol=0, atol=1e-7)


def test_watt_prediction_classifiers():
    m = tiny_clip()
    a = tta.wrap(m, "watt")
    per = clip_text.classifier_text(m, "watt8", per_prompt=True)
    assert a.template_text.shape == (8, 3, per.shape[-1])
    torch.testing.assert_close(a.eval_text, F.normalize(per.mean(1), dim=-1))
    b = tta.wrap(tiny_clip(), "watt", ref_eval=True)
    torch.testing.assert_close(b.eval_text, clip_text.classifier_text(m, ["a photo of a {}"]))
    assert a.steps == 2 and a.rounds == 5 and a.episodic and a.optimizer.defaults["lr"] == 1e-3


def _reference_clipartt(m, x, class_text, iters, k, lr):
    """CLIPArTT from the spec's steps: no-grad top-K, caption strings through the text tower, the loss."""
    params = [p for _, p in NormAffine()(m)]
    m.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    scale, loss = m.logit_scale.exp(), None
    for _ in range(iters):
        with torch.no_grad():
            top = (100 * m.encode_image(x) @ class_text.t()).softmax(1).topk(k, 1).indices
            captions = ["a photo of a " + " or ".join(m.classnames[c] for c in row) for row in top.tolist()]
            u = F.normalize(m.text(m.tokenizer(captions)), dim=-1)
        loss = _reference_loss(m, x, u, scale)
        loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return scale * m.encode_image(x) @ class_text.t(), loss.item()


def test_clipartt_matches_a_line_by_line_reference():
    x = _x(8)
    classes = ("cat", "dog", "ship", "car")
    a = tta.wrap(tiny_clip(classes=classes), "clipartt", steps=3)
    _spread(a.class_text, _visual_features(a.model, x))
    out = a(x)
    ref, last_loss = _reference_clipartt(tiny_clip(classes=classes), x, a.class_text.clone(), 3, 3, 1e-3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    assert a.last["loss"] == pytest.approx(last_loss, rel=1e-5)
    assert (out - tiny_clip(classes=classes)(x).detach()).abs().max() > 1e-4
    assert a.k == 3 and a.steps == 3 and a.optimizer.defaults["lr"] == 1e-3


def test_clipartt_prompt_has_no_period_by_default():
    m = tiny_clip()
    a = tta.wrap(m, "clipartt")
    torch.testing.assert_close(a.class_text, clip_text.classifier_text(m, ["a photo of a {}"]))
    assert a.captions.template == "a photo of a {}" and a.steps == 10 and a.episodic


def test_clipartt_skip_saturated_drops_images_whose_top_probability_is_one():
    x = _x(6)
    m = tiny_clip()
    m.logit_scale.fill_(math.log(1e6))  # every prediction saturates in float32
    a = tta.wrap(m, "clipartt", steps=2, skip_saturated=True)
    _spread(a.class_text, _visual_features(m, x))
    before = wa.snapshot(a.params)
    a(x)
    assert a.counters["empty"] == 2 and a.counters["steps"] == 0 and torch.equal(wa.snapshot(a.params), before)
    b = tta.wrap(copy.deepcopy(m), "clipartt", steps=2)  # default: every image keeps its caption
    b(x)
    assert b.counters["steps"] == 2


def _setups():
    def watt(m):
        a = tta.wrap(m, "watt", rounds=2, lr=1e-2)
        f = _visual_features(m, _x(8))
        for t, text in enumerate(a.template_text):
            _spread(text, f, shift=t % 5)
        return a

    def clipartt(m):
        a = tta.wrap(m, "clipartt", steps=3, lr=1e-2)
        _spread(a.class_text, _visual_features(m, _x(8)))
        return a
    return {"watt": watt, "clipartt": clipartt}


@pytest.mark.parametrize("name", ["watt", "clipartt"])
def test_end_to_end_reset_is_exact_rerun_identical_and_only_visual_norms_move(name):
    m = tiny_clip(classes=("cat", "dog", "ship", "car"))
    text_before = {k: v.clone() for k, v in m.text.state_dict().items()}
    source = {k: v.clone() for k, v in m.state_dict().items()}
    a = _setups()[name](m)
    optim0 = copy.deepcopy(a.optimizer.state_dict())
    assert a.param_names and all(n.startswith("visual.") and ("ln" in n.split(".")[-2]) for n in a.param_names)
    x = _x(8)
    out = a(x)
    assert out.shape == (8, 4) and torch.isfinite(out).all()
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, source[k])}
    assert changed and changed <= set(a.param_names)
    assert all(torch.equal(v, text_before[k]) for k, v in m.text.state_dict().items())
    assert a.optimizer.state  # Adam moments exist after the batch
    a.reset()
    assert all(torch.equal(v, source[k]) for k, v in m.state_dict().items())
    assert not a.optimizer.state and a.optimizer.state_dict() == optim0
    assert torch.equal(a(x), out)
    assert torch.equal(a(x), out)  # episodic: the same batch again gives the same prediction
    b = _setups()[name](tiny_clip(classes=("cat", "dog", "ship", "car")))
    assert torch.equal(b(x), out)  # a fresh adapter, same seed: identical


@pytest.mark.parametrize("name", ["watt", "clipartt"])
def test_online_option_carries_the_weights_to_the_next_batch(name):
    m = tiny_clip(classes=("cat", "dog", "ship", "car"))
    a = _setups()[name](m)
    a.episodic = False
    x = _x(8)
    first = a(x)
    assert not torch.equal(a(x), first)
    a.reset()
    assert torch.equal(a(x), first)


@pytest.mark.parametrize("name, options, match", [
    ("watt", {"mode": "both"}, "mode"),
    ("watt", {"rounds": 0}, "rounds"),
    ("watt", {"targets": "columns"}, "targets"),
    ("watt", {"templates": "watt9"}, "templates"),
    ("clipartt", {"k": 4}, "k must be"),
    ("clipartt", {"temperature": 0.0}, "temperature"),
    ("clipartt", {"template": "a photo"}, "'{}'"),
])
def test_bad_options_are_one_clear_error(name, options, match):
    with pytest.raises(ConfigError, match=match):
        tta.wrap(tiny_clip(), name, **options)


@pytest.mark.parametrize("name", ["watt", "clipartt"])
def test_a_non_clip_model_is_one_clear_error(name):
    with pytest.raises(ConfigError, match="CLIP zero-shot classifier"):
        tta.wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LayerNorm(3072)), name)


def test_registry_metadata():
    for name, grad in (("watt", 80), ("clipartt", 10)):
        info = tta.methods.info(name)
        assert info.cost.grad == grad and info.cost.backward == grad and info.cost.params == "affine"
        assert "LayerNorm" in info.adapts


@pytest.mark.parametrize("name", ["watt", "clipartt"])
def test_a_resnet_clip_adapts_its_batch_norms_under_batch_statistics_and_resets(name):
    from tta.models import clip
    cfg = clip.tiny_config()
    cfg["vision_cfg"] = {"image_size": 32, "layers": [1, 1, 1, 1], "width": 16, "patch_size": None}
    torch.manual_seed(0)
    m = clip.load("tta-test-tiny-rn/none", model_config=cfg, classes=["cat", "dog", "ship"], templates=["a {}."])
    source = {k: v.clone() for k, v in m.state_dict().items()}
    a = tta.wrap(m, name, steps=1, **({"rounds": 1} if name == "watt" else {}))
    modules = dict(m.named_modules())
    assert a.param_names and a.batch_stats
    assert all(isinstance(modules[n.rsplit(".", 1)[0]], torch.nn.BatchNorm2d) for n in a.param_names)
    out = a(_x(8))
    assert out.shape == (8, 3) and torch.isfinite(out).all()
    a.reset()
    assert all(torch.equal(v, source[k]) for k, v in m.state_dict().items())
    assert torch.equal(a(_x(8)), out)
