"""Where data, checkpoints and assets are looked for.

Everything the toolkit reads from disk is found under one root: the ``data_dir`` argument when given,
else the ``TTA_DATA_DIR`` environment variable, else ``~/.cache/tta``. Nothing else is searched, so a
missing file always produces the same clear message naming the file and the folder.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional, Union

from .errors import MissingFileError

PathLike = Union[str, os.PathLike]


def data_root(data_dir: Optional[PathLike] = None) -> Path:
    """The folder data is read from (see module docstring)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("TTA_DATA_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "tta"


def cache_dir() -> Path:
    """Writable folder for things the toolkit makes itself (demo model, generated data)."""
    path = Path(os.environ.get("TTA_CACHE_DIR", Path.home() / ".cache" / "tta"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_file(candidates: Iterable[PathLike], *, what: str, folder: Path, hint: str = "") -> Path:
    """Return the first existing candidate, or raise one error naming what to place and where."""
    candidates = [Path(c) for c in candidates]
    for c in candidates:
        if c.exists():
            return c
    names = ", ".join(c.name for c in candidates)
    msg = (f"{what} not found: place {names} in {folder} "
           f"(set TTA_DATA_DIR or pass data_dir to choose the folder).")
    if hint:
        msg += " " + hint
    raise MissingFileError(msg)
