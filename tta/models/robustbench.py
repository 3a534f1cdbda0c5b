"""RobustBench model zoo access that works on current Python environments, offline-friendly.

The import shim that makes robustbench 1.1.1 importable lives in :mod:`tta._compat` (data code needs
it too, and must not import model code); it is re-exported here under its old names.

:func:`load` wraps ``robustbench.utils.load_model``: checkpoints live in robustbench's layout
``<model_dir>/<dataset>/<threat_model>/<name>.pt`` with ``model_dir`` defaulting to
``<data_root()>/models/robustbench`` (``TTA_DATA_DIR``), next to the other checkpoints the toolkit
reads, so an offline machine needs only that one folder filled in. A failed download becomes one
:class:`~tta.errors.MissingFileError` naming the file to place and where it comes from.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib  # noqa: F401  (tests patch importlib.util through this module)
import os
import pickle
from pathlib import Path
from typing import List

from .._compat import (IMAGENET_IDS_FILE, SHIM_MARKER, _autoattack_aliases, _make_pkg_resources,  # noqa: F401
                       _module_missing, _resource_filename, _shims_installed, _shims_needed, imagenet_5000_ids,
                       import_robustbench)
from ..errors import ConfigError, MissingFileError, TTAError
from ..paths import data_root
from .hub import is_download_failure, short_error, torchvision_weight_file

# ImageNet models whose weights robustbench takes from torchvision instead of its own zoo.
_TORCHVISION_WEIGHTS = {"Standard_R50": ("resnet50", "IMAGENET1K_V1")}


# --------------------------------------------------------------------------- model loading
def default_model_dir(data_dir=None) -> Path:
    """``<data_root(data_dir)>/models/robustbench``: where checkpoints are looked for by default."""
    return data_root(data_dir) / "models" / "robustbench"


def _resolve(name: str, dataset: str, threat_model: str):
    """Validate the names against robustbench's zoo; return (dataset enum, threat enum, zoo entry)."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    try:
        dataset_ = BenchmarkDataset(dataset)
    except ValueError:
        raise ConfigError(f"unknown robustbench dataset {dataset!r}; expected one of "
                          f"{[d.value for d in BenchmarkDataset]}") from None
    try:  # like robustbench: the 3D-corruption benchmark reuses the corruption models
        threat_ = ThreatModel(ThreatModel(threat_model).value.replace("_3d", ""))
    except ValueError:
        raise ConfigError(f"unknown robustbench threat model {threat_model!r}; expected one of "
                          f"{[t.value for t in ThreatModel]}") from None
    zoo = model_dicts.get(dataset_, {}).get(threat_, {})
    if name not in zoo:
        close = difflib.get_close_matches(name, list(zoo), n=5, cutoff=0.4)
        hint = f"; close names: {', '.join(close)}" if close else f"; available: {', '.join(list(zoo)[:10])}, ..."
        raise ConfigError(f"unknown robustbench model {name!r} for {dataset_.value}/{threat_.value}{hint}")
    return dataset_, threat_, zoo[name]


def expected_files(name: str, dataset: str = "cifar10", threat_model: str = "corruptions",
                   model_dir=None) -> List[Path]:
    """The checkpoint file(s) robustbench reads for a model (ensembles have one file per member)."""
    import_robustbench()
    dataset_, threat_, entry = _resolve(name, dataset, threat_model)
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    path = folder / dataset_.value / threat_.value / f"{name}.pt"
    ids = entry.get("gdrive_id")
    if isinstance(ids, list):
        return [Path(f"{path}_m{i}.pt") for i in range(len(ids))]
    return [path]


@contextlib.contextmanager
def _torch_load_unrestricted(enabled: bool):
    """Let robustbench's own ``torch.load`` unpickle arbitrary objects (torch >= 2.6 refuses by default)."""
    key = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
    old = os.environ.get(key)
    if enabled:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if enabled:
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old


def load(name: str, dataset: str = "cifar10", threat_model: str = "corruptions",
         model_dir=None, trust_checkpoint: bool = False):
    """A RobustBench zoo model (eval mode, CPU), taking [0, 1] images like every model here.

    Args:
        name: zoo name, e.g. ``"Standard"``, ``"Hendrycks2020AugMix_WRN"``, ``"Standard_R50"``.
        dataset: ``cifar10`` | ``cifar100`` | ``imagenet``.
        threat_model: ``corruptions`` (default; ``corruptions_3d`` maps to it), ``Linf``, ``L2``.
        model_dir: checkpoint root in robustbench's layout; default :func:`default_model_dir`.
        trust_checkpoint: some zoo checkpoints hold pickled non-tensor objects that torch >= 2.6
            refuses to load by default; set this for files you trust to load them anyway.

    RobustBench models normalise inside (their zoo wraps them), so nothing is added here.
    """
    rb = import_robustbench()
    dataset_, threat_, entry = _resolve(name, dataset, threat_model)
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    files = expected_files(name, dataset_.value, threat_.value, folder)
    existed = {f: f.exists() for f in files}
    try:
        with _torch_load_unrestricted(trust_checkpoint):
            return rb.utils.load_model(name, model_dir=str(folder), dataset=dataset_.value,
                                       threat_model=threat_.value)
    except Exception as exc:
        for f in files:  # a download interrupted half-way would look like a corrupt checkpoint next time
            if not existed[f] and f.exists() and is_download_failure(exc):
                f.unlink(missing_ok=True)
        missing = [f for f in files if not f.is_file()]
        gdrive = entry.get("gdrive_id")
        if name in _TORCHVISION_WEIGHTS and dataset_.value == "imagenet" and is_download_failure(exc):
            arch, tag = _TORCHVISION_WEIGHTS[name]
            raise MissingFileError(
                f"robustbench model {name!r} uses torchvision's {arch} {tag} weights, which could not be "
                f"downloaded ({short_error(exc)}): place {torchvision_weight_file(arch, tag)}") from None
        if gdrive and missing:
            ids = gdrive if isinstance(gdrive, list) else [gdrive]
            where = "; ".join(f"{f} <- https://drive.google.com/uc?id={i}" for f, i in zip(files, ids) if f in missing)
            raise MissingFileError(
                f"robustbench checkpoint for {name!r} ({dataset_.value}/{threat_.value}) not found and "
                f"could not be downloaded ({short_error(exc)}). Place the file(s) from the RobustBench model zoo "
                f"(Google Drive): {where}. Pass model_dir or set TTA_DATA_DIR to choose the folder.") from None
        if is_download_failure(exc):
            raise MissingFileError(
                f"robustbench model {name!r} ({dataset_.value}/{threat_.value}) needs pretrained weights that "
                f"could not be downloaded: {short_error(exc)}") from None
        if isinstance(exc, pickle.UnpicklingError) and not trust_checkpoint:
            raise TTAError(
                f"torch refused to unpickle {files[0]} ({short_error(exc)}); if you trust this RobustBench "
                f"checkpoint, pass trust_checkpoint=True") from None
        raise


__all__ = ["import_robustbench", "imagenet_5000_ids", "load", "expected_files", "default_model_dir"]
