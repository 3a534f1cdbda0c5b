"""CLIP as a zero-shot classifier: ``load("ViT-B-16/openai", classes="cifar10")`` (METHODS.md 1.4, 3.8-3.11).

The classifier takes [0, 1] images of any size and does CLIP's preprocessing inside (shorter side
resized bicubic to the model's image size, centre crop, CLIP mean/std), so it drops into every
adapter like any other model. Only the image tower is a registered submodule: the text tower is held
aside (frozen, moved along by ``.to()``), so parameter selectors such as ``NormAffine`` see the visual
LayerNorms and nothing else, and ``state_dict`` / ``reset()`` cover exactly what adaptation can change.
Class prototypes (mean of the normalised template embeddings, re-normalised) are computed once and
cached; ``refresh_text()`` recomputes them.

Weights: a tag such as ``openai`` is looked for under ``<data_root>/models/openclip`` (the file named
in open_clip's URL, or ``<arch>-<tag>.pt``), then fetched by open_clip into that folder; offline that
fails as one :class:`MissingFileError`. ``checkpoint=<path>`` loads a local file, and ``<arch>/none``
builds a randomly initialised model (tests, ``benchmarks/tiny_clip.py``).
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, MissingFileError
from ..imageops import CLIP_MEAN, CLIP_STD, resize_center_crop  # noqa: F401 (re-exported)
from ..paths import data_root

_DATA = Path(__file__).parent


@lru_cache(maxsize=None)
def _json(name: str) -> dict:
    return json.loads((_DATA / name).read_text())


def _named_or_list(value, table: str, what: str, valid, rule: str) -> List[str]:
    """A named entry of a bundled JSON table, or a user list whose items pass ``valid``."""
    if isinstance(value, str):
        entries = _json(table)
        if value not in entries:
            raise ConfigError(f"unknown {what} {value!r}; expected a list or one of {sorted(entries)}")
        return list(entries[value])
    out = list(value)
    if not out or not all(isinstance(v, str) and valid(v) for v in out):
        raise ConfigError(f"{what} must be a non-empty list of strings{rule}")
    return out


def class_names(classes: Union[str, Sequence[str]]) -> List[str]:
    """A list of class names, or a named set: ``cifar10``, ``cifar100``, ``imagenet`` (also for ImageNet-V2 and
    -Sketch), ``imagenet_a`` / ``imagenet_r`` (their 200 classes in label order), and the CoOp sets ``caltech101``,
    ``dtd``, ``eurosat``, ``fgvc_aircraft``, ``food101``, ``flowers102``, ``oxford_pets``, ``stanford_cars``,
    ``sun397``, ``ucf101`` (names by label as in the split files, underscores as spaces; Food101, SUN397 and
    Aircraft from TPT's lists). A data set's config names its list: ``model.options.classes: imagenet_r``."""
    return _named_or_list(classes, "clip_classes.json", "classes", lambda v: True, "")


def prompt_templates(templates: Union[str, Sequence[str]]) -> List[str]:
    """``single`` ("a photo of a {}."), ``ensemble`` / ``clip80`` (the 80 ImageNet templates), ``tip7`` (Tip-Adapter's
    7), ``coop1_<data set>`` (CoOp's one template per data set, e.g. ``coop1_dtd``), or a list with ``{}``."""
    return _named_or_list(templates, "clip_templates.json", "templates", lambda v: "{}" in v,
                          " each containing '{}'")


def tiny_config(image_size: int = 32, patch_size: int = 8, width: int = 64, layers: int = 2,
                text_width: int = 64, text_layers: int = 2, context_length: int = 77,
                embed_dim: int = 64) -> dict:
    """An open_clip model config for a tiny ViT CLIP (random init in milliseconds; tests, benchmarks)."""
    return {"embed_dim": embed_dim,
            "vision_cfg": {"image_size": image_size, "layers": layers, "width": width,
                           "patch_size": patch_size, "head_width": 32},
            "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": text_width,
                         "heads": max(1, text_width // 32), "layers": text_layers}}


class TextEncoder(nn.Module):
    """open_clip's text path, split so prompt methods (TPT) can splice learned token embeddings in.

    Holds the text tower's own modules and parameters (shared with the open_clip model, not copied).
    """

    def __init__(self, clip_model: nn.Module):
        super().__init__()
        self.token_embedding = clip_model.token_embedding
        self.positional_embedding = clip_model.positional_embedding
        self.transformer = clip_model.transformer
        self.ln_final = clip_model.ln_final
        self.text_projection = clip_model.text_projection
        self.pool_type = clip_model.text_pool_type
        self.register_buffer("attn_mask", clip_model.attn_mask, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.encode_embeddings(self.token_embedding(tokens), tokens)

    def encode_embeddings(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Unnormalised text features from token embeddings ``x`` (L, D); ``tokens`` locate the EOT."""
        from open_clip.transformer import text_global_pool

        x = self.transformer(x + self.positional_embedding, attn_mask=self.attn_mask)
        x = text_global_pool(self.ln_final(x), tokens, self.pool_type)
        if isinstance(self.text_projection, nn.Linear):
            return self.text_projection(x)
        return x if self.text_projection is None else x @ self.text_projection


class ZeroShotClassifier(nn.Module):
    """``logits = exp(logit_scale) * normalize(f(x)) @ text_features.T`` on [0, 1] images of any size."""

    def __init__(self, clip_model: nn.Module, tokenizer, classnames: Sequence[str], templates: Sequence[str],
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        super().__init__()
        if not hasattr(clip_model, "token_embedding"):
            raise ConfigError(f"{type(clip_model).__name__} is not supported: only open_clip CLIP models with "
                              "the built-in text transformer (not HF/CoCa text towers)")
        self.visual = clip_model.visual
        size = self.visual.image_size
        self.image_size = size if isinstance(size, int) else int(size[0])
        object.__setattr__(self, "text", TextEncoder(clip_model).requires_grad_(False))  # hidden, frozen
        self.tokenizer = tokenizer
        self.classnames, self.templates = list(classnames), list(templates)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("logit_scale", clip_model.logit_scale.detach().clone(), persistent=False)
        self.register_buffer("text_features", torch.empty(0), persistent=False)
        self.refresh_text()

    def _apply(self, fn, recurse=True):
        """Device/dtype moves reach the hidden text tower too."""
        super()._apply(fn, recurse)
        self.text._apply(fn, recurse)
        return self

    @torch.no_grad()
    def refresh_text(self, chunk: int = 1000) -> torch.Tensor:
        """Recompute the cached class prototypes from the current text tower."""
        prompts = [t.format(c) for c in self.classnames for t in self.templates]
        tokens = self.tokenizer(prompts).to(self.mean.device)
        feats = torch.cat([F.normalize(self.text(tokens[i:i + chunk]), dim=-1) for i in range(0, len(prompts), chunk)])
        protos = F.normalize(feats.view(len(self.classnames), len(self.templates), -1).mean(1), dim=-1)
        self.text_features = protos
        return protos

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP preprocessing of [0, 1] images: :func:`resize_center_crop`, then CLIP mean/std."""
        return (resize_center_crop(x, self.image_size) - self.mean) / self.std

    def encode_image(self, x: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        feats = self.visual(self.preprocess(x))
        return F.normalize(feats, dim=-1) if normalize else feats

    def logits_from_features(self, u: torch.Tensor, text: Optional[torch.Tensor] = None,
                             scale: Optional[float] = None) -> torch.Tensor:
        """``scale * u @ text.T``; ``scale`` defaults to ``exp(logit_scale)``, ``text`` to the prototypes."""
        text = self.text_features if text is None else text
        scale = self.logit_scale.exp() if scale is None else scale
        return scale * u @ text.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits_from_features(self.encode_image(x))

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def extra_repr(self) -> str:
        return f"classes={self.num_classes}, templates={len(self.templates)}, image_size={self.image_size}"


def load(name: str, checkpoint: Optional[str] = None, *, classes: Union[str, Sequence[str]] = "cifar10",
         templates: Union[str, Sequence[str]] = "single", model_config: Optional[dict] = None,
         data_dir=None) -> ZeroShotClassifier:
    """``name = "<arch>/<tag>"`` (tag ``none`` = random init). See the module docstring for weights."""
    import open_clip

    arch, sep, tag = name.partition("/")
    if not sep or not arch or not tag:
        raise ConfigError(f"expected an open_clip name '<arch>/<pretrained>' (e.g. 'ViT-B-16/openai' or "
                          f"'<arch>/none'), got {name!r}")
    if model_config is not None:
        open_clip.factory._MODEL_CONFIGS[arch] = dict(model_config)  # open_clip's registry of configs
    elif arch not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {arch!r}; pass model_config=... for a custom one")
    pretrained_cfg = {} if tag == "none" else open_clip.get_pretrained_cfg(arch, tag)
    if checkpoint is not None:
        if not Path(checkpoint).is_file():
            raise MissingFileError(f"CLIP checkpoint {checkpoint} not found")
        weights = str(checkpoint)
    elif tag == "none":
        weights = None
    elif pretrained_cfg:
        weights = _find_weights(arch, tag, pretrained_cfg, data_root(data_dir) / "models" / "openclip")
    else:
        raise ConfigError(f"no pretrained weights {tag!r} for {arch!r}; known tags: "
                          f"{open_clip.list_pretrained_tags_by_model(arch)} (or '<arch>/none', or checkpoint=<path>)")
    model = open_clip.create_model(arch, pretrained=weights, force_quick_gelu=pretrained_cfg.get("quick_gelu", False))
    return ZeroShotClassifier(model.eval(), open_clip.get_tokenizer(arch), class_names(classes),
                              prompt_templates(templates), pretrained_cfg.get("mean", CLIP_MEAN),
                              pretrained_cfg.get("std", CLIP_STD)).eval()


def _find_weights(arch: str, tag: str, cfg: dict, folder: Path) -> str:
    """A local weights file for ``arch/tag``, or open_clip's download into ``folder``; else one clear error."""
    import open_clip.pretrained as ocp

    names = [Path(cfg["url"]).name] if cfg.get("url") else []
    names.append(f"{arch}-{tag}.pt")
    for n in names:
        if (folder / n).is_file():
            return str(folder / n)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return ocp.download_pretrained(cfg, cache_dir=str(folder))
    except Exception as e:  # offline: URL, HF hub and socket errors all end here
        source = cfg.get("url") or f"huggingface.co/{cfg.get('hf_hub', '')}"
        raise MissingFileError(
            f"open_clip weights {arch}/{tag} not found and could not be downloaded ({type(e).__name__}): "
            f"place {' or '.join(names)} in {folder}, or pass checkpoint=<path> (source: {source}; "
            f"set TTA_DATA_DIR to choose the folder)") from None


__all__ = ["load", "ZeroShotClassifier", "TextEncoder", "resize_center_crop", "tiny_config", "class_names", "prompt_templates",
           "CLIP_MEAN", "CLIP_STD"]
