"""Does ``torch.compile`` of the model speed up an adapter step? (issue 7: measure, keep only if it helps)

    python benchmarks/compile_check.py --method tent --threads 1

Wraps an eager and a ``torch.compile``d cifar_resnet20 in the same method, warms both up (the compiled
one compiles on its first batches), then times them interleaved on the same noisy batches; prints
img/s, the ratio and the compile (warm-up) time.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tta
from tta.data.corruptions import corrupt_dataset
from tta.data.datasets import load_cifar10, to_float


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="tent")
    ap.add_argument("--model", default="cifar_resnet20")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    x, _ = load_cifar10(split="test")
    batches = list(to_float(corrupt_dataset(x[:200 * args.batches], "gaussian_noise", 5, seed=0)).split(200))
    eager = tta.wrap(tta.models.load(args.model), args.method)
    compiled = tta.wrap(torch.compile(tta.models.load(args.model)), args.method)
    t0 = time.perf_counter()
    for b in batches[:2]:
        compiled(b)
    warm = time.perf_counter() - t0
    eager(batches[0])
    times = {"eager": [], "compiled": []}
    for _ in range(args.repeats):
        for name, adapter in (("eager", eager), ("compiled", compiled)):
            t0 = time.perf_counter()
            for b in batches:
                adapter(b)
            times[name].append(time.perf_counter() - t0)
    n = 200 * args.batches
    e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
    print(f"| {args.method} | {args.model} | {n / e:.0f} | {n / c:.0f} | {e / c:.2f} | {warm:.0f} s |")


if __name__ == "__main__":
    main()
