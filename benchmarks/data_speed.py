"""The ImageNet-scale data path: decode throughput, stream memory, end-to-end img/s, ImageNet-C generation.

    python benchmarks/data_speed.py                      # everything below, on generated images, CPU
    python benchmarks/data_speed.py --only decode memory # a subset: decode, memory, end2end, generate
    python benchmarks/data_speed.py --device cuda        # stage two (and generation) on the GPU

All images are generated here (smooth colour blocks plus noise, JPEG quality 85, in a temporary folder or
``--workdir``), so nothing has to be downloaded:

* ``decode``: 5,000 224-px JPEGs (an ImageNet-C folder) decoded by the PIL loop (``load_images``, the old
  path) and by the chunked loader (torchvision decoder) with 0 and 2 worker processes;
* ``memory``: a 50,000-image 224-px stream (the 5,000 files played ten times, ``lifelong`` rounds, batch 64)
  consumed batch by batch: peak memory of this process plus its loader workers above the level at the start
  (sampled every 20 ms; see :class:`PeakRSS`), with 0 and 2 workers;
* ``end2end``: ``tta run``'s runner with the ``source`` method and timm's ``mobilenetv3_small_050`` (random
  weights, ~25 MFLOPs per image, so that the data path shows) on the 5,000-image domain, wall-clock img/s
  with 0 and 2 workers;
* ``generate``: ``tta make-c`` on 100 generated validation images (256-400 px), severity 5, per corruption.

Prints Markdown tables. Wall-clock numbers depend on the machine's load: say so when quoting them.
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch


def picture(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.random((h // 16 + 1, w // 16 + 1, 3))
    return (np.kron(base, np.ones((16, 16, 1)))[:h, :w] * 200 + rng.random((h, w, 3)) * 55).astype(np.uint8)


def make_tree(folder: Path, n: int, size=None, classes: int = 10) -> list:
    """``folder/<wnid>/<name>.JPEG`` for the first ``classes`` ImageNet ids; 224 px or 256-400 px images."""
    from PIL import Image
    from tta.data.classes import IMAGENET_WNIDS
    paths = []
    for k in range(n):
        wnid = IMAGENET_WNIDS[k % classes]
        h, w = (size, size) if size else (256 + (37 * k) % 144, 256 + (53 * k) % 144)
        p = folder / wnid / f"ILSVRC2012_val_{k:08d}.JPEG"
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.exists():
            Image.fromarray(picture(h, w, k)).save(p, quality=85)
        paths.append(p)
    return paths


class PeakRSS:
    """Peak memory (MiB) above the level at entry of this process plus its loader workers, two ways: ``peak``
    sums resident sets (counts the pages a forked worker shares with this process once more per worker, so it
    overstates), ``peak_unique`` adds only the workers' unique pages (USS) to this process's resident set."""

    def __init__(self, interval: float = 0.02):
        import psutil
        self.proc, self.interval, self.peak, self.peak_unique = psutil.Process(), interval, 0.0, 0.0

    def _sizes(self):
        own = self.proc.memory_info().rss
        rss, uss = own, own
        for child in self.proc.children(recursive=True):
            try:
                rss += child.memory_info().rss
                uss += child.memory_full_info().uss
            except Exception:  # a worker that just exited
                pass
        return rss / 2 ** 20, uss / 2 ** 20

    def __enter__(self):
        self.base, self.stop = self._sizes()[0], threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def _loop(self):
        while not self.stop.is_set():
            rss, uss = self._sizes()
            self.peak, self.peak_unique = max(self.peak, rss - self.base), max(self.peak_unique, uss - self.base)
            time.sleep(self.interval)

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def bench_decode(root: Path, device: str) -> None:
    from tta.data.datasets import load_images
    from tta.data.lazy import FileSource, LazyImages
    from tta.data.loader import iter_chunks
    paths = make_tree(root / "ImageNet-C" / "fog" / "5", 5000, size=224)
    t = time.perf_counter()
    load_images(paths)
    rows = [("PIL loop (load_images, old path)", 5000 / (time.perf_counter() - t))]
    for workers in (0, 2):
        images = LazyImages.of(FileSource(paths, "none", "torchvision"), workers)
        t = time.perf_counter()
        n = sum(len(x) for _, _, x in iter_chunks(images, device))
        rows.append((f"chunked loader, torchvision decoder, {workers} workers", n / (time.perf_counter() - t)))
    print("\n| decode 5,000 224-px JPEGs | img/s |\n|---|---|")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")


def _stream(root: Path, workers: int, rounds: int):
    from tta.data import streams
    from tta.data.domains import DomainSet
    ds = DomainSet("imagenet", "files", root, None, 0, ["fog"], [5], False, workers=workers)
    return streams.build("lifelong", ds, batch_size=64, rounds=rounds)


def bench_memory(root: Path, device: str) -> None:
    make_tree(root / "ImageNet-C" / "fog" / "5", 5000, size=224)
    print("\n| 50,000-image 224-px stream, batch 64 | peak MiB above start: RSS sum | main RSS + workers' USS | "
          "img/s | s |\n|---|---|---|---|---|")
    for workers in (0, 2):
        stream = _stream(root, workers, rounds=10)
        n, t = 0, time.perf_counter()
        with PeakRSS() as mem:
            for seg in stream.segments:
                for batch in stream.batches(seg, torch.device(device)):
                    n += len(batch.y)
                    float(batch.x.mean())
        dt = time.perf_counter() - t
        print(f"| {workers} workers ({n:,} images) | {mem.peak:,.0f} | {mem.peak_unique:,.0f} | {n / dt:,.0f} | "
              f"{dt:,.0f} |")


def bench_end2end(root: Path, device: str) -> None:
    from tta.eval.runner import run_config
    make_tree(root / "ImageNet-C" / "fog" / "5", 5000, size=224)
    print("\n| `source`, timm mobilenetv3_small_050 (random), 5,000 224-px images, batch 64 | wall img/s | "
          "adapter img/s | "
          "runner peak MiB |\n|---|---|---|---|")
    for workers in (0, 2):
        cfg = {"name": "bench", "device": device, "threads": 1, "progress": False, "setting": "continual",
               "model": {"name": "timm:mobilenetv3_small_050", "options": {"pretrained": False}},
               "data": {"dataset": "imagenet", "data_dir": str(root), "source": "files", "corruptions": ["fog"],
                        "severities": [5], "imagenet_subset": "all", "workers": workers},
               "stream": {"batch_size": 64}, "method": {"name": "source"}, "output": {"save": False}}
        t = time.perf_counter()
        res = run_config(cfg)
        dt = time.perf_counter() - t
        print(f"| {workers} workers | {5000 / dt:,.0f} | {res['img_per_s']:,.0f} | {res['peak_memory_mb']:,.0f} |")


def bench_generate(root: Path, device: str) -> None:
    from tta.data.corruptions import CORRUPTIONS
    from tta.data.make_c import make_imagenet_c
    val = root / "val"
    make_tree(val, 100)
    print("\n| `tta make-c` ImageNet-C, 100 images, severity 5 (decode, resize, corrupt, JPEG save) | img/s |"
          "\n|---|---|")
    total = 0.0
    for name in CORRUPTIONS:
        out = root / "made"
        t = time.perf_counter()
        make_imagenet_c(val, out, [name], [5], seed=0, progress=False, device=device, workers=0)
        dt = time.perf_counter() - t
        total += dt
        shutil.rmtree(out)
        print(f"| {name} | {100 / dt:,.1f} |")
    print(f"| all 15 | {1500 / total:,.1f} |")


BENCHES = {"decode": bench_decode, "memory": bench_memory, "end2end": bench_end2end, "generate": bench_generate}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHES), default=list(BENCHES))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the main process")
    parser.add_argument("--workdir", default=None, help="where the generated images go (default: a temp folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="tta_data_speed_"))
    try:
        for name in args.only:
            BENCHES[name](root, args.device)
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
