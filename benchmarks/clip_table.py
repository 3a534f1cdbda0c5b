"""Every CLIP method on CIFAR-10 and generated CIFAR-10-C with the *small self-trained* CLIP of tiny_clip.py.

No pretrained CLIP weights can be had offline. This reuses the tiny open_clip ViT that
``benchmarks/tiny_clip.py`` trains from scratch on the 10,000 CIFAR-10 training images in ``TTA_DATA_DIR``
(cached as ``tiny_clip_cifar10.pt`` under the tta cache folder, trained first if absent), and runs each method
through the runner (``tta.eval.runner.run_config``) from its own config ``configs/cifar10c_clip/<method>.yaml``,
changing only the model (the tiny CLIP, the config's own class names and templates), the data (the first
``--n`` test images, clean and corrupted by the corruption engine at severity 5, ``data.source=generate``),
the thread count and the output folder. Setting: reset each shift, as the configs say. Each method runs in
its own process (peak memory is the runner's "resident set above start", so methods must not share a
process), and a finished method is not run again (its ``cells/<row>.json`` is reused), so an interrupted
table resumes. Prints (and writes ``table.md``) accuracy, ECE, img/s, the ratio to zero-shot's img/s and
peak memory per method.

DiffTPT: no Stable Diffusion weights can be had here either. Its 63 "diffusion" views come from
:class:`CropFlipViews`, a cheap generator through DiffTPT's callable interface ``views(images, n)``: 63 more
crop-flip views of the shared CLIP view generator. The row is labelled so; it is not Stable Diffusion.

Numbers say whether the methods run and behave sensibly on a CLIP-shaped model of about 48 % clean accuracy;
they say nothing about the methods' numbers on OpenAI CLIP.

    TTA_DATA_DIR=../shared/data python benchmarks/clip_table.py [--n 500] [--methods M ...] \\
        [--corruptions C ...] [--out DIR] [--threads 1] [--train-steps 1200]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

import tiny_clip  # noqa: E402

CONFIGS = ROOT / "configs" / "cifar10c_clip"
# tiny_clip.py's five (BENCHMARKS.md section 4) and one more of each family: noise, blur, weather, digital
CORRUPTIONS = (*tiny_clip.CORRUPTIONS, "motion_blur", "fog", "pixelate")
# row label -> (config file, extra overrides). zero-shot first: the speed ratios are to it.
ROWS: Dict[str, tuple] = {
    "zero-shot": ("zeroshot.yaml", []),
    "zero-shot, 80 templates": ("zeroshot.yaml", ["model.options.templates=ensemble"]),
    "tpt": ("tpt.yaml", []),
    "cliptta": ("cliptta.yaml", []),
    "adte_views": ("adte_views.yaml", []),
    "zero": ("zero.yaml", []),
    "mta": ("mta.yaml", []),
    "vte": ("vte.yaml", []),
    "tda": ("tda.yaml", []),
    "boostadapter": ("boostadapter.yaml", []),
    "dpe": ("dpe.yaml", []),
    "dmn_zs": ("dmn_zs.yaml", []),
    "ctpt": ("ctpt.yaml", []),
    "tps": ("tps.yaml", []),
    "difftpt (63 crop-flip views, not SD)": ("difftpt.yaml", []),
    "watt": ("watt.yaml", []),
    "clipartt": ("clipartt.yaml", []),
    "tent": ("tent.yaml", []),  # not a CLIP method: TENT on the visual LayerNorms (BENCHMARKS.md section 4)
    "cliptta_text": ("cliptta_text.yaml", []),
    "zero-shot, rerun last": ("zeroshot.yaml", []),  # the spread of img/s on a shared machine
}
GENERATED = "difftpt"  # rows whose config gets the CropFlipViews generator


class CropFlipViews:
    """``views(images, n) -> (B, n, C, S, S)``: n crop-flip views per image from the shared CLIP view generator
    (:class:`tta.parts.clip_views.CLIPViews`), drawn from torch's global generator (DiffTPT's ``generate`` seeds
    it per image). A cheap stand-in for Stable Diffusion image variations; picklable (the runner checkpoints
    the adapter after every domain)."""

    def __call__(self, images: torch.Tensor, n: int) -> torch.Tensor:
        from tta.parts.clip_views import SEED_RANGE, CLIPViews
        seeds = torch.randint(0, SEED_RANGE, (len(images),))
        return CLIPViews("crop_flip", n + 1, images.shape[-1])(images, seeds)[:, 1:]

    def __repr__(self) -> str:
        return "benchmarks.clip_table.CropFlipViews()"


def _represent_generator(dumper, value):
    # the runner hashes and writes the resolved config as YAML: record the generator by name
    return dumper.represent_str(repr(value))


def cell_config(row: str, args) -> dict:
    """The resolved config of one row: the method's CIFAR-10-C CLIP config, the tiny CLIP, generated domains."""
    from tta import config as config_mod

    file, extra = ROWS[row]
    domains = ["clean", *args.corruptions]
    overrides = [
        "model.name=openclip:" + tiny_clip.ARCH + "/none", f"model.checkpoint={args.checkpoint}",
        "model.options.model_config=" + json.dumps(tiny_clip.CONFIG),
        "data.source=generate", f"data.n_examples={args.n}", "data.corruptions=" + json.dumps(domains),
        "data.severities=[5]", f"threads={args.threads}", "progress=false", "seed=1",
        "output.save=true", "output.dir=" + str(Path(args.out) / "runs"), "output.run_name=" + slug(row),
        *extra]
    cfg = config_mod.load(CONFIGS / file, overrides)
    if cfg["method"]["name"] == GENERATED:
        import yaml
        yaml.SafeDumper.add_representer(CropFlipViews, _represent_generator)
        cfg["method"]["generator"] = CropFlipViews()
    return cfg


