"""Adaptation-step speed of the fast options (issue 15; issue 7 measured ``torch.compile`` alone).

    python benchmarks/compile_check.py --method tent --threads 1
    python benchmarks/compile_check.py --method tent --threads 2 --cold      # compile on an empty cache
    python benchmarks/compile_check.py --variants fp32 bf16+cl compile+bf16+cl

    python benchmarks/compile_check.py --threads-compare --hog 1            # threads 1 / all / auto, one core taken

Wraps the same model in the same method once per variant (``tta.wrap(model, method, precision=...,
memory_format=..., compile=...)``), runs each once on its first batches to warm it up (the compiled ones
compile there: that time is printed), then times all of them interleaved, ``--repeats`` times over the
same ``--batches`` noisy batches of 200, and prints img/s (median) and the ratio to eager fp32 as a
Markdown table. The adapters adapt while being timed (as in a run), each on its own copy of the model.

``--threads-compare`` times the eager fp32 step instead with 1 torch thread, with one per usable core and
with what ``threads: auto`` chooses (interleaved, same batches); ``--hog N`` first starts N busy-looping
processes (stopped at the end), which is the oversubscription trap of issue 15: another process holding
a core while torch runs one thread per core.

The compile cache is the tta one (``<tta cache>/torch_compile``), so a second run of this script measures
a warm cache; ``--cold`` points Inductor at an empty temporary folder instead (every compiled variant
then pays the full compilation).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "fp32": {},
    "cl": {"memory_format": "channels_last"},
    "bf16": {"precision": "bf16"},
    "bf16+cl": {"precision": "bf16", "memory_format": "channels_last"},
    "compile": {"compile": "on"},
    "compile+cl": {"compile": "on", "memory_format": "channels_last"},
    "compile+bf16+cl": {"compile": "on", "precision": "bf16", "memory_format": "channels_last"},
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tent")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--cold", action="store_true", help="compile into an empty temporary cache")
    ap.add_argument("--threads-compare", action="store_true", help="time 1 / all / auto torch threads instead")
    ap.add_argument("--hog", type=int, default=0, help="busy-looping processes to run meanwhile")
    args = ap.parse_args(argv)
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.hog)]
    try:
        if args.threads_compare:
            return compare_threads(args)
        return compare_variants(args)
    finally:
        for hog in hogs:
            hog.kill()


def noisy_batches(n):
    from tta.data.corruptions import corrupt_dataset
    from tta.data.datasets import load_cifar10, to_float
    x, _ = load_cifar10(split="test")
    return list(to_float(corrupt_dataset(x[:200 * n], "gaussian_noise", 5, seed=0)).split(200))


def compare_threads(args):
    import torch

    import tta
    from tta import fast
    time.sleep(1.0)  # let the hogs start
    chosen, note = fast.auto_threads()
    counts = {"1 thread": 1, f"{fast.usable_cores()} threads (all cores)": fast.usable_cores(),
              f"auto ({chosen})": chosen}
    batches = noisy_batches(args.batches)
    adapter = tta.wrap(tta.models.load(args.model), args.method)
    adapter(batches[0])
    times = {k: [] for k in counts}
    for _ in range(args.repeats):
        for name, k in counts.items():
            torch.set_num_threads(k)
            t0 = time.perf_counter()
            for b in batches:
                adapter(b)
            times[name].append(time.perf_counter() - t0)
    n = 200 * args.batches
    base = statistics.median(times["1 thread"])
    print(f"{args.model}, {args.method}, batch 200, {args.hog} busy-looping process(es) started, load average "
          f"{os.getloadavg()[0]:.1f}; auto: {note or 'all cores idle'}\n")
    print("| torch threads | img/s | vs 1 thread |\n|---|---|---|")
    for name in counts:
        t = statistics.median(times[name])
        print(f"| {name} | {n / t:.0f} | {base / t:.2f} |")


def compare_variants(args):
    if args.cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tta_cold_compile_")
    import torch

    import tta
    torch.set_num_threads(args.threads)
    batches = noisy_batches(args.batches)
    adapters, warm = {}, {}
    for name in args.variants:
        adapters[name] = tta.wrap(tta.models.load(args.model), args.method, **VARIANTS[name])
        t0 = time.perf_counter()
        for b in batches[:2]:
            adapters[name](b)
        warm[name] = time.perf_counter() - t0
    times = {name: [] for name in args.variants}
    for _ in range(args.repeats):
        for name, adapter in adapters.items():
            t0 = time.perf_counter()
            for b in batches:
                adapter(b)
            times[name].append(time.perf_counter() - t0)
    n = 200 * args.batches
    base = statistics.median(times[args.variants[0]])
    cache = "cold (empty)" if args.cold else "warm if run before"
    print(f"{args.model}, {args.method}, batch 200, {args.threads} thread(s), compile cache {cache}, "
          f"load average {os.getloadavg()[0]:.1f}\n")
    print(f"| variant | img/s | vs {args.variants[0]} | first 2 batches (s, compile included) |")
    print("|---|---|---|---|")
    for name in args.variants:
        t = statistics.median(times[name])
        print(f"| {name} | {n / t:.0f} | {base / t:.2f} | {warm[name]:.1f} |")


if __name__ == "__main__":
    main()
