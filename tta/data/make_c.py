"""Write a corrupted copy of an image set in the RobustBench / CIFAR-10-C file layout (``tta make-c``).

Layout: ``<out>/<corruption>.npy`` uint8 (N * len(severities), H, W, 3) NHWC, severity-major (rows
``k*N .. (k+1)*N - 1`` hold ``severities[k]``), plus ``labels.npy`` (the labels repeated per severity)
and ``make_c.json``, which records the seed, severities, source size and engine chunk per written file.

Each file is written to a temporary file in the same folder and moved into place with ``os.replace``, so
an interrupted run never leaves a truncated ``.npy`` behind. The engine writes its chunks straight into a
memory map of that temporary ``.npy`` (NHWC rows, ``corrupt_dataset(..., out=...)``), so no array is
filled first and copied to the file after. A rerun skips every file whose shape and dtype
are right and whose ``make_c.json`` entry matches the requested seed and severities, so an interrupted
generation resumes where it stopped. Images come from ``corrupt_dataset``, the same function on-the-fly
streams use, so the files equal what a stream would produce for the same seed.

``--source`` may also be an ImageNet validation folder (``<wnid>/<image>``): then :func:`make_imagenet_c`
writes ImageNet-C's folder layout, ``<out>/<corruption>/<severity>/<wnid>/<original file name>``, each
image resized to 256 and centre-cropped to 224, corrupted with the 224-px constants (seeded per 100
images in sorted order, the same draws as ``data.source: generate`` over all 50,000 images) and saved as
JPEG quality 85 like the released files. Each file is written atomically; ``<out>/<corruption>/<severity>/
make_c.json`` records the settings when the folder is started, so a rerun with the same settings resumes
(every 100-image group with all its files present is skipped) and one with other settings is refused.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..errors import ConfigError
from .corruptions import CORRUPTIONS, RNG_CHUNK, corrupt_dataset
from .corruptions.api import check_name, check_severity
from .datasets import read_npz

SIDECAR = "make_c.json"


def _atomic_fill(path: Path, fill) -> None:
    """Call ``fill(temp_path)`` to write a temp file next to ``path``, then move it into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        fill(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_write(path: Path, write) -> None:
    """Call ``write(file_object)`` on a temp file next to ``path``, then move it into place."""
    def fill(tmp: str) -> None:
        with open(tmp, "wb") as f:
            write(f)

    _atomic_fill(path, fill)


def _save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda f: np.save(f, array))


def _read_sidecar(out: Path) -> dict:
    try:
        return json.loads((out / SIDECAR).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _is_complete(path: Path, shape, record: Optional[dict], wanted: dict) -> bool:
    if not path.is_file() or record != wanted:
        return False
    try:
        arr = np.load(path, mmap_mode="r")
    except (ValueError, OSError):
        return False
    return arr.shape == tuple(shape) and arr.dtype == np.uint8


def load_source(source) -> tuple:
    """Images (N, H, W, 3) uint8 and labels (N,) from an ``.npz`` with keys ``x`` and ``y``."""
    return read_npz(source)


def make_c(source, out, corruptions: Optional[Iterable[str]] = None, severities: Sequence[int] = (1, 2, 3, 4, 5),
           seed: int = 0, progress: bool = True, device: str = "cpu") -> dict:
    """Generate ``<out>/<corruption>.npy`` for each corruption (default: the 15 standard ones).

    Returns ``{corruption: "written" | "skipped"}``.
    """
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    for name in names:
        check_name(name)
    severities = [check_severity(s) for s in severities]
    if not severities:
        raise ConfigError("make_c needs at least one severity")
    x, y = load_source(source)
    n = x.shape[0]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = np.tile(y.astype(np.uint8) if y.max(initial=0) < 256 else y, len(severities))
    _save_npy(out / "labels.npy", labels)
    shape = (n * len(severities),) + x.shape[1:]
    wanted = {"seed": int(seed), "severities": severities, "n_source": int(n), "rng_chunk": RNG_CHUNK}
    sidecar = _read_sidecar(out)
    status = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(names) * len(severities) * n, unit="img", desc="make-c")

    for name in names:
        path = out / f"{name}.npy"
        if _is_complete(path, shape, sidecar.get(name), wanted):
            status[name] = "skipped"
            if bar is not None:
                bar.update(len(severities) * n)
            continue

        def fill(tmp: str, name=name) -> None:
            # The engine writes each chunk straight into the file's pages (a memory map of the .npy): no
            # array to fill first and copy out after.
            result = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape)
            target = torch.from_numpy(result).permute(0, 3, 1, 2)      # NHWC rows, written in place
            for k, severity in enumerate(severities):
                if bar is not None:
                    bar.set_postfix_str(f"{name} s{severity}")
                corrupt_dataset(x, name, severity, seed, device=device, out=target[k * n:(k + 1) * n])
                if bar is not None:
                    bar.update(n)
            del target, result          # unmapped; the kernel writes the pages back in the background

        _atomic_fill(path, fill)
        sidecar = _read_sidecar(out)
        sidecar[name] = wanted
        _atomic_write(out / SIDECAR, lambda f: f.write(json.dumps(sidecar, indent=1, sort_keys=True).encode()))
        status[name] = "written"
    if bar is not None:
        bar.close()
    return status


