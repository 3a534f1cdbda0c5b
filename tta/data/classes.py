"""ImageNet class facts used to read ImageNet variants (``imagenet_meta.json`` next to this file).

Classifiers trained on ImageNet-1k number their 1,000 outputs by sorted WordNet id. ImageNet-A and
ImageNet-R cover 200 of those classes, so their models are scored on the logits of those 200 only (the
evaluation code released with each data set); ImageNet-D109 covers 109 (the DomainNet classes exactly one
ImageNet class maps to). ImageNet-V2's folders are named by ImageNet index but are listed, and labelled by
``ImageFolder``, in string order (0, 1, 10, 100, ...). These lists are facts about the data sets, kept as
data so that a reviewer can check them against the sources; :func:`logit_indices` is what a model wrapper
or a CLIP class list needs.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, Optional

import torch
from torch import nn

from ..errors import ConfigError

_META = Path(__file__).with_name("imagenet_meta.json")
SUBSETS = ("imagenet_a", "imagenet_r", "imagenet_d109")


@lru_cache(maxsize=None)
def meta() -> dict:
    return json.loads(_META.read_text())


def __getattr__(name):
    if name == "IMAGENET_WNIDS":
        return meta()["wnids"]
    raise AttributeError(name)


def wnid_to_index() -> Dict[str, int]:
    return {w: i for i, w in enumerate(meta()["wnids"])}


def logit_indices(dataset: str) -> Optional[List[int]]:
    """ImageNet-1k output indices a data set is scored on, in its label order; None for all 1,000."""
    if dataset in SUBSETS:
        return list(meta()[dataset])
    if dataset in ("imagenet", "imagenet_val", "imagenet_v2", "imagenet_sketch", "imagenet_c"):
        return None
    raise ConfigError(f"{dataset!r} is not an ImageNet variant; known: imagenet_val, imagenet_a, imagenet_r, "
                      "imagenet_v2, imagenet_sketch, imagenet_d109")


def v2_folder_order() -> List[int]:
    """ImageNet index of each ImageNet-V2 folder in string-sorted folder order (ImageFolder's labels)."""
    return list(meta()["imagenet_v2_folder_order"])


def restrict_outputs(model, indices: List[int]):
    """A 1,000-class ImageNet model scored on a subset of classes (ImageNet-A/R/D109): ``logits[:, indices]``.

    The model's final 1,000-way ``nn.Linear`` is replaced by one holding only the rows of ``indices`` - the
    same logits as masking the output, but the classifier stays the model's last layer, so methods that
    split the model into features and classifier (``tta.models.split``) and methods that read the number of
    classes see a ``len(indices)``-class model. A model without exactly one such layer is wrapped instead
    (output masking).
    """
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == 1000]
    idx = torch.as_tensor(indices, dtype=torch.long)
    if len(heads) != 1:
        return SubsetLogits(model, indices)
    name, head = heads[0]
    new = nn.Linear(head.in_features, len(idx), bias=head.bias is not None,
                    device=head.weight.device, dtype=head.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(head.weight[idx])
        if head.bias is not None:
            new.bias.copy_(head.bias[idx])
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    setattr(parent, name.rsplit(".", 1)[-1], new)
    return model


class SubsetLogits(nn.Module):
    """``model(x)[:, indices]``: the fallback of :func:`restrict_outputs` when no single classifier layer is found."""

    def __init__(self, model: nn.Module, indices: List[int]):
        super().__init__()
        self.model = model
        self.register_buffer("indices", torch.as_tensor(indices, dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).index_select(1, self.indices)
