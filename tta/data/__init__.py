"""Data: clean sets and released corruption files (``datasets``), the corruption engine
(``corruptions``), domains (``domains``) and the protocols that order them into streams (``streams``).
Submodules are imported on first use."""
import importlib

_SUBMODULES = ("datasets", "corruptions", "domains", "streams", "make_c", "openset")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tta.data' has no attribute {name!r}")
