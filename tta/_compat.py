"""Import shims for third-party packages that cannot be imported as released (used by tta.data and tta.models).

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

This lives at the top of the package, below both ``tta.data`` (released-file downloads, the 5,000-image
ImageNet list) and ``tta.models`` (the model zoo), so that data code never imports model code.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.resources
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import Iterator, List, Union

from .errors import ConfigError, MissingFileError

#: Marker attribute set on every stand-in module this file creates.
SHIM_MARKER = "__tta_shim__"

#: Package data file listing the 5,000 ImageNet validation images RobustBench evaluates
#: ImageNet-C on (one ``<wnid>/<file>.JPEG`` per line), relative to the robustbench package.
IMAGENET_IDS_FILE = "helper_files/imagenet_test_image_ids.txt"


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
        raise TypeError("this pkg_resources stand-in (from tta._compat) only accepts "
                        f"module names, got {package_or_requirement!r}")
    module = importlib.import_module(package_or_requirement)
    package = module.__name__ if hasattr(module, "__path__") else module.__package__
    base = importlib.resources.files(package)
    return os.fspath(base.joinpath(*resource_name.split("/")))


def _make_pkg_resources() -> types.ModuleType:
    mod = types.ModuleType("pkg_resources", "Minimal stand-in from tta._compat: "
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


__all__ = ["import_robustbench", "imagenet_5000_ids", "SHIM_MARKER", "IMAGENET_IDS_FILE"]
