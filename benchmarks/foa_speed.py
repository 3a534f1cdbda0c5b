"""FOA against its floor (issue 11): a batch costs popsize + 1 forwards without autograd (``Cost(nograd=28)``).

    python benchmarks/foa_speed.py [--threads 1] [--batch 64] [--depth 12]

No pretrained ViT can be had here: a randomly initialised timm ViT-Tiny (patch 8 on 32 px input, 16 + 3 prompt
tokens) stands in; the ratio of FOA's time to ``popsize + 1`` plain forwards of the same batch does not depend on
the weights. Interleaved, median of ``--repeats``.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tta
from tta.models.common import Normalized


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--depth", type=int, default=12)
    ap.add_argument("--popsize", type=int, default=27)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    import timm
    torch.manual_seed(0)
    net = Normalized(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                                       depth=args.depth, num_classes=10), (0.5,) * 3, (0.5,) * 3).eval()
    g = torch.Generator().manual_seed(0)
    source = torch.rand(256, 3, 32, 32, generator=g)
    batches = [torch.rand(args.batch, 3, 32, 32, generator=g) for _ in range(args.batches)]
    adapter = tta.wrap(net, "foa", source_images=source, popsize=args.popsize)
    adapter(batches[0])  # warm-up

    def foa_time():
        t = time.perf_counter()
        for x in batches:
            adapter(x)
        return time.perf_counter() - t

    def floor_time():
        t = time.perf_counter()
        with torch.inference_mode():
            for x in batches:
                for _ in range(args.popsize + 1):
                    net(x)
        return time.perf_counter() - t

    f, m = [], []
    for _ in range(args.repeats):
        m.append(foa_time())
        f.append(floor_time())
    n = args.batch * args.batches
    mt, ft = statistics.median(m), statistics.median(f)
    print(f"| foa (ViT-Tiny depth {args.depth}, random init, popsize {args.popsize}, batch {args.batch}, "
          f"{args.threads} thread(s)) | {n / mt:.1f} | {n / ft:.1f} | {mt / ft:.2f} |")


if __name__ == "__main__":
    main()
