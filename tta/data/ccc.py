"""Continually Changing Corruptions (CCC; Press, Schneider, Kuemmerer, Bethge, NeurIPS 2023): the schedule.

CCC walks between pairs of ImageNet-C corruptions: every image carries corruption ``a`` at severity
``s_a`` and then corruption ``b`` at ``s_b``, and the pair of severities moves in small steps so that a
reference classifier's accuracy stays near a target ("baseline" 0, 20 or 40 %: CCC-Hard/-Medium/-Easy).
Verified by reading the official generator (``oripress/CCC`` ``generate.py`` / ``make_imagenet_c.py``),
restated here in our own words:

* severities live on a grid of 21 levels 0, 0.25, ..., 5 (continuous parameters:
  :mod:`tta.data.corruptions.continuous`); a table ``acc[a, b][i, j]`` holds the reference model's accuracy
  (%) with ``a`` at level i then ``b`` at level j (CCC downloads a precomputed table; ResNet-50);
* the walk for a pair starts at (i, 0) - only ``a`` - and ends at (0, j) - only ``b`` - moving one level
  at a time, either lowering ``a`` or raising ``b`` (:func:`walk` gives the exact rule). The start i is the
  one whose walk's mean accuracy is closest to the target;
* the next pair starts with the previous ``b``: ``a <- b``, and a new ``b`` drawn uniformly from the other
  corruptions; the first pair is drawn at random;
* each walk cell contributes ``speed`` (1000, 2000 or 5000: "transition speed") images, drawn at random
  from the ImageNet validation set, each randomly flipped and random-resized-cropped to 224 px, corrupted,
  saved as JPEG quality 85; 7,500,000 images in all, written as shards of 25,000;
* the corruptions: baseline 40 uses the 15 minus brightness; 20 also drops JPEG; 0 uses gaussian, shot and
  impulse noise and contrast (brightness cannot reach such low accuracies).

Our choices (not CCC's): the random draws come from NumPy/torch generators seeded by the stream seed, so a
seed gives the same stream on any machine but not CCC's released images (seeds 43-45 name those); the
accuracy table is read from CCC's file or computed with :func:`calibrate` for any model; images per
walk cell must be a multiple of 100 (the engine's RNG groups).
"""
from __future__ import annotations

import hashlib
import io
import pickle
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, MissingFileError

BASELINE_NOISES = {
    40: ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "contrast", "elastic_transform", "pixelate", "jpeg_compression"),
    20: ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur", "zoom_blur",
         "snow", "frost", "fog", "contrast", "elastic_transform", "pixelate"),
    0: ("gaussian_noise", "shot_noise", "impulse_noise", "contrast"),
}
CCC_NAMES = {"elastic": "elastic_transform", "jpeg": "jpeg_compression"}  # CCC's table keys -> ours
IMAGES_TOTAL = 7_500_000
SHARD_SIZE = 25_000

Table = Dict[Tuple[str, str], np.ndarray]


def noises_for(baseline: float) -> Tuple[str, ...]:
    """CCC's corruption list for a target accuracy (>= 40, >= 20, else)."""
    return BASELINE_NOISES[40 if baseline >= 40 else 20 if baseline >= 20 else 0]


def walk(acc: np.ndarray, target: float) -> List[Tuple[int, int]]:
    """The severity-level cells (i, j) of the walk for one pair, from (i0, 0) to (0, j1).

    For every cell, the best continuation is built from cells already solved: from (i, j) the walk goes to
    (i - 1, j) or to (i, j + 1), whichever makes the mean accuracy of (i, j) plus that cell's own
    continuation closer to ``target`` (ties go to (i, j + 1); j + 1 past the grid is never taken); a cell in
    row 0 ends the walk. Among the starts (i, 0), i >= 1, the one whose walk's mean accuracy is closest to
    the target wins (the smallest i on ties). This greedy rule is CCC's; it is not a global optimum.
    """
    acc = np.asarray(acc, dtype=np.float64)
    n, m = acc.shape
    if n < 2 or m < 1:
        raise ConfigError(f"a CCC accuracy table needs at least 2 x 1 levels, got {acc.shape}")
    total = np.zeros((n, m))
    length = np.zeros((n, m), dtype=np.int64)
    step = np.zeros((n, m), dtype=np.int64)  # 0: ends here, 1: to (i-1, j), 2: to (i, j+1)
    total[0], length[0] = acc[0], 1
    for i in range(1, n):
        for j in range(m - 1, -1, -1):
            down = abs((total[i - 1, j] + acc[i, j]) / (length[i - 1, j] + 1) - target)
            right = abs((total[i, j + 1] + acc[i, j]) / (length[i, j + 1] + 1) - target) if j + 1 < m else np.inf
            if down < right:
                total[i, j], length[i, j], step[i, j] = total[i - 1, j] + acc[i, j], length[i - 1, j] + 1, 1
            else:
                total[i, j], length[i, j], step[i, j] = total[i, j + 1] + acc[i, j], length[i, j + 1] + 1, 2
    means = total[1:, 0] / length[1:, 0]
    i = 1 + int(np.argmin(np.abs(means - target)))
    cells, j = [], 0
    while True:
        cells.append((i, j))
        if i == 0:
            return cells
        i, j = (i - 1, j) if step[i, j] == 1 else (i, j + 1)


