"""A tiny randomly initialised open_clip classifier for the CLIP tests (built once, copied per test)."""
import copy
import functools

import torch

from tta.models import clip


@functools.lru_cache(maxsize=None)
def _template(classes: tuple, templates: tuple):
    torch.manual_seed(0)
    return clip.load("tta-test-tiny/none", model_config=clip.tiny_config(), classes=list(classes),
                     templates=list(templates))


def tiny_clip(classes=("cat", "dog", "ship"), templates=("a photo of a {}.",)):
    return copy.deepcopy(_template(tuple(classes), tuple(templates)))
