"""torchvision and timm classifiers, wrapped so they take [0, 1] images like every model here.

Why a wrapper: both libraries expect callers to normalise inputs with the statistics the weights
were trained with (ImageNet mean/std for most, 0.5/0.5 for many timm ViTs). Reading those from the
weights' own metadata and putting them inside the model (:class:`~tta.models.common.Normalized`)
removes a silent source of wrong accuracies.

Offline use: downloads go through the libraries' own caches (torch hub ``checkpoints`` folder for
torchvision and timm URL weights, the Hugging Face hub cache for timm HF weights). When a download
fails the error names the file, the folder to put it in, and that ``checkpoint=<file>`` works too.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Optional, Sequence, Tuple
from urllib.parse import urlparse

import torch
from torch import nn

from ..errors import ConfigError, MissingFileError
from .common import IMAGENET_MEAN, IMAGENET_STD, Normalized


def _unknown(kind: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=6, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    return ConfigError(f"unknown {kind} model {name!r}{hint}")


def is_download_failure(exc: BaseException) -> bool:
    """Whether an exception (or one it was raised from) is a failed fetch rather than a bug.

    Offline, urllib raises ``URLError``, requests/huggingface_hub raise ``OSError`` subclasses and
    httpx/gdown raise their own classes, recognised by name so none of them needs importing.
    """
    names = {"FileURLRetrievalError", "LocalEntryNotFoundError", "ConnectError", "ConnectTimeout",
             "OfflineModeIsEnabled"}
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) or type(exc).__name__ in names:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def short_error(exc: BaseException) -> str:
    """``Type: first line`` of an exception, to quote a cause without its traceback."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__