def slug(row: str) -> str:
    return row.split(" (")[0].replace(", ", "_").replace(" ", "_")


def run_cell(row: str, args) -> None:
    """One row in this process: run_config, then ``cells/<row>.json`` (atomically)."""
    from tta.eval.runner import run_config

    torch.set_num_threads(args.threads)
    cfg = cell_config(row, args)
    t = time.time()
    results = run_config(cfg)
    results.pop("batch_errors", None)
    results.update(row=row, wall_s=time.time() - t, load_avg=os.getloadavg(), n_per_domain=args.n)
    out = Path(args.out) / "cells" / f"{slug(row)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    os.replace(tmp, out)


def table(rows: List[str], cells: Dict[str, dict], domains: List[str], info: dict, args) -> str:
    ref = cells.get("zero-shot", {}).get("img_per_s")
    clean_acc = info.get("clean_accuracy_10k")
    weights = (f"the tiny CLIP trained by benchmarks/tiny_clip.py ({tiny_clip.ARCH}: ViT 32 px, patch 8, width 128, "
               f"3 layers; {info.get('steps', '?')} steps of batch 256 on the 10,000 CIFAR-10 training images"
               + (f"; {clean_acc:.1f} % zero-shot accuracy, single template, on all 10,000 test images" if clean_acc
                  else "") + ")")
    lines = [f"Weights: {weights}. Not OpenAI CLIP.", "",
             f"First {args.n} CIFAR-10 test images per domain; corruptions made by the engine at severity 5 "
             f"(data.source=generate, seed 0); reset each shift; each method from configs/cifar10c_clip/<method>.yaml "
             f"(its batch size and options), 1 torch thread per method.", "",
             "Accuracy (%) and img/s, peak memory (resident set above start, MiB):", "",
             "| method | " + " | ".join(domains) + " | mean (corrupted) | img/s | × zero-shot | peak MiB |",
             "|---" * (len(domains) + 5) + "|"]
    for row in rows:
        c = cells.get(row)
        if c is None or "error_message" in c:
            lines.append(f"| {row} | " + " | ".join("-" for _ in domains) + " | failed | - | - | - |")
            continue
        acc = {d["domain"]: 100 - d["error"] for d in c["domains"]}
        corr = [acc[d] for d in domains[1:]]
        speed = c["img_per_s"]
        lines.append(f"| {row} | " + " | ".join(f"{acc[d]:.1f}" for d in domains)
                     + f" | {sum(corr) / len(corr):.1f} | {speed:.1f} | "
                     + (f"{speed / ref:.3f}" if ref else "-") + f" | {c['peak_memory_mb']:.0f} |")
    lines += ["", "ECE (%, 15 bins):", "", "| method | " + " | ".join(domains) + " | mean (corrupted) |",
              "|---" * (len(domains) + 2) + "|"]
    for row in rows:
        c = cells.get(row)
        if c is None or "error_message" in c:
            continue
        ece = {d["domain"]: d["ece"] for d in c["domains"]}
        corr = [ece[d] for d in domains[1:]]
        lines.append(f"| {row} | " + " | ".join(f"{ece[d]:.1f}" for d in domains)
                     + f" | {sum(corr) / len(corr):.1f} |")
    return "\n".join(lines) + "\n"


