"""Parameter selectors: which tensors a method adapts. Each returns ``[(name, parameter), ...]`` in module order."""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from torch import nn

from ..errors import ConfigError

NamedParams = List[Tuple[str, nn.Parameter]]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
NORMS = BATCH_NORMS + (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def norm_layers(model: nn.Module, kinds=NORMS) -> List[Tuple[str, nn.Module]]:
    """Norm modules of ``model`` (including timm's/open_clip's LayerNorm subclasses)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]


class NormAffine:
    """Affine weight and bias of every norm layer, minus the modules matched by ``skip`` (regexes on names)."""

    def __init__(self, skip: Optional[Sequence[str]] = None, kinds=NORMS):
        self.skip = list(skip or [])
        self.kinds = kinds

    def __call__(self, model: nn.Module) -> NamedParams:
        skip = [re.compile(p) for p in self.skip]
        out = []
        for name, m in norm_layers(model, self.kinds):
            if any(p.search(name) for p in skip):
                continue
            for pname in ("weight", "bias"):
                p = getattr(m, pname, None)
                if isinstance(p, nn.Parameter):
                    out.append((f"{name}.{pname}" if name else pname, p))
        if not out:
            raise ConfigError("the parameter selector found no norm-layer affine parameters to adapt "
                              f"(skip rules: {self.skip or 'none'}); this model has no BN/LN/GN affine weights")
        return out

    def __repr__(self):
        return f"NormAffine(skip={self.skip})"


class AllParams:
    """Every floating-point parameter (CoTTA adapts all weights and biases)."""

    def __call__(self, model: nn.Module) -> NamedParams:
        return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]

    def __repr__(self):
        return "AllParams()"


class OwnParameter:
    """One named parameter of the model (TPT's prompt ``ctx``, TPS's ``shift``). A class, not a lambda, so an
    adapter pickles: the runner checkpoints adapters between domains."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, model: nn.Module) -> NamedParams:
        return [(self.name, getattr(model, self.name))]

    def __repr__(self):
        return f"OwnParameter({self.name!r})"


class NoParams:
    """Nothing is adapted by gradient (source, norm)."""

    def __call__(self, model: nn.Module) -> NamedParams:
        return []

    def __repr__(self):
        return "NoParams()"


def reclass_table(mixin: type, prefix: str, module_name: str) -> Dict[type, type]:
    """One ``mixin``-first subclass per BN class (``prefix + class name``), for norm modes that swap a BN
    layer's class so its state-dict keys stay (alpha mixing, robust BN, grouped alpha). The classes are made
    at import and put in ``module_name``'s namespace, so unpickling in a fresh process finds them by name."""
    import sys
    table = {cls: type(f"{prefix}{cls.__name__}", (mixin, cls), {"__module__": module_name}) for cls in BATCH_NORMS}
    vars(sys.modules[module_name]).update({c.__name__: c for c in table.values()})
    return table


def freeze_all_but(model: nn.Module, named: Iterable[Tuple[str, nn.Parameter]]) -> None:
    """``requires_grad`` only on the chosen parameters, so backward stops at the first of them."""
    chosen = {id(p) for _, p in named}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)


Selector = Callable[[nn.Module], NamedParams]


# ------------------------------------------------------------------------------------ skip the top
# SAR and DeYO leave the norm layers of the top of the network alone (their official code freezes
# ResNet layer4 and ViT blocks 9-11 + the final norm, METHODS.md 3.4/3.5). "The top" depends on the
# layout, so each rule below recognises one layout by its module names (matched on the name suffix,
# so a ``Normalized`` wrapper's ``net.`` prefix or any other parent does not matter) and returns the
# names of the modules that form its top.
Modules = Dict[str, nn.Module]


def _siblings(modules: Modules, name: str) -> Tuple[str, Modules]:
    """The parent prefix of ``name`` and the direct children of that parent, by short name."""
    prefix = name[: name.rfind(".") + 1]
    kids = {n[len(prefix):]: m for n, m in modules.items()
            if n.startswith(prefix) and n != prefix[:-1] and "." not in n[len(prefix):] and n}
    return prefix, kids


def _numbered(modules: Modules, container: str, stem: str = "") -> List[str]:
    """Children ``<container>.<stem><i>`` in index order."""
    pat = re.compile(re.escape(container + "." + stem) + r"(\d+)$")
    found = [(int(m.group(1)), n) for n in modules if (m := pat.match(n))]
    return [n for _, n in sorted(found)]


def _last_quarter(blocks: List[str]) -> List[str]:
    """The top quarter of a transformer's blocks: 9-11 of ViT-B's 12, as the SAR/DeYO authors skip."""
    return blocks[len(blocks) - max(1, round(len(blocks) / 4)):]


