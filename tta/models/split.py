"""The encoder/classifier split that feature-space methods need (LAME, RMT, SANTA, AdaContrast, PeTTA).

``encoder, classifier = split(model)``: ``classifier(encoder(x)) == model(x)`` for every family tta
loads. The classifier is the model's own last layer (the same module object, so adapting the model
adapts it); the encoder is everything before it, normalisation included:

* open_clip zero-shot classifiers: the normalised image embedding, then ``scale * u @ text.T``;
* timm models: ``get_classifier()`` (the features are ``forward_head(..., pre_logits=True)``);
* everything else by the name of its last layer: ``linear`` (CIFAR ResNets), ``fc`` (torchvision and
  RobustBench ResNets/WRNs), ``heads`` (torchvision ViT), ``classifier`` (RobustBench ResNeXt,
  torchvision EfficientNet/MobileNet), ``head``; the shallowest such module is the classifier.

The encoder runs the whole model and reads the classifier's input with a forward hook, so no forward
is re-implemented per architecture and none of the model's code paths change; the classifier's few
multiply-adds run once more when a caller applies it again (``encoder.with_logits`` returns both from
one pass). The first pass checks that the model's output is the classifier's output, so a layout where
something follows the chosen layer is one clear error instead of wrong features.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import nn

from ..errors import ConfigError

HEAD_NAMES = ("linear", "fc", "heads", "head", "classifier")


class Encoder(nn.Module):
    """The part of ``model`` before ``head``. The model is held but not registered as a submodule, so an
    encoder stored on another module does not duplicate the model's parameters in its state dict."""

    def __init__(self, model: nn.Module, head: nn.Module, head_name: str):
        super().__init__()
        object.__setattr__(self, "model", model)
        object.__setattr__(self, "head", head)
        self.head_name = head_name
        self._checked = False

    def with_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` of one forward of the model."""
        seen: List[torch.Tensor] = []

        def grab(module, inputs, output):
            seen[:] = [inputs[0], output]

        handle = self.head.register_forward_hook(grab)
        try:
            logits = self.model(x)
        finally:
            handle.remove()
        if not self._checked:
            if not seen or seen[1] is not logits:
                raise ConfigError(f"cannot split {type(self.model).__name__} into encoder and classifier: "
                                  f"its output is not the output of its last layer {self.head_name!r}")
            self._checked = True
        return seen[0], logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.with_logits(x)[0]

    def extra_repr(self) -> str:
        return f"{type(self.model).__name__} up to {self.head_name!r}"


class _ClipEncoder(nn.Module):
    """A CLIP zero-shot classifier's normalised image embedding (its 'features')."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)

    def with_logits(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        u = self.model.encode_image(x)
        return u, self.model.logits_from_features(u)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(x)


class _ClipHead(nn.Module):
    """``exp(logit_scale) * u @ text_features.T`` of a CLIP zero-shot classifier."""

    def __init__(self, model: nn.Module):
        super().__init__()
        object.__setattr__(self, "model", model)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.model.logits_from_features(u)


def _timm_head(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    if not (callable(getattr(model, "get_classifier", None)) and hasattr(model, "forward_head")):
        return None
    head = model.get_classifier()
    if isinstance(head, nn.Identity) or not any(True for _ in head.parameters()):
        raise ConfigError(f"the timm model {type(model).__name__} has no classifier (num_classes=0?)")
    name = next((n for n, m in model.named_modules() if m is head), "")
    return name, head


def _named_head(model: nn.Module) -> Optional[Tuple[str, nn.Module]]:
    """The shallowest module called one of HEAD_NAMES that holds parameters; inside a timm model
    wrapped by a normaliser, the timm rule applies to the inner model."""
    for name, m in model.named_modules():
        found = _timm_head(m) if m is not model else None
        if found:
            return (f"{name}.{found[0]}" if found[0] else name), found[1]
    found = [(name.count("."), name, m) for name, m in model.named_modules()
             if name.rsplit(".", 1)[-1] in HEAD_NAMES and any(True for _ in m.parameters())]
    if not found:
        return None
    _, name, m = min(found, key=lambda t: t[0])
    return name, m


def split(model: nn.Module) -> Tuple[nn.Module, nn.Module]:
    """``(encoder, classifier)`` of ``model`` (see the module docstring); an unknown layout is a ConfigError."""
    if callable(getattr(model, "logits_from_features", None)) and callable(getattr(model, "encode_image", None)):
        return _ClipEncoder(model), _ClipHead(model)
    found = _timm_head(model) or _named_head(model)
    if found is None:
        raise ConfigError(f"cannot split {type(model).__name__} into encoder and classifier: no timm "
                          f"classifier and no final layer named one of {', '.join(HEAD_NAMES)}; wrap the model "
                          "so that its last layer has one of these names")
    name, head = found
    return Encoder(model, head, name), head



__all__ = ["split", "Encoder", "HEAD_NAMES"]
