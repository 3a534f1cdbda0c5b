"""Images/s of the corruption engine per corruption and entry point, next to the PyPI ``imagecorruptions``.

    python benchmarks/corruption_speed.py --threads 2                       # corrupt_dataset, 10,000 images
    python benchmarks/corruption_speed.py --threads 2 --entries dataset functional Corrupt make-c stream
    python benchmarks/corruption_speed.py --threads 1 --baseline /tmp/old   # also an older engine, interleaved
    python benchmarks/corruption_speed.py --all-severities                  # also time severities 1-4
    python benchmarks/corruption_speed.py --device cuda                     # 224 px ImageNet-size images on a GPU
    python benchmarks/corruption_speed.py --images 2000                     # quicker: first 2,000 images, extrapolated

Entry points (issue 15: the engine must be fast whichever one a user takes), each timed on the same
images, interleaved per corruption (so load changes hit every entry alike):

* ``dataset``: ``corrupt_dataset(uint8 images, name, severity, seed=0)``;
* ``functional``: ``C.<name>(x, severity, generator=g)`` on one float tensor of all the images, made the
  way users make it (``torch.from_numpy(nhwc).permute(0, 3, 1, 2).float() / 255``, so not contiguous);
* ``Corrupt``: ``Corrupt(name, severity, seed=0)(x)`` on the same tensor;
* ``make-c``: ``tta.data.make_c.make_c`` for that one corruption, reading the .npz and writing the .npy;
* ``stream``: the runner's on-the-fly generation, ``data.source: generate``: a ``DomainSet`` and a
  continual stream of that one domain, every batch taken.

``--baseline DIR`` also times ``corrupt_dataset`` of another copy of the package (``DIR/tta``, e.g. a
``git worktree`` of an older commit), imported as ``tta_baseline``. ``imagecorruptions`` works one NumPy
image at a time; it is timed on the first ``--ref-images`` images (default 0: skipped) and extrapolated.
Images come from ``$TTA_DATA_DIR/cifar10_test.npz`` (or ``--source``). Prints a Markdown table and the
total time of each entry for all 15 corruptions x 10,000 images (150,000 images) at the timed severities.
Each corruption is timed on ``--repeats`` passes per entry (median reported); the first pass includes
one-time set-up (cached operators and tables, built on first use per severity). The load average is
printed: on a shared machine compare ratios within a run. The ``make-c`` and ``stream`` rows read the source
.npz for every corruption; a real ``tta make-c`` or ``tta run`` reads it once, so each of the two is also
timed as one call for all 15 corruptions (``whole_runs``), which is the total to compare.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np
import torch

from tta.data import corruptions as C

ENTRIES = ("dataset", "functional", "Corrupt", "make-c", "stream")


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


def _import_baseline(folder):
    """``folder/tta`` as the package ``tta_baseline`` (its imports are relative, so it stays separate)."""
    init = Path(folder) / "tta" / "__init__.py"
    spec = importlib.util.spec_from_file_location("tta_baseline", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["tta_baseline"] = module
    spec.loader.exec_module(module)
    return importlib.import_module("tta_baseline.data.corruptions")


def timed(fn, device) -> float:
    start = time.perf_counter()
    fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def entry_runner(entry, images, floats, source, device, tmp):
    """A function (name, severity) -> None that corrupts all images through ``entry``."""
    if entry == "dataset":
        return lambda name, s: C.corrupt_dataset(images, name, s, seed=0, device=device)
    if entry == "functional":
        return lambda name, s: getattr(C, name)(floats, s, generator=torch.Generator(floats.device).manual_seed(0))
    if entry == "Corrupt":
        return lambda name, s: C.Corrupt(name, s, seed=0)(floats)
    if entry == "make-c":
        from tta.data.make_c import make_c
        return lambda name, s: make_c(source, tempfile.mkdtemp(prefix=f"{name}{s}_", dir=tmp), corruptions=[name],
                                      severities=[s], progress=False, device=device)   # a new folder: no skipping
    if entry == "stream":
        from tta.data import streams
        from tta.data.domains import DomainSet

        def play(name, s):
            domains = DomainSet("cifar10", "generate", os.path.dirname(source), len(images), 0, [name], [s])
            for _ in streams.build("continual", domains, batch_size=200):
                pass
        return play
    raise ValueError(entry)


def whole_runs(entries, images, source, device, tmp, names, severities) -> dict:
    """How a user runs all 15 corruptions at once: one ``make_c`` call (reads the source once), and one
    continual stream over one ``DomainSet`` (reads the clean set once), as ``tta make-c`` and ``tta run`` do. The per-corruption rows pay the source read every time."""
    names = [n for n in names if n in C.CORRUPTIONS]
    runs = {}
    if "make-c" in entries:
        from tta.data.make_c import make_c
        runs["make-c, one call for all 15"] = lambda: make_c(
            source, tempfile.mkdtemp(prefix="all_", dir=tmp), corruptions=names, severities=list(severities),
            progress=False, device=device)
    if "stream" in entries:
        from tta.data import streams
        from tta.data.domains import DomainSet

        def play():
            domains = DomainSet("cifar10", "generate", os.path.dirname(source), len(images), 0, names,
                                list(severities))
            for _ in streams.build("continual", domains, batch_size=200):
                pass
        runs["stream, one continual stream of all 15"] = play
    return runs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", default=None,
                   help="npz with x uint8 (N, 32, 32, 3); default $TTA_DATA_DIR/cifar10_test.npz")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--entries", nargs="+", default=["dataset"], choices=ENTRIES)
    p.add_argument("--baseline", default=None,
                   help="folder holding an older tta/ to time interleaved (corrupt_dataset)")
    p.add_argument("--repeats", type=int, default=1, help="time each (corruption, entry) this often, interleaved; "
                   "report the median")
    p.add_argument("--all-severities", action="store_true")
    p.add_argument("--ref-images", type=int, default=0, help="images timed for imagecorruptions (0 = skip)")
    p.add_argument("--extras", action="store_true", help="also time the 4 extra corruptions")
    p.add_argument("--images", type=int, default=None,
                   help="time only the first N images (CPU); the 150,000-image total is extrapolated")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    source = args.source or str(Path(os.environ.get("TTA_DATA_DIR", ".")) / "cifar10_test.npz")
    if args.device.startswith("cuda"):
        images = np.random.default_rng(0).integers(0, 256, (2000, 224, 224, 3), dtype=np.uint8)
        what, n_full = "2,000 random 224x224 images (ImageNet parameters)", 2000
        entries = [e for e in args.entries if e in ("dataset", "functional", "Corrupt")]
    else:
        images = np.load(source)["x"]
        n_full = len(images)
        if args.images:
            images = images[:args.images]
            subset = Path(tempfile.mkdtemp(prefix="tta_speed_")) / "cifar10_test.npz"
            np.savez(subset, x=images, y=np.load(source)["y"][:args.images])
            source = str(subset)
        what = f"{len(images):,} CIFAR-10 test images (32x32)"
        entries = list(args.entries)
    floats = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255).to(args.device)
    baseline = _import_baseline(args.baseline) if args.baseline else None
    severities = (1, 2, 3, 4, 5) if args.all_severities else (5,)
    names = C.ALL_CORRUPTIONS if args.extras else C.CORRUPTIONS
    lib = _import_imagecorruptions() if args.ref_images and not args.device.startswith("cuda") else None
    C.corrupt_dataset(images[:200], "frost", 1, seed=0, device=args.device)       # warm-up, texture cache
    tmp = tempfile.mkdtemp(prefix="tta_make_c_")
    runners = {e: entry_runner(e, images, floats, source, args.device, tmp) for e in entries}
    if baseline is not None:
        baseline.corrupt_dataset(images[:200], "frost", 1, seed=0, device=args.device)
        runners["baseline dataset"] = lambda name, s: baseline.corrupt_dataset(images, name, s, seed=0,
                                                                               device=args.device)
    print(f"{what}, device {args.device}, {torch.get_num_threads()} threads, severities {list(severities)}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    header = "| corruption | " + " | ".join(f"{e} img/s" for e in runners) + " |"
    if lib:
        header += f" imagecorruptions img/s ({args.ref_images} imgs, extrapolated) |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    totals = dict.fromkeys(runners, 0.0)
    total_ref, failed = 0.0, []
    for name in names:
        row = f"| {name} |"
        runs = {entry: [] for entry in runners}
        for _ in range(args.repeats):
            for entry, run in runners.items():
                runs[entry].append(sum(timed(lambda: run(name, s), args.device) for s in severities))
        for entry, times in runs.items():
            t = statistics.median(times)
            totals[entry] += t if name in C.CORRUPTIONS else 0.0
            row += f" {len(images) * len(severities) / t:,.0f} |"
        if lib:
            sub = images[:args.ref_images]
            try:
                tr = sum(timed(lambda: [lib.corrupt(img, corruption_name=name, severity=s) for img in sub], "cpu")
                         for s in severities)
            except Exception as err:  # the package breaks on new scikit-image for some corruptions
                row += f" fails ({type(err).__name__}) |"
                failed.append(name)
            else:
                total_ref += tr * len(images) / len(sub) if name in C.CORRUPTIONS else 0.0
                row += f" {len(sub) * len(severities) / tr:,.0f} |"
        print(row, flush=True)
    scale = n_full / len(images)
    n_total = 15 * n_full * len(severities)
    extrapolated = f", extrapolated from {len(images):,} images" if scale != 1.0 else ""
    print(f"\nTotal for the 15 corruptions ({n_total:,} images{extrapolated}), load average now "
          f"{os.getloadavg()[0]:.1f}:")
    for entry, t in totals.items():
        print(f"- {entry}: {t * scale:.2f} s (sum of the rows)")
    for entry, run in whole_runs(entries, images, source, args.device, tmp, names, severities).items():
        times = [timed(run, args.device) for _ in range(args.repeats)]
        print(f"- {entry}: {statistics.median(times) * scale:.2f} s")
    if lib:
        print(f"- imagecorruptions (extrapolated, without {', '.join(failed) or 'none'}): {total_ref * scale:.0f} s")


if __name__ == "__main__":
    main()
