"""Source (unadapted) error of ``cifar_resnet20`` on each generated severity-5 corruption of CIFAR-10.

    python benchmarks/cifar10c_source_error.py [--model cifar_resnet20] [--severity 5] [--seed 0] [--n 10000]

Corrupts the CIFAR-10 test set (``$TTA_DATA_DIR/cifar10_test.npz``) on the fly with ``corrupt_dataset``
(identical to ``tta make-c`` files for the same seed) and prints a Markdown table: error % per corruption,
the mean over the 15, and the clean error. A sanity check of the engine against published numbers for
the released CIFAR-10-C (statistically, not bit-wise, comparable).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from tta.data import corruptions as C


def error_rate(model, images_u8_nchw: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    wrong = 0
    with torch.inference_mode():
        for i in range(0, len(labels), batch_size):
            pred = model(images_u8_nchw[i:i + batch_size].float() / 255).argmax(1)
            wrong += int((pred != labels[i:i + batch_size]).sum())
    return 100.0 * wrong / len(labels)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar_resnet20")
    p.add_argument("--severity", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n", type=int, default=10000, help="first n test images")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import tta.models

    data = np.load(Path(os.environ.get("TTA_DATA_DIR", ".")) / "cifar10_test.npz")
    x, y = data["x"][:args.n], torch.from_numpy(data["y"][:args.n])
    model = tta.models.load(args.model)
    start = time.perf_counter()
    clean = error_rate(model, torch.from_numpy(x).permute(0, 3, 1, 2), y)
    errors = {name: error_rate(model, C.corrupt_dataset(x, name, args.severity, seed=args.seed), y)
              for name in C.CORRUPTIONS}
    print(f"{args.model}, first {args.n} CIFAR-10 test images, severity {args.severity}, seed {args.seed}\n")
    print("| corruption | error % |\n|---|---|")
    for name, err in errors.items():
        print(f"| {name} | {err:.2f} |")
    print(f"| **mean (15)** | **{np.mean(list(errors.values())):.2f}** |")
    print(f"| clean | {clean:.2f} |")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
