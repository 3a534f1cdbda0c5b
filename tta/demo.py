"""``tta demo``: an offline, self-contained demonstration of test-time adaptation (a demo, not a benchmark).

No download and no data file: ten classes of procedurally drawn shapes (32×32 RGB, random position,
size, colours and background texture) train a small BatchNorm CNN for a few epochs (cached after the
first run under ``~/.cache/tta/demo``). The held-out test split is then shifted with the toolkit's own
corruption engine and the source model, BN adaptation and TENT are compared, continual over the
corruptions, each with its own adapter. The whole thing takes well under three minutes on 2 CPU cores.
"""
from __future__ import annotations

import math
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .paths import cache_dir

CLASSES = ("disc", "square", "triangle", "cross", "ring", "hbar", "vbar", "diamond", "x", "dots")
SHIFTS = ("gaussian_noise", "defocus_blur", "contrast", "fog", "pixelate")
METHODS = ("source", "norm", "tent")
MODEL_VERSION = 1


def make_shapes(n: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (uint8, N×3×32×32) of the ten shape classes, balanced, from one seeded generator."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % len(CLASSES)
    y = y[torch.randperm(n, generator=g)]
    coords = torch.arange(32, dtype=torch.float32) + 0.5
    yy, xx = coords.view(1, 32, 1), coords.view(1, 1, 32)
    cx, cy = (torch.rand(n, generator=g) * 12 + 10).view(n, 1, 1), (torch.rand(n, generator=g) * 12 + 10).view(n, 1, 1)
    r = (torch.rand(n, generator=g) * 4 + 6).view(n, 1, 1)
    dx, dy = xx - cx, yy - cy
    adx, ady = dx.abs(), dy.abs()
    t = r / 3.5  # stroke width
    masks = torch.stack([
        dx ** 2 + dy ** 2 <= r ** 2,                                        # disc
        (adx <= r * 0.8) & (ady <= r * 0.8),                                # square
        (dy <= r * 0.7) & (dy >= -r * 0.9) & (adx <= (dy + r * 0.9) * 0.6),  # triangle
        ((adx <= t) & (ady <= r)) | ((ady <= t) & (adx <= r)),              # cross
        ((dx ** 2 + dy ** 2).sqrt() - r * 0.8).abs() <= t,                  # ring
        (adx <= r) & (ady <= t),                                            # horizontal bar
        (ady <= r) & (adx <= t),                                            # vertical bar
        adx + ady <= r,                                                     # diamond
        ((dx - dy).abs() <= t * 1.2) & ((dx + dy).abs() <= t * 1.2 + 2 * r) & (adx <= r) & (ady <= r)
        | ((dx + dy).abs() <= t * 1.2) & (adx <= r) & (ady <= r),           # x
        ((dx - r * 0.6) ** 2 + dy ** 2 <= (t * 1.3) ** 2) | ((dx + r * 0.6) ** 2 + dy ** 2 <= (t * 1.3) ** 2),  # dots
    ], 1)  # (n, 10, 32, 32)
    mask = masks[torch.arange(n), y].unsqueeze(1).float()
    fg = torch.rand(n, 3, 1, 1, generator=g) * 0.6 + 0.4
    bg = torch.rand(n, 3, 1, 1, generator=g) * 0.4
    freq = torch.rand(n, 1, 1, 1, generator=g) * 0.5 + 0.1
    phase = torch.rand(n, 1, 1, 1, generator=g) * 2 * math.pi
    texture = 0.08 * torch.sin(freq * (xx + yy).unsqueeze(0) + phase)
    img = bg + texture + mask * (fg - bg) + 0.03 * torch.randn(n, 3, 32, 32, generator=g)
    return (img.clamp(0, 1) * 255).to(torch.uint8), y


class SmallNet(nn.Module):
    """Four conv-BN-ReLU blocks and a linear head: small enough to train on CPU in seconds."""

    def __init__(self, classes: int = len(CLASSES)):
        super().__init__()
        layers, c_in = [], 3
        for c_out, stride in ((16, 1), (32, 2), (64, 2), (64, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x):
        return self.head(F.adaptive_avg_pool2d(self.features(x), 1).flatten(1))


def trained_model(epochs: int = 4, n_train: int = 12000, log=print) -> nn.Module:
    """The demo network, trained once on shapes and cached."""
    path = cache_dir() / "demo" / f"shapes_smallnet_v{MODEL_VERSION}.pt"
    model = SmallNet()
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    torch.manual_seed(0)
    x, y = make_shapes(n_train, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    steps = epochs * (n_train // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        perm = torch.randperm(n_train)
        for i in range(0, n_train - 127, 128):
            idx = perm[i:i + 128]
            xb = x[idx].float() / 255
            xb = torch.where(torch.rand(len(idx), 1, 1, 1) < 0.5, xb, xb.flip(3))
            loss = F.cross_entropy(model(xb), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        log(f"  epoch {epoch + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)
    return model.eval()


def run_demo(n_test: int = 2000, batch_size: int = 200, severity: int = 5, log=print) -> Dict[str, List[float]]:
    """Errors (%) per shift for each method, continual over the shifts; also prints the table."""
    import copy

    import tta
    from .data.corruptions import corrupt_dataset

    torch.set_num_threads(min(2, torch.get_num_threads()))
    log("tta demo: procedurally drawn shapes, a small BN CNN, shifted by the corruption engine (a demo, not a benchmark)")
    source = trained_model(log=log)
    x, y = make_shapes(n_test, seed=2)
    domains = {"clean": x, **{c: corrupt_dataset(x, c, severity, seed=0) for c in SHIFTS}}
    table: Dict[str, List[float]] = {}
    for method in METHODS:
        torch.manual_seed(0)
        adapter = tta.wrap(copy.deepcopy(source), method)
        errors = []
        for images in domains.values():
            wrong = 0
            for i in range(0, n_test, batch_size):
                xb = images[i:i + batch_size].float() / 255
                wrong += int((adapter(xb).argmax(1) != y[i:i + batch_size]).sum())
            errors.append(100.0 * wrong / n_test)
        table[method] = errors
    names = list(domains)
    log(f"\nerror (%) on each shifted test split (severity {severity}, continual, batch {batch_size}):\n")
    log("| method | " + " | ".join(names) + " | mean of shifts |")
    log("|---" * (len(names) + 2) + "|")
    for method, errors in table.items():
        shifted = errors[1:]
        log(f"| {method} | " + " | ".join(f"{e:.1f}" for e in errors) + f" | **{sum(shifted) / len(shifted):.1f}** |")
    return table


def register_cli(subparsers) -> None:
    p = subparsers.add_parser("demo", help="offline demo: train a small BN CNN on drawn shapes, compare source/norm/tent under shift")
    p.add_argument("--n-test", type=int, default=2000)
    p.set_defaults(func=lambda args: run_demo(args.n_test) and 0)
