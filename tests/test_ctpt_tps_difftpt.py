"""C-TPT, TPS and DiffTPT (METHODS-VLM V.7, V.8, V.12): their formulas on hand-made tensors, then each method end
to end on the tiny random open_clip classifier (runs, finite, per-image episodic, exact reset, seeded, only the
intended tensors move, one encoder pass per batch), and DiffTPT's generator on a tiny random diffusers pipeline."""
import json
import math
import pickle
import sys
from pathlib import Path

import pytest
import torch

import tta
from tta import config
from tta.errors import ConfigError, MissingFileError
from tta.methods.ctpt import text_feature_dispersion
from tta.methods.difftpt import cosine_then_entropy
from tta.models.clip_text import classifier_text
from tta.parts.diffusion_views import build_generator, generate, load_image_variations
from tta.parts.objectives import view_marginal_entropy
from tta.parts.prototype_shift import (ShiftedPrototypes, class_prototypes, concept_prompts, descriptor_sentence,
                                       mix_prototypes, prompt_means, shift_prototypes)

from clip_helpers import tiny_clip

ROOT = Path(__file__).resolve().parents[1]
DESCRIPTORS = {"cat": ["a small feline", "whiskers", "has pointed ears"], "dog": ["often loyal", "used for herding"],
               "ship": ["a large vessel"]}


def _x(n=3, seed=0, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _noisy_copies(images, n):
    """A generator drawing from torch's global random state (as diffusers pipelines do)."""
    noise = torch.rand(len(images), n, *images.shape[1:])
    return (0.7 * images[:, None] + 0.3 * noise).clamp(0, 1)


def _small_difftpt(**kw):
    options = dict(generator=_noisy_copies, views=17, diffusion_views=15, steps=2)
    options.update(kw)
    return tta.wrap(tiny_clip(), "difftpt", **options)


# ------------------------------------------------------------------------------------------------ formulas
def test_text_feature_dispersion_by_hand():
    assert float(text_feature_dispersion(torch.eye(2))) == pytest.approx(math.sqrt(0.5))
    three = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # centroid (0, 1/3)
    expected = (2 * math.sqrt(1 + 1 / 9) + 2 / 3) / 3
    assert float(text_feature_dispersion(three)) == pytest.approx(expected)
    assert float(text_feature_dispersion(torch.ones(4, 3))) == 0.0


def test_ctpt_loss_is_marginal_entropy_minus_lambda_dispersion():
    a = tta.wrap(tiny_clip(), "ctpt", lam=7.0)
    kept = torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]])
    text = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0], [0.0, 1.0], [-1.0, 0.5]]), dim=-1)
    expected = view_marginal_entropy(kept) - 7.0 * text_feature_dispersion(text)
    torch.testing.assert_close(a.loss(kept, text), expected)


@pytest.mark.parametrize("descriptor, sentence", [
    ("a small feline", "which is a small feline"), ("antlers", "which is antlers"),  # any word starting with "a"
    ("has wings", "which has wings"), ("often red", "which often red"), ("can swim", "which can swim"),
    ("used for herding", "which is used for herding"), ("long tail", "which has long tail")])
def test_descriptor_sentence_rule(descriptor, sentence):
    assert descriptor_sentence(descriptor) == sentence


def test_concept_prompts_pair_by_name_or_position():
    by_name = concept_prompts(["dog", "cat"], DESCRIPTORS)
    assert by_name[0] == ["dog, which often loyal", "dog, which is used for herding"]
    assert by_name[1][1] == "cat, which has whiskers"
    by_position = concept_prompts(["ship", "dog", "cat"], DESCRIPTORS, pair_by="position")
    assert by_position[0][0] == "ship, which is a small feline"  # the official zip: the file's first entry
    with pytest.raises(ConfigError, match="no descriptors"):
        concept_prompts(["cat", "horse"], DESCRIPTORS)
    with pytest.raises(ConfigError, match="one descriptor entry per class"):
        concept_prompts(["cat"], DESCRIPTORS, pair_by="position")


def test_micro_and_macro_prototypes_by_hand():
    template, concept = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    torch.testing.assert_close(mix_prototypes(template, concept, "micro"), torch.tensor([[0.5, 0.5]]))
    macro = mix_prototypes(template, concept, "macro", template_count=80, concept_counts=[20])
    torch.testing.assert_close(macro, torch.tensor([[0.8, 0.2]]))


