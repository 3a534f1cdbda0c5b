"""Released CIFAR-10-C / CIFAR-100-C files, checked before use (RobustBench layout).

``<root>/CIFAR-10-C/<corruption>.npy`` holds uint8 images (N, 32, 32, 3) and ``labels.npy`` their labels.
Two row counts are accepted for an image file:

* 50,000 rows: the released layout, severities 1..5 one after the other (rows ``(s-1)*10000 .. s*10000-1``
  are severity s);
* 10,000 rows: **one** severity, as many people keep only severity 5. Which one is told by the file name
  or, failing that, by the config: ``<corruption>_<s>.npy`` (e.g. ``fog_5.npy``) holds severity s and is
  preferred when present; a 10,000-row ``<corruption>.npy`` is taken to hold whatever severity the config
  asks for, and asking for two different severities of it in one run is an error (it cannot hold both).

``labels.npy`` must hold 50,000 or 10,000 integer labels in ``[0, classes)``: 50,000 are sliced like the
images; 10,000 serve every severity. Any other row count, a wrong dtype or shape, a label file of the
wrong length or a file numpy cannot read is one :class:`~tta.errors.ConfigError` naming the file, what it
holds and what was expected - never an empty results table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch

from ..errors import ConfigError, MissingFileError
from ..paths import data_root

C_FOLDERS = {"cifar10": "CIFAR-10-C", "cifar100": "CIFAR-100-C"}
CLASSES = {"cifar10": 10, "cifar100": 100}
PER_SEVERITY = 10000
ALL_SEVERITIES = 5 * PER_SEVERITY


def _open(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{path} is not a readable .npy file ({type(e).__name__}: {e}); "
                          f"replace it with the released file or regenerate it with `tta make-c`") from None


def check_images(path: Path, arr: np.ndarray) -> None:
    """uint8 (50,000 or 10,000, 32, 32, 3), else one clear error."""
    expected = f"uint8 images of shape ({ALL_SEVERITIES} or {PER_SEVERITY}, 32, 32, 3)"
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[1:] != (32, 32, 3):
        raise ConfigError(f"{path} holds {arr.dtype} of shape {arr.shape}; expected {expected}")
    if arr.shape[0] not in (ALL_SEVERITIES, PER_SEVERITY):
        raise ConfigError(f"{path} holds {arr.shape[0]} images; expected {ALL_SEVERITIES} (severities 1-5, "
                          f"severity-major) or {PER_SEVERITY} (a single severity) - {expected}")


def check_labels(path: Path, labels: np.ndarray, classes: int) -> None:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ConfigError(f"{path} holds {labels.dtype} of shape {labels.shape}; expected a 1-D integer array "
                          f"of {ALL_SEVERITIES} or {PER_SEVERITY} labels")
    if labels.shape[0] not in (ALL_SEVERITIES, PER_SEVERITY):
        raise ConfigError(f"{path} holds {labels.shape[0]} labels; expected {ALL_SEVERITIES} (severities 1-5) "
                          f"or {PER_SEVERITY}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ConfigError(f"{path} holds labels in [{int(labels.min())}, {int(labels.max())}]; expected class "
                          f"indices in [0, {classes - 1}]")


def image_file(folder: Path, corruption: str, severity: int) -> Optional[Path]:
    """``<corruption>_<severity>.npy`` when present, else ``<corruption>.npy`` when present, else None."""
    for name in (f"{corruption}_{severity}.npy", f"{corruption}.npy"):
        if (folder / name).is_file():
            return folder / name
    return None


def read(corruption: str, severity: int, dataset: str = "cifar10", data_dir=None,
         n_examples: Optional[int] = None, claims: Optional[Dict[Path, int]] = None
         ) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 NCHW images and int64 labels of one (corruption, severity), after the checks above.

    ``claims`` (kept by the caller across a run) records which severity each single-severity file was
    taken to hold, so that a second, different severity of the same file is refused.
    """
    if dataset not in C_FOLDERS:
        raise ConfigError(f"dataset must be one of {sorted(C_FOLDERS)}, got {dataset!r}")
    if severity not in (1, 2, 3, 4, 5):
        raise ConfigError(f"severity must be 1..5, got {severity!r}")
    folder = data_root(data_dir) / C_FOLDERS[dataset]
    path, labels_path = image_file(folder, corruption, severity), folder / "labels.npy"
    if path is None or not labels_path.is_file():
        missing = ", ".join(n for n, ok in ((f"{corruption}.npy", path is not None),
                                            ("labels.npy", labels_path.is_file())) if not ok)
        raise MissingFileError(
            f"{C_FOLDERS[dataset]} file(s) {missing} not found in {folder}: place the released files there "
            f"(Zenodo; set TTA_DATA_DIR or data_dir to choose the folder), or generate them with "
            f"`tta make-c --source {dataset}_test.npz --out {folder}`, or use data.source=generate")
    images, labels = _open(path), _open(labels_path)
    check_images(path, images)
    check_labels(labels_path, labels, CLASSES[dataset])
    if images.shape[0] == PER_SEVERITY and claims is not None and path.name == f"{corruption}.npy":
        held = claims.setdefault(path, severity)
        if held != severity:
            raise ConfigError(f"{path} holds a single severity ({PER_SEVERITY} images), taken to be severity {held} "
                              f"earlier in this run, so it cannot also be severity {severity}: keep one file per "
                              f"severity as {corruption}_<severity>.npy, or the released 50,000-image file")
    lo = (severity - 1) * PER_SEVERITY
    x = images[lo:lo + PER_SEVERITY] if images.shape[0] == ALL_SEVERITIES else images
    y = labels[lo:lo + PER_SEVERITY] if labels.shape[0] == ALL_SEVERITIES else labels
    if n_examples is not None:
        x, y = x[:n_examples], y[:n_examples]
    x = torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))
    return x, torch.from_numpy(np.asarray(y).astype(np.int64))
