import pytest
import torch
import torch.nn.functional as F

import tta
from tta.errors import ConfigError, MissingFileError
from tta.models import clip
from tta.parts.params import NormAffine

from clip_helpers import tiny_clip


def test_logits_are_scaled_cosines_on_any_image_size():
    m = tiny_clip()
    x = torch.rand(5, 3, 40, 48)
    logits = m(x)
    assert logits.shape == (5, 3)
    u = F.normalize(m.visual((clip.resize_center_crop(x, 32) - m.mean) / m.std), dim=-1)
    torch.testing.assert_close(logits, m.logit_scale.exp() * u @ m.text_features.T)
    assert clip.resize_center_crop(x, 32).shape == (5, 3, 32, 32)


def test_text_encoder_matches_open_clip_and_ensemble_prototypes():
    import open_clip
    m = tiny_clip(templates=("a photo of a {}.", "art of the {}."))
    tokens = m.tokenizer(["a photo of a cat.", "art of the cat."])
    oc = open_clip.create_model("tta-test-tiny")
    oc.load_state_dict({**{f"visual.{k}": v for k, v in m.visual.state_dict().items()},
                        **{k: v for k, v in m.text.state_dict().items()}}, strict=False)
    ref = oc.encode_text(tokens, normalize=True)
    torch.testing.assert_close(F.normalize(m.text(tokens), dim=-1), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.text_features[0], F.normalize(ref.mean(0), dim=0), atol=1e-5, rtol=1e-5)


def test_text_prototypes_cached_until_refresh():
    m = tiny_clip()
    calls = []
    m.text.register_forward_hook(lambda *a: calls.append(1))
    before = m.text_features.clone()
    m(torch.rand(2, 3, 32, 32))
    m(torch.rand(2, 3, 32, 32))
    assert calls == []
    with torch.no_grad():
        m.text.ln_final.bias.add_(0.5)
    torch.testing.assert_close(m.text_features, before)
    m.refresh_text()
    assert calls and not torch.allclose(m.text_features, before)


def test_text_tower_hidden_frozen_and_moved_with_the_model():
    m = tiny_clip()
    names = [n for n, _ in m.named_parameters()]
    assert names and all(n.startswith("visual.") for n in names)
    assert all(not p.requires_grad for p in m.text.parameters())
    chosen = NormAffine()(m)
    assert chosen and all(".ln" in n or n.startswith("visual.ln") for n, _ in chosen)
    m.double()
    assert all(p.dtype == torch.float64 for p in m.text.parameters())


@pytest.mark.parametrize("method", ["tent", "cliptta"])
def test_only_visual_layernorms_adapt(method):
    m = tiny_clip()
    text_before = {k: v.clone() for k, v in m.text.state_dict().items()}
    protos = m.text_features.clone()
    vis_before = {k: v.clone() for k, v in m.visual.state_dict().items()}
    a = tta.wrap(m, method, steps=2, lr=1e-2)
    assert a.param_names and all(n.startswith("visual.") and ".ln" in n or n.startswith("visual.ln")
                                 for n in a.param_names)
    a(torch.rand(6, 3, 32, 32))
    changed = {k for k, v in m.visual.state_dict().items() if not torch.equal(v, vis_before[k])}
    assert changed and changed <= {n[len("visual."):] for n in a.param_names}
    assert all(torch.equal(v, text_before[k]) for k, v in m.text.state_dict().items())
    torch.testing.assert_close(m.text_features, protos, rtol=0, atol=0)
    a.reset()
    assert all(torch.equal(v, vis_before[k]) for k, v in m.visual.state_dict().items())


def test_named_class_sets_and_templates():
    assert len(clip.class_names("cifar10")) == 10
    assert len(clip.class_names("cifar100")) == 100
    assert len(clip.class_names("imagenet")) == 1000
    assert len(clip.prompt_templates("ensemble")) == 80
    with pytest.raises(ConfigError):
        clip.prompt_templates(["no placeholder"])
    with pytest.raises(ConfigError):
        clip.class_names("cifar11")


def test_offline_download_failure_is_one_clear_error(monkeypatch, tmp_path):
    import open_clip.pretrained as ocp

    def offline(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(ocp, "download_pretrained", offline)
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    with pytest.raises(MissingFileError, match=r"ViT-B-16/openai.*ViT-B-16\.pt.*checkpoint="):
        tta.models.load("openclip:ViT-B-16/openai")
    with pytest.raises(ConfigError, match="no pretrained weights"):
        clip.load("ViT-B-16/not-a-tag")


def test_local_checkpoint_is_loaded(tmp_path):
    import open_clip
    torch.manual_seed(1)
    oc = open_clip.create_model("tta-test-tiny")
    torch.save(oc.state_dict(), tmp_path / "w.pt")
    m = clip.load("tta-test-tiny/none", checkpoint=str(tmp_path / "w.pt"), model_config=clip.tiny_config())
    torch.testing.assert_close(m.visual.conv1.weight, oc.visual.conv1.weight)
    assert m.num_classes == 10
    with pytest.raises(MissingFileError):
        clip.load("tta-test-tiny/none", checkpoint=str(tmp_path / "missing.pt"))