def test_shift_application_by_hand():
    protos = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    r = math.sqrt(0.5)
    per_class = shift_prototypes(protos, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    torch.testing.assert_close(per_class, torch.tensor([[r, r], [0.0, 1.0]]))
    shared = shift_prototypes(protos, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(shared, torch.tensor([[1.0, 0.0], [r, r]]))


def test_tps_prototypes_from_the_text_tower(tmp_path):
    m = tiny_clip()
    template = class_prototypes(m, "template", "tip7")
    torch.testing.assert_close(template, classifier_text(m, "tip7", per_prompt=True).mean(1))
    assert not torch.allclose(template.norm(dim=-1), torch.ones(3))  # a mean of unit vectors, not re-normalised
    concept = prompt_means(m, concept_prompts(m.classnames, DESCRIPTORS))
    (tmp_path / "d.json").write_text(json.dumps(DESCRIPTORS))
    micro = class_prototypes(m, "micro", "tip7", descriptors=tmp_path / "d.json")
    torch.testing.assert_close(micro, (template + concept) / 2)
    macro = class_prototypes(m, "macro", "tip7", descriptors=DESCRIPTORS)
    counts = torch.tensor([3.0, 2.0, 1.0]).view(-1, 1)
    torch.testing.assert_close(macro, (counts * concept + 7 * template) / (counts + 7))
    with pytest.raises(ConfigError, match="needs descriptors"):
        class_prototypes(m, "micro")
    with pytest.raises(MissingFileError, match="nope.json"):
        class_prototypes(m, "concept", descriptors=tmp_path / "nope.json")


def test_tps_starts_at_the_zero_shot_classifier_of_its_prototypes():
    m = tiny_clip()
    x = _x(2)
    with torch.no_grad():
        torch.testing.assert_close(ShiftedPrototypes(m, class_prototypes(m, "template", "single"))(x), m(x))


def test_cosine_then_entropy_by_hand():
    # view 0 the original; cosine to it in `space`: view 1 0.0, view 2 0.9, view 3 0.6, view 4 -1, view 5 0.8
    angles = torch.tensor([0.0, math.pi / 2, math.acos(0.9), math.acos(0.6), math.pi, math.acos(0.8)])
    space = torch.stack([angles.cos(), angles.sin()], 1)
    # entropies (nats): view 5 < view 3 < view 0 < view 2
    logits = torch.tensor([[2.0, 0, 1], [9.0, 0, 0], [1.0, 0, 0], [3.0, 0, 0], [0, 9.0, 0], [6.0, 0, 0]])
    # stage 1 keeps floor(0.6 * 5) = 3 most similar: 2, 5, 3; stage 2 floor(0.5 * 4) = 2 lowest entropy of {0,2,5,3}
    assert cosine_then_entropy(logits, space, 0.6, 0.5).tolist() == [5, 3]
    # logit space (official): views 1, 2, 3, 5 tie at cos 2/sqrt(5), the first three in view order are kept
    assert cosine_then_entropy(logits, logits, 0.6, 0.5).tolist() == [1, 3]
    assert cosine_then_entropy(logits[:1], space[:1], 0.8, 0.3).tolist() == [0]  # the original alone


# ------------------------------------------------------------------------------------- end to end: common
def _tensors(adapter):
    """Every parameter and buffer of the tuned module, non-persistent ones (prompt tokens, prototypes) included."""
    return {k: v.detach().clone() for k, v in [*adapter.model.named_parameters(), *adapter.model.named_buffers()]}


def _moved(adapter, before):
    return sorted(k for k, v in _tensors(adapter).items() if not torch.equal(v, before[k]))


def _text_tower(adapter):
    return {k: v.clone() for k, v in adapter.model.classifier.text.state_dict().items()}


@pytest.mark.parametrize("name, options, tuned", [
    ("ctpt", {}, "ctx"), ("ctpt", {"two_step": True}, "ctx"), ("tps", {"templates": "tip7"}, "shift"),
    ("tps", {"shift": "shared", "prototypes": "micro", "descriptors": DESCRIPTORS}, "shift"),
    ("difftpt", {"generator": _noisy_copies}, "ctx"), ("difftpt", {"generator": _noisy_copies,
                                                                   "filter_space": "logits"}, "ctx")])
def test_end_to_end_episodic_exact_reset_seeded_and_only_the_tuned_tensor_moves(name, options, tuned):
    a = tta.wrap(tiny_clip(), name, **options)
    torch.manual_seed(123)
    rng = torch.random.get_rng_state()
    source = _tensors(a)
    text = _text_tower(a)
    x = _x(3)
    out = a(x)
    assert out.shape == (3, 3) and torch.isfinite(out).all()
    assert torch.equal(torch.random.get_rng_state(), rng)  # the global random state is left alone
    assert _moved(a, source) == [tuned]  # tuned on the last image; the image tower, buffers unchanged
    assert all(torch.equal(v, text[k]) for k, v in _text_tower(a).items())
    one_by_one = torch.cat([a(x[i:i + 1]) for i in range(3)])
    torch.testing.assert_close(out, one_by_one)  # each image is its own episode, whatever its batch
    a.reset()
    assert _moved(a, source) == []
    torch.testing.assert_close(a(x), out)  # exact reset: the same run again
    b = tta.wrap(tiny_clip(), name, **options)
    assert torch.equal(b(x), out)  # same seed, same results
    restored = pickle.loads(pickle.dumps(b))  # the runner checkpoints adapters between domains
    restored.reset()
    assert torch.equal(restored(x), out)
    with torch.no_grad():
        assert not torch.equal(out, a.model.classifier(x))  # it adapted


def test_ctpt_with_zero_lambda_is_tpt_and_its_term_spreads_the_class_features():
    x = _x(1)
    tpt = tta.wrap(tiny_clip(), "tpt")
    out = tpt(x)
    assert torch.equal(tta.wrap(tiny_clip(), "ctpt", lam=0.0)(x), out)
    assert not torch.equal(tta.wrap(tiny_clip(), "ctpt", lam=50.0)(x), out)
    # AdamW's first step is a sign step of size lr: along the dispersion gradient it raises ATFD the most to first
    # order, which holds for a step small against the context vectors (|ctx| ~ 0.015 in the tiny random model)
    spread = {}
    for name in ("tpt", "ctpt"):
        a = tta.wrap(tiny_clip(), name, lr=1e-4)
        with torch.no_grad():
            spread["source"] = text_feature_dispersion(a.model.text_features())
        a(x)
        with torch.no_grad():
            spread[name] = text_feature_dispersion(a.model.text_features())
    assert spread["ctpt"] > spread["tpt"] and spread["ctpt"] > spread["source"]
    two = tta.wrap(tiny_clip(), "ctpt", two_step=True)
    two(x)
    assert two.counters["steps"] == 2  # an entropy step, then a dispersion step


def _count_encoder_calls(adapter, calls):
    encode = adapter.classifier.encode_image
    adapter.classifier.encode_image = lambda views, **kw: calls.append(len(views)) or encode(views, **kw)


def test_views_of_a_batch_are_encoded_once_and_chunking_does_not_change_results():
    a = _small_difftpt(steps=4)
    calls = []
    _count_encoder_calls(a, calls)
    x = _x(3)
    out = a(x)
    assert calls == [3 * 32]  # 17 conventional + 15 generated views per image, one forward, reused by 4 steps
    assert a.last == {"selected": int(0.3 * (1 + int(0.8 * 31))), "loss": a.last["loss"], "views": 32}
    assert a.counters["steps"] == 3 * 4
    calls.clear()
    b = _small_difftpt(steps=4, chunk=1)
    _count_encoder_calls(b, calls)
    torch.testing.assert_close(b(x), out)
    assert calls == [32, 32, 32]


def test_tps_and_ctpt_defaults_select_6_of_64_and_tps_never_runs_the_text_tower():
    a = tta.wrap(tiny_clip(), "tps", templates="single")
    a.model.classifier.text.forward = None  # any text forward would fail
    a(_x(1))
    assert a.last["selected"] == 6 and a.last["views"] == 64 and a.param_names == ["shift"]
    assert tta.wrap(tiny_clip(), "ctpt").param_names == ["ctx"]


def test_difftpt_default_schedule_and_filter_space():
    a = tta.wrap(tiny_clip(), "difftpt", generator=_noisy_copies)
    assert a.steps == 4 and a.keep == 0.3 and a.cosine_keep == 0.8 and a.filter_space == "features"
    a(_x(1))
    assert a.last["views"] == 128 and a.last["selected"] == 30  # floor(0.3 * (1 + floor(0.8 * 127)))
    logits, features = torch.randn(9, 3), torch.nn.functional.normalize(torch.randn(9, 5), dim=-1)
    assert torch.equal(a.select(logits, features), cosine_then_entropy(logits, features, 0.8, 0.3))
    b = tta.wrap(tiny_clip(), "difftpt", generator=None, diffusion_views=0, filter_space="logits")
    assert torch.equal(b.select(logits, features), cosine_then_entropy(logits, logits, 0.8, 0.3))
    b(_x(1))
    assert b.last["views"] == 65


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, options, message", [
    ("ctpt", {"lam": -1}, "lam"), ("ctpt", {"keep": 0.0}, "kept fraction"),
    ("tps", {"prototypes": "bogus"}, "prototypes must be"), ("tps", {"shift": "bogus"}, "shift must be"),
    ("tps", {"prototypes": "micro"}, "needs descriptors"), ("tps", {"pair_by": "order", "prototypes": "concept",
                                                                   "descriptors": DESCRIPTORS}, "pair_by"),
    ("difftpt", {"generator": _noisy_copies, "filter_space": "pixels"}, "filter_space"),
    ("difftpt", {"generator": None}, "diffusion_views=0"), ("difftpt", {"generator": "dalle"}, "generator must be"),
    ("difftpt", {"generator": 3}, "callable"),
    ("difftpt", {"generator": _noisy_copies, "cosine_keep": 1.5}, "fraction"),
    ("difftpt", {"generator": _noisy_copies, "chunk": 0}, "chunk")])
