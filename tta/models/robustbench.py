"""RobustBench model zoo access that works on current Python environments, offline-friendly.

Why a shim: robustbench 1.1.1 (the PyPI release) cannot be imported on a fresh environment:

* ``robustbench.loaders`` does ``import pkg_resources``, which setuptools >= 81 no longer ships;
  the only function it uses is ``pkg_resources.resource_filename(__name__, relative_path)``.
* ``robustbench.eval`` (imported by ``robustbench/__init__``) does ``from autoattack import
  AutoAttack`` and ``from autoattack.state import EvaluationState``, but its dependency
  ``pyautoattack`` installs the import package ``pyautoattack``, not ``autoattack``.

:func:`import_robustbench` imports robustbench with stand-ins for exactly those two names, and only
for a name that cannot be imported for real. The stand-ins are registered in ``sys.modules`` for
the duration of the import only (robustbench binds them as module globals at import time and never
imports them again), so other libraries keep seeing the environment as it is. Site-packages is
never modified.

:func:`load` wraps ``robustbench.utils.load_model``: checkpoints live in robustbench's layout
``<model_dir>/<dataset>/<threat_model>/<name>.pt`` with ``model_dir`` defaulting to
``<data_root()>/models/robustbench`` (``TTA_DATA_DIR``), next to the other checkpoints the toolkit
reads, so an offline machine needs only that one folder filled in. A failed download becomes one
:class:`~tta.errors.MissingFileError` naming the file to place and where it comes from.
"""
from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.resources
import importlib.util
import os
import pickle
import sys
import types
from pathlib import Path
from typing import Iterator, List, Union

from ..errors import ConfigError, MissingFileError, TTAError
from ..paths import data_root
from .hub import is_download_failure, short_error, torchvision_weight_file

#: Marker attribute set on every stand-in module this file creates.
SHIM_MARKER = "__tta_shim__"

#: Package data file listing the 5,000 ImageNet validation images RobustBench evaluates
#: ImageNet-C on (one ``<wnid>/<file>.JPEG`` per line), relative to the robustbench package.
IMAGENET_IDS_FILE = "helper_files/imagenet_test_image_ids.txt"

# ImageNet models whose weights robustbench takes from torchvision instead of its own zoo.
_TORCHVISION_WEIGHTS = {"Standard_R50": ("resnet50", "IMAGENET1K_V1")}


# --------------------------------------------------------------------------- import shim
def _module_missing(name: str) -> bool:
    """True when ``import name`` would fail (``name`` is a top-level module, nothing is imported)."""
    if name in sys.modules:
        return sys.modules[name] is None
    try:
        return importlib.util.find_spec(name) is None
    except (ImportError, ValueError):
        return True


def _resource_filename(package_or_requirement, resource_name: str) -> str:
    """Stand-in for ``pkg_resources.resource_filename`` for modules installed as plain files.

    Like the original, a module name resolves relative to the folder holding that module (for a
    package, its own folder), and ``resource_name`` uses ``/`` separators.
    """
    if not isinstance(package_or_requirement, str):
        raise TypeError("this pkg_resources stand-in (from tta.models.robustbench) only accepts "
                        f"module names, got {package_or_requirement!r}")
    module = importlib.import_module(package_or_requirement)
    package = module.__name__ if hasattr(module, "__path__") else module.__package__
    base = importlib.resources.files(package)
    return os.fspath(base.joinpath(*resource_name.split("/")))


def _make_pkg_resources() -> types.ModuleType:
    mod = types.ModuleType("pkg_resources", "Minimal stand-in from tta.models.robustbench: "
                                            "provides resource_filename only.")
    mod.resource_filename = _resource_filename
    setattr(mod, SHIM_MARKER, True)
    return mod


def _autoattack_aliases() -> dict:
    """``autoattack`` and ``autoattack.<sub>`` names mapped to the already-imported pyautoattack modules.

    Aliasing the module objects (instead of re-importing the files under another name) keeps a
    single copy of every class, so ``autoattack.AutoAttack is pyautoattack.AutoAttack``.
    """
    real = importlib.import_module("pyautoattack")
    importlib.import_module("pyautoattack.state")  # robustbench.eval imports autoattack.state
    aliases = {"autoattack": real}
    for name, module in list(sys.modules.items()):
        if name.startswith("pyautoattack.") and module is not None:
            aliases["autoattack" + name[len("pyautoattack"):]] = module
    return aliases


def _shims_needed() -> dict:
    """The stand-in modules to register: only for names that cannot be imported for real."""
    shims = {}
    if _module_missing("pkg_resources"):
        shims["pkg_resources"] = _make_pkg_resources()
    if _module_missing("autoattack") and not _module_missing("pyautoattack"):
        shims.update(_autoattack_aliases())
    return shims


@contextlib.contextmanager
def _shims_installed() -> Iterator[dict]:
    """Register the needed stand-ins in ``sys.modules``; put back exactly what was there afterwards.

    An entry that is ``None`` (Python's "this import fails" marker) is replaced for the duration;
    a real module already imported is never replaced.
    """
    shims = _shims_needed()
    added, previous = {}, {}
    for name, module in shims.items():
        if sys.modules.get(name) is None:
            if name in sys.modules:
                previous[name] = None
            sys.modules[name] = module
            added[name] = module
    try:
        yield added
    finally:
        for name, module in added.items():
            if sys.modules.get(name) is module:
                if name in previous:
                    sys.modules[name] = previous[name]
                else:
                    del sys.modules[name]


def import_robustbench() -> types.ModuleType:
    """Import ``robustbench`` (with ``.data``, ``.utils``, ``.loaders``, ``.eval``) and return it.

    Cheap after the first call. Raises :class:`ConfigError` when robustbench is not installed.
    """
    if "robustbench.utils" in sys.modules and "robustbench.data" in sys.modules:
        return sys.modules["robustbench"]
    if _module_missing("robustbench"):
        raise ConfigError("robustbench models need the robustbench package: pip install robustbench")
    with _shims_installed():
        rb = importlib.import_module("robustbench")
        for sub in ("data", "utils", "loaders", "eval"):
            importlib.import_module(f"robustbench.{sub}")
    return rb


def imagenet_5000_ids(as_list: bool = False) -> Union[Path, List[str]]:
    """RobustBench's fixed 5,000-image ImageNet(-C) evaluation subset, shipped inside robustbench.

    Returns the path of the text file (lines ``<wnid>/<name>.JPEG``), or its lines when ``as_list``.
    Only the file is located: robustbench itself is not imported.
    """
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("the ImageNet 5,000-image id list ships with robustbench: pip install robustbench")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*IMAGENET_IDS_FILE.split("/"))
    if not path.is_file():
        raise MissingFileError(f"robustbench's ImageNet id list {path} is missing; reinstall robustbench")
    if as_list:
        return [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return path


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
