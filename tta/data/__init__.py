"""Data: clean sets and released corruption files (``datasets``, ``cifar_c``), image-folder data sets in their
usual layouts (``folders``, ``coop``, ``classes``), the corruption engine (``corruptions``), domains
(``domains``), lazily read images and their background loader (``lazy``, ``loader``, ``decode``), the
protocols that order them into streams (``streams``, ``ccc``, ``ccc_stream``) and ``tta make-c``
(``make_c``). Submodules are imported on first use."""
import importlib

_SUBMODULES = ("datasets", "corruptions", "domains", "streams", "make_c", "openset", "folders", "coop", "classes",
               "cifar_c", "lazy", "loader", "decode", "ccc", "ccc_stream")


def __getattr__(name):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tta.data' has no attribute {name!r}")