def parse_severities(tokens: Sequence[str]) -> list:
    """``["1-5"]``, ``["1", "3", "5"]`` or ``["1,3"]`` -> sorted unique severities, each 1..5."""
    values = set()
    for token in tokens:
        for part in str(token).split(","):
            part = part.strip()
            if not part:
                continue
            try:
                if "-" in part:
                    lo, hi = (int(v) for v in part.split("-", 1))
                    values.update(range(lo, hi + 1))
                else:
                    values.add(int(part))
            except ValueError:
                raise ConfigError(f"bad severity {part!r}: use e.g. 1-5 or 1 3 5") from None
    if not values or min(values) < 1 or max(values) > 5:
        raise ConfigError(f"severities must lie in 1..5, got {sorted(values)}")
    return sorted(values)


def run_cli(args) -> int:
    """Handler of ``tta make-c``: an .npz source gives the CIFAR-10-C file layout, a folder ImageNet-C's."""
    if Path(args.source).is_dir():
        status = make_imagenet_c(args.source, args.out, corruptions=args.corruptions,
                                 severities=parse_severities(args.severities), seed=args.seed,
                                 progress=not args.quiet, device=args.device, workers=args.workers)
    else:
        status = make_c(args.source, args.out, corruptions=args.corruptions,
                        severities=parse_severities(args.severities), seed=args.seed,
                        progress=not args.quiet, device=args.device)
    for name, what in status.items():
        print(f"{name}: {what}")
    return 0


def register_cli(subparsers) -> None:
    """Add the ``make-c`` subcommand; its handler is stored as ``func`` in the parsed namespace."""
    p = subparsers.add_parser("make-c", help="write a corrupted copy of an image set (CIFAR-10-C layout)",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--source", required=True, help=".npz with x (N, H, W, 3) uint8 and y (N,), or an ImageNet "
                   "validation folder <wnid>/<image> (writes ImageNet-C's <corruption>/<severity>/<wnid>/ layout)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--corruptions", nargs="+", default=None, metavar="NAME",
                   help="corruption names (default: the 15 standard ones)")
    p.add_argument("--severities", nargs="+", default=["1-5"], help="e.g. 1-5 (default) or 1 3 5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None, help="decode processes for an image folder source "
                   "(default: half the CPUs, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_cli)


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


def imagenet_tree(folder) -> list:
    """Images of an ImageNet-style tree ``<class>/<image>``, sorted by class folder then file name."""
    folder = Path(folder)
    paths = sorted(p for p in folder.glob("*/*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ConfigError(f"no images found as {folder}/<class>/<image>.JPEG")
    return paths


def _save_jpeg(path: Path, image) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, lambda f: Image.fromarray(image).save(f, format="JPEG", quality=85, optimize=True))


def make_imagenet_c(source, out, corruptions: Optional[Iterable[str]] = None,
                    severities: Sequence[int] = (1, 2, 3, 4, 5), seed: int = 0, progress: bool = True,
                    device: str = "cpu", workers: Optional[int] = None, decoder: str = "torchvision") -> dict:
    """ImageNet-C folders from an ImageNet validation tree (see the module docstring).

    Returns ``{"<corruption>/<severity>": "written" | "skipped" | "resumed"}``.
    """
    from .corruptions import RNG_CHUNK
    from .lazy import CorruptedSource, FileSource, LazyImages
    from .loader import iter_chunks, resolve_workers
    names = list(CORRUPTIONS if corruptions is None else corruptions)
    for name in names:
        check_name(name)
    severities = [check_severity(s) for s in severities]
    paths = imagenet_tree(source)
    rel = [f"{p.parent.name}/{p.name}" for p in paths]
    out, n = Path(out), len(paths)
    wanted = {"seed": int(seed), "n_source": n, "rng_chunk": RNG_CHUNK, "first": rel[0], "last": rel[-1]}
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(names) * len(severities) * n, unit="img", desc="make-c imagenet")
    status, workers = {}, resolve_workers(workers)
    for name in names:
        for severity in severities:
            folder = out / name / str(severity)
            folder.mkdir(parents=True, exist_ok=True)
            record = _read_sidecar(folder)
            if record and record != wanted:
                raise ConfigError(f"{folder} was started with other settings ({record}); remove it to regenerate "
                                  f"with {wanted}")
            if not record:
                text = json.dumps(wanted, indent=1, sort_keys=True).encode()
                _atomic_write(folder / SIDECAR, lambda f: f.write(text))
            groups = [g for g in range(-(-n // RNG_CHUNK))
                      if not all((folder / r).is_file() for r in rel[g * RNG_CHUNK:(g + 1) * RNG_CHUNK])]
            key = f"{name}/{severity}"
            status[key] = "skipped" if not groups else "written" if len(groups) == -(-n // RNG_CHUNK) else "resumed"
            images = LazyImages.of(CorruptedSource(FileSource(paths, "resize256", decoder), name, severity, seed),
                                   workers)
            for lo, hi in _runs(groups, RNG_CHUNK, n):
                for c_lo, c_hi, x in iter_chunks(images[lo:hi], device):
                    for k, img in enumerate(x.permute(0, 2, 3, 1).cpu().numpy()):
                        _save_jpeg(folder / rel[lo + c_lo + k], img)
                    if bar is not None:
                        bar.update(c_hi - c_lo)
            if bar is not None:
                bar.update(n - sum(min(n, (g + 1) * RNG_CHUNK) - g * RNG_CHUNK for g in groups))
    if bar is not None:
        bar.close()
    return status


def _runs(groups, size: int, n: int):
    """Contiguous position ranges covering the given group numbers."""
    runs = []
    for g in groups:
        lo, hi = g * size, min(n, (g + 1) * size)
        if runs and runs[-1][1] == lo:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi])
    return [tuple(r) for r in runs]
