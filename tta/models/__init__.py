"""``tta.models.load(name, ...)``: every model takes images in [0, 1] and normalises inside.

Names: ``cifar_resnet20/32/44/56`` (akamaster checkpoints), ``robustbench:<name>``,
``torchvision:<name>``, ``timm:<name>``, ``openclip:<arch>/<pretrained>``. Heavy libraries are imported
only when their family is asked for, so ``import tta`` stays fast.
"""
from __future__ import annotations

from typing import Optional

from torch import nn

from ..errors import ConfigError, MissingFileError
from ..paths import data_root
from .common import IMAGENET_MEAN, IMAGENET_STD, Normalized
from .split import split

FAMILIES = ("cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56",
            "robustbench:<name>", "torchvision:<name>", "timm:<name>", "openclip:<arch>/<pretrained>")


def load(name: str, checkpoint: Optional[str] = None, *, data_dir=None, **kwargs) -> nn.Module:
    """Build a model by name, in eval mode, on the CPU. See the module docstring for names."""
    if name.startswith("cifar_resnet"):
        if kwargs:
            raise ConfigError(f"cifar_resnet models take no options besides checkpoint/data_dir, got {sorted(kwargs)}")
        return load_cifar_resnet(name, checkpoint, data_dir=data_dir).eval()
    family, sep, rest = name.partition(":")
    if not sep or not rest:
        raise ConfigError(f"unknown model name {name!r}; expected one of: {', '.join(FAMILIES)}")
    if family == "robustbench":
        from . import robustbench
        _check_options(family, robustbench.load, kwargs, taken=("name",))
        kw = dict(kwargs)
        if data_dir is not None:
            kw.setdefault("model_dir", str(data_root(data_dir) / "models" / "robustbench"))
        return robustbench.load(rest, **kw).eval()
    if family == "torchvision":
        from . import hub
        _check_options(family, hub.load_torchvision, kwargs)
        return hub.load_torchvision(rest, checkpoint=checkpoint, **kwargs).eval()
    if family == "timm":
        from . import hub
        _check_options(family, hub.load_timm, kwargs)
        return hub.load_timm(rest, checkpoint=checkpoint, **kwargs).eval()
    if family == "openclip":
        from . import clip
        _check_options(family, clip.load, kwargs)
        return clip.load(rest, checkpoint=checkpoint, data_dir=data_dir, **kwargs).eval()
    raise ConfigError(f"unknown model family {family!r} in {name!r}; expected one of: {', '.join(FAMILIES)}")


def _check_options(family: str, loader, kwargs, taken=("name", "checkpoint", "data_dir")) -> None:
    """One clear error for a model option its family does not take (a leftover of another family's config)."""
    import inspect
    allowed = [p for p in inspect.signature(loader).parameters if p not in taken]
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise ConfigError(f"{family} models do not take the option(s) {unknown} (model.options); "
                          f"they take: {', '.join(allowed)}")


def load_cifar_resnet(name: str, checkpoint: Optional[str] = None, *, data_dir=None) -> nn.Module:
    """The akamaster CIFAR-10 ResNet with ImageNet mean/std normalisation inside (as it was trained)."""
    from .cifar_resnet import CHECKPOINT_URL, CHECKPOINTS, CifarResNet, load_state

    try:
        depth = int(name[len("cifar_resnet"):])
    except ValueError:
        depth = -1
    if depth not in CHECKPOINTS:
        raise ConfigError(f"unknown model name {name!r}; expected one of: {', '.join(FAMILIES[:4])}")
    net = CifarResNet(depth)
    if checkpoint != "none":
        path = checkpoint or _find_cifar_checkpoint(CHECKPOINTS[depth], CHECKPOINT_URL, data_dir)
        net.load_state_dict(load_state(path), strict=True)
    return Normalized(net, IMAGENET_MEAN, IMAGENET_STD)


def _find_cifar_checkpoint(filename: str, url: str, data_dir) -> str:
    root = data_root(data_dir)
    folders = [root / "models", root]
    for folder in folders:
        if (folder / filename).exists():
            return str(folder / filename)
    target = folders[0] / filename
    try:  # users with a network get the file fetched once; offline this fails fast
        import torch.hub
        target.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(url.format(filename), str(target), progress=False)
        return str(target)
    except Exception:
        target.unlink(missing_ok=True)
        raise MissingFileError(
            f"checkpoint {filename} not found and could not be downloaded: place it in {folders[0]} "
            f"(set TTA_DATA_DIR or data_dir to choose the folder; source: {url.format(filename)})") from None


__all__ = ["load", "split", "Normalized", "FAMILIES"]