def _stage_rule(last: str, earlier: Sequence[str], final_norm: Optional[str] = None):
    """Convolutional nets with named stages: the last stage (plus a final norm layer when it has one)."""
    def rule(modules: Modules) -> Optional[List[str]]:
        for name in modules:
            if name.rsplit(".", 1)[-1] != last:
                continue
            prefix, kids = _siblings(modules, name)
            if all(e in kids for e in earlier):
                extra = [prefix + final_norm] if final_norm and isinstance(kids.get(final_norm), NORMS) else []
                return [name] + extra
        return None
    return rule


def _timm_vit(modules: Modules) -> Optional[List[str]]:
    for name in modules:
        if name.rsplit(".", 1)[-1] == "blocks" and _numbered(modules, name):
            prefix, kids = _siblings(modules, name)
            norms = [prefix + k for k in ("norm", "fc_norm") if isinstance(kids.get(k), NORMS)]
            return _last_quarter(_numbered(modules, name)) + norms
    return None


def _torchvision_vit(modules: Modules) -> Optional[List[str]]:
    for name in modules:
        if name == "encoder.layers" or name.endswith(".encoder.layers"):
            blocks = _numbered(modules, name, "encoder_layer_")
            if blocks:
                ln = name[: -len("layers")] + "ln"
                return _last_quarter(blocks) + ([ln] if isinstance(modules.get(ln), NORMS) else [])
    return None


def _openclip_vit(modules: Modules) -> Optional[List[str]]:
    """open_clip's VisionTransformer: ``transformer.resblocks.<i>`` and the final ``ln_post``."""
    for name in modules:
        if name.endswith("transformer.resblocks") and _numbered(modules, name):
            visual = name[: -len("transformer.resblocks")]
            post = visual + "ln_post"
            return _last_quarter(_numbered(modules, name)) + ([post] if isinstance(modules.get(post), NORMS) else [])
    return None


def _torchvision_swin(modules: Modules) -> Optional[List[str]]:
    """``features.<i>`` alternates patch merging and stages; the last stage starts at its patch merging."""
    for name in modules:
        if name.rsplit(".", 1)[-1] != "features":
            continue
        stages = _numbered(modules, name)
        if not stages or not type(modules[stages[-1]][0]).__name__.startswith("SwinTransformerBlock"):
            continue
        top = stages[-2:] if type(modules[stages[-2]]).__name__.startswith("PatchMerging") else stages[-1:]
        prefix, kids = _siblings(modules, name)
        return top + ([prefix + "norm"] if isinstance(kids.get("norm"), NORMS) else [])
    return None


TOP_RULES = {
    "resnet (torchvision/timm): layer4": _stage_rule("layer4", ("layer1", "layer2", "layer3")),
    "cifar resnet: layer3": _stage_rule("layer3", ("layer1", "layer2")),
    "wide resnet: block3 + final bn1": _stage_rule("block3", ("block1", "block2"), final_norm="bn1"),
    "cifar resnext: stage_3": _stage_rule("stage_3", ("stage_1", "stage_2")),
    "timm vit: last quarter of blocks + norm": _timm_vit,
    "torchvision vit: last quarter of encoder layers + encoder.ln": _torchvision_vit,
    "torchvision swin: last stage + norm": _torchvision_swin,
    "open_clip vit: last quarter of resblocks + ln_post": _openclip_vit,
}


def top_modules(model: nn.Module) -> List[str]:
    """Names of the modules forming the top of ``model``; a ConfigError for an unknown layout."""
    modules = dict(model.named_modules())
    for rule in TOP_RULES.values():
        found = rule(modules)
        if found:
            return found
    raise ConfigError(f"no skip-the-top rule recognises {type(model).__name__} (known layouts: "
                      f"{'; '.join(TOP_RULES)}); pass skip=[regex, ...] naming the modules to leave "
                      "alone, or skip_top=False to adapt every norm layer")


class SkipTop:
    """Norm affine parameters outside the top of the network (SAR, DeYO).

    ``skip``: explicit regexes on module names, used instead of the layout rules.
    """

    def __init__(self, skip: Optional[Sequence[str]] = None):
        self.skip = None if skip is None else list(skip)

    def __call__(self, model: nn.Module) -> NamedParams:
        skip = self.skip if self.skip is not None else [f"^{re.escape(n)}(\\.|$)" for n in top_modules(model)]
        return NormAffine(skip)(model)

    def __repr__(self):
        return f"SkipTop(skip={self.skip})"


def norm_affine(skip_top: bool = False, skip: Optional[Sequence[str]] = None) -> Selector:
    """The selector a method option pair ``skip_top``/``skip`` asks for."""
    return SkipTop(skip) if skip_top or skip is not None else NormAffine()
