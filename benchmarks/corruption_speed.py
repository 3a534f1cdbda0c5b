"""Images/s of the corruption engine per corruption, next to the PyPI ``imagecorruptions`` package.

    python benchmarks/corruption_speed.py                     # 10,000 CIFAR-10 test images, severity 5, CPU
    python benchmarks/corruption_speed.py --all-severities    # also time severities 1-4
    python benchmarks/corruption_speed.py --device cuda       # 224 px ImageNet-size images on a GPU
    python benchmarks/corruption_speed.py --images 2000       # quicker: first 2,000 images, total extrapolated

``imagecorruptions`` works one NumPy image at a time; it is timed on the first ``--ref-images`` images
(default 500) and its rate is extrapolated to the full set (the table says so). Its corruption names are
the same as ours. Images come from ``$TTA_DATA_DIR/cifar10_test.npz`` (or ``--source``). Prints a Markdown
table and the total time for all 15 corruptions x 10,000 images (150,000 images) at the timed severities
(with ``--images N`` only the first N images are timed and the total is extrapolated to the whole set, as
the output says). Each corruption is timed on one pass, so one-time set-up (cached operators and tables,
built on first use per severity) is included.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch

from tta.data import corruptions as C


def _import_imagecorruptions():
    """Import ``imagecorruptions``; it still imports ``pkg_resources``, which new setuptools lack."""
    if "pkg_resources" not in sys.modules:
        try:
            import pkg_resources  # noqa: F401
        except ImportError:
            shim = types.ModuleType("pkg_resources")
            shim.resource_filename = lambda package, name: str(
                Path(__import__(package).__file__).parent / name)
            sys.modules["pkg_resources"] = shim
    try:
        import imagecorruptions
        return imagecorruptions
    except ImportError:
        return None


def time_engine(images, name, severity, device):
    start = time.perf_counter()
    C.corrupt_dataset(images, name, severity, seed=0, device=device)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_reference(lib, images, name, severity):
    start = time.perf_counter()
    for img in images:
        lib.corrupt(img, corruption_name=name, severity=severity)
    return time.perf_counter() - start


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None, help="npz with x uint8 (N, 32, 32, 3); default $TTA_DATA_DIR/cifar10_test.npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--all-severities", action="store_true")
    p.add_argument("--ref-images", type=int, default=500, help="images timed for imagecorruptions (0 = skip)")
    p.add_argument("--extras", action="store_true", help="also time the 4 extra corruptions")
    p.add_argument("--images", type=int, default=None,
                   help="time only the first N images (CPU); the 150,000-image total is extrapolated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda"):
        images = np.random.default_rng(0).integers(0, 256, (2000, 224, 224, 3), dtype=np.uint8)
        what = "2,000 random 224x224 images (ImageNet parameters)"
    else:
        source = args.source or Path(os.environ.get("TTA_DATA_DIR", ".")) / "cifar10_test.npz"
        images = np.load(source)["x"]
        n_full = len(images)
        if args.images:
            images = images[:args.images]
        what = f"{len(images):,} CIFAR-10 test images (32x32)"
    severities = (1, 2, 3, 4, 5) if args.all_severities else (5,)
    names = C.ALL_CORRUPTIONS if args.extras else C.CORRUPTIONS
    lib = _import_imagecorruptions() if args.ref_images and not args.device.startswith("cuda") else None
    C.corrupt_dataset(images[:200], "frost", 1, seed=0, device=args.device)       # warm-up, texture cache
    print(f"{what}, device {args.device}, {torch.get_num_threads()} threads, severities {list(severities)}\n")
    header = "| corruption | tta img/s |" + (f" imagecorruptions img/s ({args.ref_images} imgs, extrapolated) | speed-up |"
                                             if lib else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    total, total_ref, failed = 0.0, 0.0, []
    for name in names:
        t = sum(time_engine(images, name, s, args.device) for s in severities)
        rate = len(images) * len(severities) / t
        total += t if name in C.CORRUPTIONS else 0.0
        row = f"| {name} | {rate:,.0f} |"
        if lib:
            sub = images[:args.ref_images]
            try:
                tr = sum(time_reference(lib, sub, name, s) for s in severities)
            except Exception as err:  # the package breaks on new scikit-image for some corruptions
                row += f" fails ({type(err).__name__}) | - |"
                failed.append(name)
            else:
                ref_rate = len(sub) * len(severities) / tr
                total_ref += tr * len(images) / len(sub) if name in C.CORRUPTIONS else 0.0
                row += f" {ref_rate:,.0f} | {rate / ref_rate:,.1f}x |"
        print(row)
    scale = n_full / len(images) if args.images and not args.device.startswith("cuda") else 1.0
    n_total = 15 * round(len(images) * scale) * len(severities)
    extrapolated = f", extrapolated from {len(images):,} images" if scale != 1.0 else ""
    total *= scale
    total_ref *= scale
    print(f"\nTotal for the 15 corruptions ({n_total:,} images{extrapolated}): tta {total:.1f} s"
          + (f"; imagecorruptions (extrapolated, without {', '.join(failed) or 'none'}) {total_ref:.0f} s"
             if lib else ""))


if __name__ == "__main__":
    main()