def test_bad_options_are_one_config_error(name, options, message):
    with pytest.raises(ConfigError, match=message):
        tta.wrap(tiny_clip(), name, **options)


@pytest.mark.parametrize("name, options", [("ctpt", {}), ("tps", {}),
                                           ("difftpt", {"generator": None, "diffusion_views": 0})])
def test_a_non_clip_model_is_one_clear_error(name, options):
    with pytest.raises(ConfigError, match="CLIP zero-shot classifier"):
        tta.wrap(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3072, 3)), name, **options)


def test_a_generator_of_the_wrong_shape_is_one_config_error():
    a = _small_difftpt(generator=lambda images, n: images)
    with pytest.raises(ConfigError, match=r"\(B, n, C, h, w\)"):
        a(_x(1))


def test_missing_stable_diffusion_weights_name_the_folder(tmp_path, monkeypatch):
    with pytest.raises(MissingFileError, match=str(tmp_path / "sd")):
        tta.wrap(tiny_clip(), "difftpt", diffusion_weights=str(tmp_path / "sd"))
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    with pytest.raises(MissingFileError, match="sd-image-variations-diffusers"):
        tta.wrap(tiny_clip(), "difftpt")


def test_missing_diffusers_is_one_error_naming_the_install(tmp_path, monkeypatch):
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError
    with pytest.raises(ConfigError, match="pip install diffusers"):
        load_image_variations(tmp_path)


