"""tta: test-time adaptation of vision and vision-language models.

    adapter = tta.wrap(tta.models.load("cifar_resnet20"), "tent")
    logits = adapter(x)        # predict, then adapt on this batch
    adapter.reset()            # back to the source model, bit for bit

Submodules are imported on first use, so ``import tta`` does not pull in timm, open_clip or robustbench.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("models", "data", "methods", "parts", "eval", "config", "cli", "adapter")


def wrap(model, method: str, **overrides):
    """Wrap ``model`` in the adapter of ``method`` (see ``tta.methods.available()``)."""
    from .methods import build
    return build(model, method, **overrides)


def run(config, overrides=()):
    """Run a benchmark from a config path or dict; returns the results dict (see ``tta.eval.runner``)."""
    from .eval.runner import run_config
    return run_config(config, overrides)


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tta' has no attribute {name!r}")


__all__ = ["wrap", "run", "__version__", *_SUBMODULES]