def clean_accuracy(path: Path, threads: int) -> float:
    """Zero-shot accuracy (single template) of the checkpoint on all 10,000 CIFAR-10 test images."""
    from tta.data.datasets import load_cifar10, to_float
    from tta.models import clip

    torch.set_num_threads(threads)
    model = clip.load(f"{tiny_clip.ARCH}/none", checkpoint=str(path), model_config=tiny_clip.CONFIG,
                      classes="cifar10", templates="single")
    x, y = load_cifar10(split="test")
    right = 0
    with torch.no_grad():
        for i in range(0, len(x), 500):
            right += int((model(to_float(x[i:i + 500])).argmax(1) == y[i:i + 500]).sum())
    return 100.0 * right / len(x)


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=500, help="test images per domain")
    ap.add_argument("--methods", nargs="+", default=list(ROWS), help="row labels (default: all)")
    ap.add_argument("--corruptions", nargs="+", default=list(CORRUPTIONS))
    ap.add_argument("--out", default="results/clip_table")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train-seconds", type=float, default=420)
    ap.add_argument("--train-steps", type=int, default=None, help="train the checkpoint (if absent) for N steps")
    ap.add_argument("--checkpoint", default=None, help="use these weights instead of the cached tiny CLIP")
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one row in this process
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cell is not None:
        return run_cell(args.cell, args)
    unknown = [m for m in args.methods if m not in ROWS]
    if unknown:
        ap.error(f"unknown rows {unknown}; choose from {list(ROWS)}")
    if args.checkpoint is None:
        args.checkpoint = str(tiny_clip.checkpoint(args.train_seconds, args.train_steps))
    out = Path(args.out)
    info = dict(tiny_clip.training_info(args.checkpoint))
    info_file = out / "weights.json"
    if info_file.exists():
        info.update(json.loads(info_file.read_text()))
    if "clean_accuracy_10k" not in info:
        info["clean_accuracy_10k"] = clean_accuracy(Path(args.checkpoint), args.threads)
        out.mkdir(parents=True, exist_ok=True)
        info_file.write_text(json.dumps(info, indent=1) + "\n")
    print(f"weights: {args.checkpoint}, zero-shot clean accuracy {info['clean_accuracy_10k']:.2f} % (10,000 images)",
          flush=True)
    rows = [r for r in ROWS if r in args.methods]
    cells: Dict[str, dict] = {}
    for row in rows:
        path = out / "cells" / f"{slug(row)}.json"
        if not path.exists():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--cell", row, "--n", str(args.n), "--out", str(out),
                   "--threads", str(args.threads), "--checkpoint", args.checkpoint, "--corruptions", *args.corruptions]
            t = time.time()
            proc = subprocess.run(cmd, capture_output=True, text=True,
                                  env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
            if proc.returncode != 0:
                print(f"{row}: FAILED after {time.time() - t:.0f}s\n{proc.stderr[-3000:]}", flush=True)
                cells[row] = {"error_message": proc.stderr[-3000:]}
                continue
        cells[row] = json.loads(path.read_text())
        c = cells[row]
        print(f"{row}: mean error {c['mean_error']:.2f}, mean ECE {c['mean_ece']:.2f}, {c['img_per_s']:.1f} img/s, "
              f"peak {c['peak_memory_mb']:.0f} MiB, {c['wall_s']:.0f}s wall, load {c['load_avg'][0]:.1f}", flush=True)
    text = table(rows, cells, ["clean", *[f"{c}-5" for c in args.corruptions]], info, args)
    (out / "table.md").write_text(text)
    print("\n" + text)


if __name__ == "__main__":
    main()