# ----------------------------------------------------------------------------------- accuracy tables
class _ArraysOnly(pickle.Unpickler):
    """Unpickles dicts/lists of NumPy arrays and nothing else (CCC's table is a pickle from the web)."""

    ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("collections", "OrderedDict"), ("builtins", "dict")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _key(name: str) -> Tuple[str, str]:
    """``n1_<a>_n2_<b>`` -> (a, b) in our corruption names."""
    if not name.startswith("n1_") or "_n2_" not in name:
        raise ConfigError(f"CCC accuracy table key {name!r} is not of the form n1_<corruption>_n2_<corruption>")
    a, b = name[3:].split("_n2_", 1)
    return CCC_NAMES.get(a, a), CCC_NAMES.get(b, b)


def load_accuracy(path) -> Table:
    """An accuracy table: ``.npz`` from :func:`save_accuracy`, or CCC's ``ccc_accuracy_matrix.pickle``
    (a mapping ``n1_<a>_n2_<b>`` -> 21 x 21 array of accuracies in %; read with a loader that accepts
    arrays only). Not tested against CCC's own file, which could not be downloaded here."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"CCC accuracy table {path} not found")
    try:
        if path.suffix == ".npz":
            with np.load(path) as f:
                raw = {k: f[k] for k in f.files}
        else:
            raw = _ArraysOnly(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, ValueError, OSError, EOFError) as e:
        raise ConfigError(f"{path} is not a CCC accuracy table ({type(e).__name__}: {e}); expected a .npz from "
                          "tta.data.ccc.save_accuracy or CCC's ccc_accuracy_matrix.pickle") from None
    table = {_key(k): np.asarray(v, dtype=np.float64) for k, v in dict(raw).items()}
    shapes = {v.shape for v in table.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ConfigError(f"{path}: the accuracy arrays must all be 2-D and of one shape, got {sorted(shapes)}")
    return table


def save_accuracy(path, table: Table) -> None:
    np.savez(Path(path), **{f"n1_{a}_n2_{b}": v for (a, b), v in table.items()})


def calibrate(model, images: torch.Tensor, labels: torch.Tensor, noises: Sequence[str], step: float = 0.25,
              seed: int = 0, batch_size: int = 100, device="cpu") -> Table:
    """Accuracy (%) of ``model`` (taking [0, 1] images) on uint8 224-px ``images`` for every ordered pair of
    ``noises`` and every pair of grid levels: what CCC's walk needs for a reference model of one's own.
    Cost: pairs x levels^2 x images forward passes (182 x 441 x n for baseline 40 at step 0.25)."""
    from .corruptions.continuous import corrupt_levels, grid
    levels = grid(step)
    device = torch.device(device)
    labels = labels.to(device)
    table = {}
    with torch.inference_mode():
        for a in noises:
            for b in noises:
                if a == b:
                    continue
                acc = np.zeros((len(levels), len(levels)))
                for i, sa in enumerate(levels):
                    for j, sb in enumerate(levels):
                        correct = 0
                        for lo in range(0, len(images), batch_size):
                            x = images[lo:lo + batch_size].to(device, torch.float64)
                            g = torch.Generator(device=device).manual_seed(_seed(seed, "calibrate", a, b, i, j, lo))
                            x = corrupt_levels(corrupt_levels(x, a, sa, g), b, sb, g)
                            pred = model(x.float().div_(255)).argmax(1)
                            correct += int((pred == labels[lo:lo + batch_size]).sum())
                        acc[i, j] = 100.0 * correct / len(images)
                table[(a, b)] = acc
    return table


def _seed(*parts) -> int:
    digest = hashlib.blake2b("|".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


# ----------------------------------------------------------------------------------- the schedule
def plan(table: Table, noises: Sequence[str], target: float, speed: int, n_images: int, seed: int
         ) -> List[Tuple[str, str, float, float]]:
    """``(a, b, severity of a, severity of b)`` of every walk cell, ``speed`` images each, until ``n_images``."""
    noises = list(noises)
    if len(noises) < 2:
        raise ConfigError(f"CCC needs at least two corruptions, got {noises}")
    missing = [(a, b) for a in noises for b in noises if a != b and (a, b) not in table]
    if missing:
        raise ConfigError(f"the CCC accuracy table has no entry for {len(missing)} pair(s), e.g. {missing[:3]}")
    size = next(iter(table.values())).shape[0]
    severity = 5.0 / (size - 1)
    rng = np.random.default_rng(_seed(seed, "ccc-pairs"))
    a = noises[int(rng.integers(len(noises)))]
    steps: List[Tuple[str, str, float, float]] = []
    walks: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    while len(steps) * speed < n_images:
        b = a
        while b == a:
            b = noises[int(rng.integers(len(noises)))]
        cells = walks.setdefault((a, b), walk(table[(a, b)], target))
        steps.extend((a, b, i * severity, j * severity) for i, j in cells)
        a = b
    return steps[:-(-n_images // speed)]
