"""Method registry: ``register("name")`` on a function returning a :class:`~tta.adapter.Recipe`.

``build(model, name, **overrides)`` splits the overrides into the ones every method shares (optimizer,
lr, steps, episodic, seed, the fast options precision / memory_format / compile, ...) and the method's own
keyword arguments; an unknown name or key is one clear error listing what is allowed.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
import pkgutil
from dataclasses import dataclass
from typing import Callable, Dict, Optional

from ..errors import ConfigError

_REGISTRY: Dict[str, Callable] = {}
_LOADED = False

# overrides every method accepts: optimizer fields, loop options, the fast options (tta.fast)
OPTIMIZER_KEYS = ("optimizer", "lr", "momentum", "nesterov", "betas", "eps", "weight_decay")
FAST_KEYS = ("precision", "memory_format", "compile")
LOOP_KEYS = ("steps", "episodic", "seed", "validate", "postprocess") + FAST_KEYS
COMMON_KEYS = OPTIMIZER_KEYS + LOOP_KEYS


PARAM_KINDS = ("none", "affine", "all")


@dataclass(frozen=True)
class Cost:
    """The work a method needs per batch of B images, in B-image forwards: its floor (Z.16's cost column).

    ``grad``: forwards with autograd; ``backward``: backward passes; ``nograd``: forwards without autograd
    (teachers, anchors, views; 33 for TTAug's 33 views per image); ``params``: what the backward reaches
    (``affine`` norm parameters, ``all`` weights, ``none``); ``per_image``: the work is done image by image
    (per-image weights: each image's ``grad`` views get a forward and a backward of their own, and its
    ``nograd`` forwards run on it alone), as the reference does at batch size 1. ``benchmarks/throughput.py``
    times a method against exactly this much bare work on the same model.
    """
    grad: float = 0.0
    backward: int = 0
    nograd: float = 1.0
    params: str = "affine"
    per_image: bool = False  # each image's views are their own forward + backward (MEMO's per-image episodes)

    def __post_init__(self):
        if self.params not in PARAM_KINDS:
            raise ValueError(f"Cost.params must be one of {PARAM_KINDS}, got {self.params!r}")

    def __str__(self) -> str:
        fwd = self.grad + self.nograd
        return f"{fwd:g} / {self.backward}"


@dataclass(frozen=True)
class MethodInfo:
    """What ``tta methods`` and the README table say of a method."""
    name: str
    summary: str
    adapts: str
    cost: Cost
    source_data: Optional[str]  # what source data it needs (None: none)
    requires: str = "classifier"  # the model it needs: any classifier, a CLIP zero-shot classifier, a timm ViT


_INFO: Dict[str, MethodInfo] = {}


REQUIRES = ("classifier", "clip", "timm_vit")


def register(name: str, *, summary: str = "", adapts: str = "nothing", cost: Cost = Cost(),
             source_data: Optional[str] = None, requires: str = "classifier"):
    """Register a recipe function under ``name``; the keywords describe the method for ``tta methods``.
    ``requires``: ``classifier`` (any image classifier), ``clip`` (an open_clip zero-shot classifier,
    ``tta.models.load("openclip:...")``) or ``timm_vit`` (a timm Vision Transformer)."""
    if requires not in REQUIRES:
        raise ValueError(f"requires must be one of {REQUIRES}, got {requires!r}")
    def deco(fn: Callable) -> Callable:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = fn
        _INFO[name] = MethodInfo(name, summary, adapts, cost, source_data, requires)
        fn.method_name = name
        return fn
    return deco


def _load_all() -> None:
    global _LOADED
    if not _LOADED:
        for info in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{info.name}")
        _LOADED = True


def available() -> list:
    _load_all()
    return sorted(_REGISTRY)


def info(name: str) -> MethodInfo:
    """The description a method was registered with."""
    get(name)
    return _INFO[name]


def get(name: str) -> Callable:
    _load_all()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ConfigError(f"unknown method {name!r}{hint}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def method_options(name: str) -> list:
    """The keyword arguments a method accepts besides the common ones."""
    params = inspect.signature(get(name)).parameters
    return [p for p in list(params)[1:] if params[p].kind is inspect.Parameter.KEYWORD_ONLY
            or params[p].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def build(model, name: str, **overrides):
    """The adapter of method ``name`` around ``model`` (see module docstring)."""
    fn = get(name)
    own = method_options(name)
    unknown = sorted(set(overrides) - set(own) - set(COMMON_KEYS))
    if unknown:
        raise ConfigError(f"method {name!r} got unknown option(s) {unknown}; allowed: "
                          f"{', '.join(own) or '(none of its own)'}; common: {', '.join(COMMON_KEYS)}")
    recipe = fn(model, **{k: v for k, v in overrides.items() if k in own})
    opt = {("name" if k == "optimizer" else k): v for k, v in overrides.items() if k in OPTIMIZER_KEYS}
    loop = {k: v for k, v in overrides.items() if k in LOOP_KEYS}
    from ..adapter import Adapter
    cls = recipe.adapter_cls or Adapter
    adapter = cls(model, recipe, optimizer=recipe.optimizer.but(**opt), **loop, **recipe.options)
    adapter.method = name
    return adapter


__all__ = ["register", "build", "available", "get", "info", "method_options", "Cost", "MethodInfo", "COMMON_KEYS",
           "FAST_KEYS"]
