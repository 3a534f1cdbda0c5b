"""The end-to-end oracle of shared/docs/REFERENCE.md: errors on the 4-domain "dev stream".

    python benchmarks/reference_oracle.py --methods source norm tent eata sar deyo
    python benchmarks/reference_oracle.py --methods zoo          # the twelve METHODS-ZOO methods

Rebuilds the stream exactly (first 5,000 CIFAR-10 test images, noise/contrast/blur/dark, continual,
batches of 200 in file order), runs each method on cifar_resnet20 and prints its per-domain errors next
to the reference implementation's. Each method is configured by its ``configs/cifar10c/<method>.yaml``
(the reference's CIFAR-10-C defaults, source data included) through the runner, so the oracle checks
exactly what ``tta run`` runs. Needs TTA_DATA_DIR.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from tta import config
from tta.data.datasets import load_cifar10
from tta.eval.runner import build_adapter

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "cifar10c"
DOMAINS = ("noise", "contrast", "blur", "dark")

REFERENCE = {  # errors (%) of the widely used reference implementation, REFERENCE.md
    "source": (75.40, 73.24, 41.64, 13.72), "norm": (41.76, 21.02, 18.62, 9.72),
    "tent": (40.68, 21.14, 17.58, 9.44), "eata": (40.72, 21.08, 16.66, 9.34),
    "sar": (41.52, 21.04, 18.62, 9.72), "deyo": (40.76, 20.66, 17.00, 9.20),
    "norm_alpha": (53.36, 52.10, 28.08, 11.34), "norm_alpha_bs1": (58.58, 54.86, 30.08, 12.20),
    "eta": (40.70, 21.08, 16.68, 9.38), "rdumb": (40.70, 21.08, 16.68, 9.38),
    "norm_ema": (44.54, 43.78, 25.08, 18.54), "ttaug": (54.60, 38.74, 29.94, 8.56),
    "memo": (54.40, 57.80, 29.90, 8.60), "rpl": (40.92, 20.82, 17.62, 9.40),
    "lame": (89.32, 89.84, 88.80, 38.94), "rotta": (47.88, 45.18, 24.92, 16.62),
    "rmt": (35.72, 18.78, 15.28, 8.56), "roid": (40.48, 21.18, 16.98, 9.28),
    "cmf": (40.46, 21.18, 16.90, 9.24), "santa": (40.58, 21.40, 17.50, 9.76),
    "adacontrast": (42.80, 23.68, 21.78, 12.68), "gtta": (41.50, 20.92, 17.88, 9.60),
}
ZOO = ("norm_ema", "ttaug", "memo", "rpl", "lame", "rotta", "rmt", "roid", "cmf", "santa", "adacontrast", "gtta")
# rows that differ from "configs/cifar10c/<row>.yaml at batch 200 on 5,000 images per domain" (REFERENCE.md)
ROWS = {
    "norm_alpha_bs1": dict(config="norm_alpha", batch=1),  # each image alone
    "memo": dict(images=1000),  # episodic per image: a prefix of each domain is an exact subset of a full run
}
# the dev stream runs SAR and DeYO as the reference does on CIFAR: every BN layer adapted
OVERRIDES = {"sar": ["method.skip_top=false"], "deyo": ["method.skip_top=false"]}


def dev_stream(data_dir=None):
    """The four domains, each a (5000, 3, 32, 32) float tensor, plus the labels."""
    x, y = load_cifar10(data_dir, split="test")
    x, y = x[:5000].float() / 255, y[:5000]
    g = torch.Generator().manual_seed(0)
    noise = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    m = x.mean(dim=(2, 3), keepdim=True)
    contrast = ((x - m) * 0.15 + m).clamp(0, 1)
    blur = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    dark = x * 0.4
    return [noise, contrast, blur, dark], y


def build(row: str, data_dir=None, overrides=()):
    """The adapter of oracle row ``row`` around cifar_resnet20, seeded with 1 as the reference."""
    name = ROWS.get(row, {}).get("config", row)
    cfg = config.load(CONFIGS / f"{name}.yaml", [*OVERRIDES.get(row, []), "model.name=cifar_resnet20",
                                                 "seed=1", *overrides])
    return build_adapter(cfg, torch.device("cpu"), data_dir)


def run_method(row, domains, y, data_dir=None, overrides=()):
    """Per-domain errors (%), img/s and the adapter."""
    batch = ROWS.get(row, {}).get("batch", 200)
    images = ROWS.get(row, {}).get("images", len(y))
    adapter = build(row, data_dir, overrides)
    errors, t0 = [], time.perf_counter()
    for x in domains:
        wrong = 0
        for i in range(0, images, batch):
            wrong += int((adapter(x[i:i + batch]).argmax(1) != y[i:i + batch]).sum())
        errors.append(100.0 * wrong / images)
    return errors, 4 * images / (time.perf_counter() - t0), adapter


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["source", "norm", "tent", "eata", "sar", "deyo"],
                    help="rows of REFERENCE.md; 'zoo' stands for the twelve METHODS-ZOO methods")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for every method, e.g. method.lr=0.0005")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [m for r in args.methods for m in (ZOO if r == "zoo" else [r])]
    domains, y = dev_stream()
    print("| method | " + " | ".join(DOMAINS) + " | mean | reference mean | diff of means (pp) | max abs diff (pp) | img/s |")
    print("|---" * 10 + "|")
    for row in rows:
        errors, speed, _ = run_method(row, domains, y, overrides=args.overrides)
        ref = REFERENCE.get(row)
        diff = max(abs(a - b) for a, b in zip(errors, ref)) if ref else float("nan")
        mean = sum(errors) / 4
        ref_mean = sum(ref) / 4 if ref else float("nan")
        print(f"| {row} | " + " | ".join(f"{e:.2f}" for e in errors) +
              f" | {mean:.2f} | {ref_mean:.2f} | {mean - ref_mean:+.2f} | {diff:.2f} | {speed:.0f} |", flush=True)


if __name__ == "__main__":
    main()