def read_state_dict(path) -> dict:
    """Tensors of a checkpoint file: a plain state dict, or one under ``state_dict``/``model``.

    Loaded with ``weights_only=True`` (no arbitrary unpickling); ``module.`` prefixes left by
    ``DataParallel`` are removed. ``.safetensors`` files are read with safetensors.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise MissingFileError(f"checkpoint file {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def _load_into(net: nn.Module, path) -> None:
    result = net.load_state_dict(read_state_dict(path), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConfigError(f"checkpoint {path} does not match the architecture: missing keys "
                          f"{result.missing_keys[:5]}, unexpected keys {result.unexpected_keys[:5]}")


# --------------------------------------------------------------------------- torchvision
def _torchvision_weights(name: str, weights):
    """The weights enum member for ``weights`` ("DEFAULT", a tag such as "IMAGENET1K_V1", or a member)."""
    from torchvision.models import get_model_weights

    if weights is None:
        return None
    try:
        enum = get_model_weights(name)
    except (ValueError, KeyError):
        raise ConfigError(f"torchvision model {name!r} has no pretrained weights; use weights=None") from None
    if isinstance(weights, enum):
        return weights
    tag = str(weights).split(".")[-1]
    try:
        return enum[tag]
    except KeyError:
        raise ConfigError(f"unknown weights {weights!r} for torchvision {name!r}; expected one of "
                          f"{['DEFAULT'] + [w.name for w in enum]}, None or a checkpoint path") from None


def torchvision_weight_file(name: str, weights="DEFAULT") -> Path:
    """Where torchvision keeps (and looks for) the file of ``name``'s ``weights``: torch hub's checkpoints."""
    w = _torchvision_weights(name, weights)
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(w.url).path)


def _torchvision_stats(w) -> Tuple[Sequence[float], Sequence[float]]:
    if w is not None:
        try:
            t = w.transforms()
            if getattr(t, "mean", None) is not None and getattr(t, "std", None) is not None:
                return tuple(t.mean), tuple(t.std)
        except Exception:  # non-classification presets: fall back to ImageNet statistics
            pass
    return IMAGENET_MEAN, IMAGENET_STD


def _is_path(weights) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return isinstance(weights, str) and (os.sep in weights or "/" in weights or
                                         weights.endswith((".pth", ".pt", ".bin", ".safetensors")))


def load_torchvision(name: str, weights="DEFAULT", checkpoint=None, num_classes: Optional[int] = None,
                     mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> nn.Module:
    """A ``torchvision.models`` classifier with its input normalisation inside.

    Args:
        name: e.g. ``"resnet50"`` (see ``torchvision.models.list_models()``).
        weights: ``"DEFAULT"``, a tag (``"IMAGENET1K_V1"``), ``None`` (random init), or a checkpoint
            path (same as ``checkpoint=``).
        checkpoint: local state-dict file loaded instead of any download. Mean/std then come
            from the model's DEFAULT weights metadata when it has some (ImageNet statistics otherwise).
        num_classes: classifier size for randomly initialised / checkpoint models.
        mean, std: override the normalisation statistics.
    """
    import torchvision.models as tvm

    if name not in tvm.list_models():
        raise _unknown("torchvision", name, tvm.list_models())
    if _is_path(weights):
        checkpoint, weights = weights, None
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        try:
            meta = _torchvision_weights(name, "DEFAULT")
        except ConfigError:
            meta = None
        net = tvm.get_model(name, weights=None, **kwargs)
        _load_into(net, checkpoint)
        w = meta
    else:
        w = _torchvision_weights(name, weights)
        if w is not None and num_classes is not None and num_classes != len(w.meta.get("categories") or []):
            raise ConfigError(f"num_classes={num_classes} does not match {name} {w.name} weights")
        try:
            net = tvm.get_model(name, weights=w, **({} if w is not None else kwargs))
        except Exception as exc:
            if w is None or not is_download_failure(exc):
                raise
            target = torchvision_weight_file(name, w)
            if target.exists() and target.stat().st_size == 0:
                target.unlink()
            raise MissingFileError(
                f"torchvision weights {name} {w.name} could not be downloaded ({short_error(exc)}): place "
                f"{target.name} (from {w.url}) in {target.parent} (torch hub checkpoints, set by "
                f"TORCH_HOME), or pass checkpoint=<file>") from None
    m, s = _torchvision_stats(w)
    return Normalized(net, mean if mean is not None else m, std if std is not None else s).eval()


# --------------------------------------------------------------------------- timm
def _hf_cache() -> str:
    try:
        from huggingface_hub import constants
        return str(constants.HF_HUB_CACHE)
    except Exception:  # pragma: no cover - huggingface_hub is a timm dependency
        return "~/.cache/huggingface/hub"


def _fetch_hf_weights(name: str, cfg) -> str:
    """Path of ``name``'s weights file from the Hugging Face hub (cache first, then download).

    Why not let timm do it: timm 1.0.9 (pinned by robustbench) imports names that huggingface_hub
    >= 1.0 removed and then refuses every HF-hosted weight. Fetching the file here and handing it
    to timm as ``pretrained_cfg_overlay={"file": ...}`` keeps timm's own checkpoint filtering.
    """
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    repo, _, revision = cfg.hf_hub_id.partition("@")
    files = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
    for filename in files:  # cache first: no network round trip (nor retries) when the file is there
        try:
            return huggingface_hub.hf_hub_download(repo, filename, revision=revision or None,
                                                   local_files_only=True)
        except Exception:
            pass
    for i, filename in enumerate(files):
        try:
            return huggingface_hub.hf_hub_download(repo, filename, revision=revision or None)
        except Exception as exc:
            remote_absent = isinstance(exc, EntryNotFoundError) and not isinstance(exc, LocalEntryNotFoundError)
            if remote_absent and i + 1 < len(files):
                continue  # the repo has no such file: try the next name
            if not (remote_absent or is_download_failure(exc)):
                raise
            raise MissingFileError(
                f"timm pretrained weights for {name!r} could not be downloaded ({short_error(exc)}). They are "
                f"file {files[0]} of Hugging Face repo {repo} (https://huggingface.co/{repo}); either pass "
                f"checkpoint=<that file>, or copy the hub cache folder models--{repo.replace('/', '--')} into "
                f"{_hf_cache()} (set by HF_HOME).") from None
    raise AssertionError("unreachable")


def load_timm(name: str, pretrained: bool = True, checkpoint=None, num_classes: Optional[int] = None,
              mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None) -> nn.Module:
    """A ``timm`` model with the normalisation of its pretrained config inside.

    Args:
        name: architecture, optionally with a weights tag: ``"resnet50"``, ``"vit_base_patch16_224.augreg_in1k"``.
        pretrained: use the tag's weights (Hugging Face hub cache, else download; URL-hosted weights
            go through timm/torch hub as usual).
        checkpoint: local state-dict file used instead of any download (``pretrained`` is then
            ignored), read by :func:`read_state_dict` and loaded strictly.
        num_classes: replace the classifier size (pretrained heads of another size are dropped by timm).
        mean, std: override the statistics read from ``model.pretrained_cfg``.
    """
    import timm
    import timm.models

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # known architecture, unknown weights tag
        arch = name.split(".")[0]
        raise _unknown("timm", name, timm.list_pretrained(arch + ".*")) from None
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise MissingFileError(f"checkpoint file {path} for timm {name!r} not found")
        net = timm.create_model(name, pretrained=False, **kwargs)
        _load_into(net, path)
    elif pretrained and cfg is not None and cfg.hf_hub_id and not cfg.custom_load:
        overlay = {"file": _fetch_hf_weights(name, cfg)}
        net = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    else:
        try:
            net = timm.create_model(name, pretrained=pretrained, **kwargs)
        except Exception as exc:
            if not (pretrained and is_download_failure(exc)):
                raise
            where = ""
            if cfg is not None and cfg.url:
                from timm.models._hub import get_cache_dir
                where = (f": place {os.path.basename(urlparse(cfg.url).path)} (from {cfg.url}) in "
                         f"{get_cache_dir()}")
            raise MissingFileError(
                f"timm pretrained weights for {name!r} could not be downloaded ({short_error(exc)}){where}; "
                f"or pass checkpoint=<state dict file>") from None
    data_cfg = timm.data.resolve_data_config({}, model=net)
    m = mean if mean is not None else tuple(data_cfg.get("mean", IMAGENET_MEAN))
    s = std if std is not None else tuple(data_cfg.get("std", IMAGENET_STD))
    return Normalized(net, m, s).eval()


__all__ = ["load_torchvision", "load_timm", "torchvision_weight_file", "read_state_dict"]
