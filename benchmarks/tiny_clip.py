"""Zero-shot vs TENT vs CLIPTTA on corrupted CIFAR-10 with a *small self-trained* CLIP (not OpenAI CLIP).

No pretrained CLIP weights can be had offline, so this trains a tiny open_clip ViT from scratch with
open_clip's own contrastive loss (``open_clip.ClipLoss``) on the CIFAR-10 training images in
``TTA_DATA_DIR`` (captions: a random one of the 80 ImageNet templates x the class name), caches it
under ``~/.cache/tta/``, then adapts it on corrupted test images (``tta.data.corruptions``, severity 5,
reset for each corruption) and prints a Markdown table of errors. Numbers say whether the methods run
and behave sensibly on a CLIP-shaped model; they say nothing about OpenAI CLIP's numbers.

    python benchmarks/tiny_clip.py [--train-seconds 420 | --train-steps N] [--n-test 2000] [--threads 1]

Training stops after ``--train-seconds`` of wall time (the schedule follows the clock), or after exactly
``--train-steps`` steps (the schedule follows the step: the same weights on a loaded or a quiet machine, so
prefer it on shared cores). Which one made the cached checkpoint, and how many steps it took, is written
next to it (``tiny_clip_cifar10.json``); ``benchmarks/clip_table.py`` reuses the same checkpoint.
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

import tta
from tta.data.corruptions import corrupt_dataset
from tta.data.datasets import load_cifar10, to_float
from tta.models import clip
from tta.paths import cache_dir

ARCH = "tta-tiny-cifar"
CONFIG = clip.tiny_config(image_size=32, patch_size=8, width=128, layers=3, text_width=64, text_layers=2,
                          context_length=16, embed_dim=64)
CORRUPTIONS = ("gaussian_noise", "defocus_blur", "snow", "contrast", "jpeg_compression")


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random 4-px-padded crop and horizontal flip, batched (same crop for the batch, per-image flip)."""
    dy, dx = torch.randint(0, 9, (2,), generator=g).tolist()
    x = F.pad(x, (4, 4, 4, 4), mode="reflect")[..., dy:dy + 32, dx:dx + 32]
    flip = torch.rand(len(x), generator=g) < 0.5
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train(path, seconds: float, batch: int = 256, lr: float = 1e-3, warmup: int = 60,
          steps: Optional[int] = None) -> None:
    """Contrastive training from scratch; ``steps`` (if given) replaces the wall-clock budget ``seconds``."""
    import open_clip

    open_clip.factory._MODEL_CONFIGS[ARCH] = CONFIG
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH)
    tok = open_clip.get_tokenizer(ARCH)
    names, templates = clip.class_names("cifar10"), clip.prompt_templates("ensemble")
    tokens = tok([t.format(c) for c in names for t in templates]).view(len(names), len(templates), -1)
    x_all, y_all = load_cifar10(split="train")
    mean, std = torch.tensor(clip.CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(clip.CLIP_STD).view(1, 3, 1, 1)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    loss_fn = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(0)
    steps_per_epoch = len(x_all) // batch
    start, step, epoch = time.time(), 0, 0

    def done() -> bool:
        return step >= steps if steps is not None else time.time() - start >= seconds

    model.train()
    while not done():
        order = torch.randperm(len(x_all), generator=g)
        for i in range(steps_per_epoch):
            frac = step / steps if steps is not None else min(1.0, (time.time() - start) / seconds)
            for group in opt.param_groups:  # linear warm-up (a hot start collapses the text side), then cosine
                group["lr"] = lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + torch.cos(torch.tensor(frac * torch.pi))).item()
            idx = order[i * batch:(i + 1) * batch]
            x = (augment(to_float(x_all[idx]), g) - mean) / std
            captions = tokens[y_all[idx], torch.randint(0, len(templates), (len(idx),), generator=g)]
            img, txt = model.encode_image(x, normalize=True), model.encode_text(captions, normalize=True)
            loss = loss_fn(img, txt, model.logit_scale.exp())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, 4.6052)
            step += 1
            if done():
                break
        epoch += 1
        print(f"epoch {epoch}: step {step}, loss {loss.item():.3f}, {time.time() - start:.0f}s", flush=True)
    torch.save(model.state_dict(), path)
    info = {"arch": ARCH, "config": CONFIG, "steps": step, "epochs_started": epoch, "batch": batch,
            "budget": {"steps": steps} if steps is not None else {"seconds": seconds},
            "wall_seconds": round(time.time() - start, 1), "final_loss": round(loss.item(), 4),
            "threads": torch.get_num_threads(), "train_images": len(x_all)}
    Path(path).with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")


def checkpoint(train_seconds: float = 420, train_steps: Optional[int] = None) -> Path:
    """The cached tiny-CLIP weights under the tta cache folder, trained first if absent."""
    path = cache_dir() / "tiny_clip_cifar10.pt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        train(path, train_seconds, steps=train_steps)
    return path


def training_info(path) -> dict:
    """How the cached checkpoint was trained (empty for a checkpoint made before this was recorded)."""
    meta = Path(path).with_suffix(".json")
    return json.loads(meta.read_text()) if meta.exists() else {}


def evaluate(adapter, x_u8: torch.Tensor, y: torch.Tensor, batch: int = 128) -> float:
    adapter.reset()
    wrong = 0
    for i in range(0, len(x_u8), batch):
        logits = adapter(to_float(x_u8[i:i + batch]))
        wrong += int((logits.argmax(1) != y[i:i + batch]).sum())
    return 100.0 * wrong / len(x_u8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--train-seconds", type=float, default=420)
    ap.add_argument("--train-steps", type=int, default=None, help="a fixed number of steps instead of seconds")
    ap.add_argument("--n-test", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    path = checkpoint(args.train_seconds, args.train_steps)
    x_test, y_test = load_cifar10(split="test")
    x_test, y_test = x_test[:args.n_test], y_test[:args.n_test]
    methods = {"zero-shot": ("source", {}), "TENT (10 steps, Adam 1e-3)": ("tent", {"steps": 10}),
               "CLIPTTA (CIFAR-10 defaults)": ("cliptta", {})}
    domains = {"clean": x_test, **{c: corrupt_dataset(x_test, c, 5, seed=0) for c in CORRUPTIONS}}
    rows = {}
    for label, (name, kw) in methods.items():
        t = time.time()
        model = clip.load(f"{ARCH}/none", checkpoint=str(path), model_config=CONFIG, classes="cifar10",
                          templates="ensemble")
        adapter = tta.wrap(model, name, **kw)
        rows[label] = [evaluate(adapter, xs, y_test) for xs in domains.values()]
        print(f"{label}: {time.time() - t:.0f}s", flush=True)
    print(f"\nError (%) on the first {args.n_test} CIFAR-10 test images, severity 5, batch 128, reset per "
          "domain; small self-trained open_clip ViT (not OpenAI CLIP).\n")
    print("| method | " + " | ".join(domains) + " | mean (corrupted) |")
    print("|---" * (len(domains) + 2) + "|")
    for label, errs in rows.items():
        mean = sum(errs[1:]) / len(errs[1:])
        print(f"| {label} | " + " | ".join(f"{e:.1f}" for e in errs) + f" | {mean:.1f} |")


if __name__ == "__main__":
    main()