def test_generate_is_seeded_and_leaves_the_global_random_state_alone():
    x = _x(2)
    state = torch.random.get_rng_state()
    a, b = generate(_noisy_copies, x, 4, seed=5), generate(_noisy_copies, x, 4, seed=5)
    assert torch.equal(a, b) and not torch.equal(a, generate(_noisy_copies, x, 4, seed=6))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert build_generator(None) is None and build_generator(_noisy_copies) is _noisy_copies


# ------------------------------------------------------------------------------------- tiny diffusers model
def _tiny_pipeline():
    """A randomly initialised Stable Diffusion image-variation pipeline with tiny UNet/VAE/CLIP-image configs."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
        layers_per_block=1)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=16, projection_dim=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
        image_size=16, patch_size=8))
    return diffusers.StableDiffusionImageVariationPipeline(
        vae=vae, image_encoder=encoder, unet=unet, scheduler=diffusers.DDIMScheduler(), safety_checker=None,
        feature_extractor=transformers.CLIPImageProcessor(crop_size=16, size=16), requires_safety_checker=False)


@pytest.mark.slow
def test_difftpt_with_a_tiny_random_stable_diffusion_pipeline(tmp_path):
    pipe = _tiny_pipeline()
    options = dict(views=5, diffusion_views=3, diffusion_steps=2, steps=2)
    a = tta.wrap(tiny_clip(), "difftpt", generator=pipe, **options)
    x = _x(2)
    out = a(x)
    assert out.shape == (2, 3) and torch.isfinite(out).all() and a.last["views"] == 8
    made = generate(a.diffusion, x[:1], 3, seed=1)
    assert made.shape == (1, 3, 3, 16, 16) and made.min() >= 0 and made.max() <= 1
    a.reset()
    torch.testing.assert_close(a(x), out)
    pipe.save_pretrained(tmp_path / "sd")
    b = tta.wrap(tiny_clip(), "difftpt", generator="sd_image_variations", diffusion_weights=str(tmp_path / "sd"),
                 **options)
    torch.testing.assert_close(b(x), out)  # the folder loader gives the same generator
    # pickled as the runner checkpoints: a generator from a folder is left out and loaded again from it
    assert b.__getstate__()["diffusion"] is None and a.__getstate__()["diffusion"] is a.diffusion
    restored = pickle.loads(pickle.dumps(b))
    assert type(restored.diffusion) is type(b.diffusion) and restored.diffusion is not b.diffusion
    restored.reset()
    torch.testing.assert_close(restored(x), out)


# ----------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("path", sorted(str(p.relative_to(ROOT)) for p in ROOT.glob("configs/*_clip/*.yaml")
                                        if p.stem in ("ctpt", "tps", "difftpt")))
def test_shipped_configs_build_on_the_tiny_model(path):
    method = dict(config.load(ROOT / path)["method"])
    name = method.pop("name")
    if name == "difftpt":
        method["generator"] = _noisy_copies
    a = tta.wrap(tiny_clip(), name, **method)
    assert a.steps == (4 if name == "difftpt" else 1) and a.optimizer.defaults["lr"] == 0.005
    assert torch.isfinite(a(_x(1))).all()
