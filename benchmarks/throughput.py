"""Throughput and peak memory of every registered method next to its floor.

    python benchmarks/throughput.py --models cifar_resnet20 cifar_resnet56 --batch 200 --threads 2

The floor of a method is the bare work its algorithm needs per batch (METHODS.md 5.1; the ``cost`` each
method is registered with, ``tta.methods.info(name).cost``), done on the same configured model and the
same adapted parameters: forwards with gradient, backwards, one optimizer step, and forwards without
gradient (CoTTA's anchor, teacher and 32 augmented views; DeYO's and the wisdom filter's second forward,
counted over the whole batch). The ratio method/floor is the toolkit's
overhead. Each (model, method) is measured in a fresh process: method and floor timed interleaved, several
repeats, median taken (the machines are noisy, so only ratios measured in the same run are compared).
Peak memory is the method's own: the largest resident set (CPU, sampled every 2 ms) or CUDA allocation
above the level before its adapter was built, through the warm-up batch (model copies, source snapshot,
optimizer state, activations).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import time

import torch

import tta
from tta.eval.memory import PeakMemory
from tta.parts.objectives import entropy

SOURCE_NORM = ("source", "lame")  # floors that normalise with source statistics


def tiles(x, k: float):
    """``k`` batches' worth of ``x``: ``floor(k)`` copies of the batch, then a leading fraction of it."""
    for _ in range(int(k)):
        yield x
    rest = round((k - int(k)) * len(x))
    if rest:
        yield x[:rest]


def floor_step(model, x, cost, optimizer):
    """The bare work of ``cost`` (a :class:`tta.methods.Cost`): its forwards with autograd split over its
    backward passes, one optimizer step, then its forwards without autograd; for a per-image cost, that
    work for each image on its own (its views as one batch, as the reference runs MEMO at batch size 1)."""
    if cost.per_image:
        views = round(cost.grad)
        for image in x.split(1):  # its views as one batch with autograd, a backward; its own plain forward
            floor_step(model, image.expand(views, -1, -1, -1), dataclasses.replace(
                cost, grad=1.0 if views else 0.0, nograd=0.0, per_image=False), optimizer)
            floor_step(model, image, dataclasses.replace(cost, grad=0.0, backward=0, per_image=False), None)
        return
    if cost.grad:
        passes = max(cost.backward, 1)
        for _ in range(passes):
            loss = sum(entropy(model(xb)).mean() for xb in tiles(x, cost.grad / passes))
            if cost.backward:
                loss.backward()
        if optimizer is not None and cost.backward:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if cost.nograd:
        with torch.inference_mode():
            for xb in tiles(x, cost.nograd):
                model(xb)


def floor_model(method, model_name, device):
    """The model configured as the floor needs it: source statistics or test-batch statistics, and
    autograd reaching the norm affine parameters or every weight; an SGD(lr=0) over those."""
    cost = tta.methods.info(method).cost
    if method in SOURCE_NORM:
        return tta.wrap(tta.models.load(model_name).to(device), "source").model, None
    adapter = tta.wrap(tta.models.load(model_name).to(device), "tent")
    params = adapter.params
    if cost.params == "all":
        params = [p.requires_grad_(True) for p in adapter.model.parameters()]
    return adapter.model, (torch.optim.SGD(params, lr=0.0) if cost.backward else None)


def method_kwargs(method, model_name, data):
    """Source data for the methods that take it: the shifted batches for EATA's Fisher images (as before),
    2,000 labelled clean CIFAR-10 training images for the others."""
    options, kw = tta.methods.method_options(method), {}
    if "fisher_data" in options and method != "come":  # COME takes it only with host eata (default host: tent)
        kw["fisher_data"] = data[:400]
    if "source_images" in options:
        from tta.data.datasets import load_cifar10
        x, y = load_cifar10(split="train")
        kw["source_images"] = x[:2000]
        if "source_labels" in options:
            kw["source_labels"] = y[:2000]
    if method == "rmt":
        kw["warmup_samples"] = 0  # the warm-up is a one-off before the stream: it does not change a step's cost
    return kw


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _load_libraries(device) -> None:
    """Let torch import what it loads lazily (optimizers pull in torch._dynamo, ~0.5 GB resident), so
    the memory peak that follows is the method's, not the library's."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).to(device)
    for opt in (torch.optim.Adam(net.parameters()), torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)):
        net(torch.rand(2, 3, 8, 8, device=device)).square().mean().backward()
        opt.step()
        opt.zero_grad()


def timed(fn, batches, device) -> float:
    sync(device)
    t0 = time.perf_counter()
    for x in batches:
        fn(x)
    sync(device)
    return time.perf_counter() - t0


def measure(method, model_name, batches, device, repeats, data):
    """(method img/s, floor img/s, median time ratio, peak MiB of the method: model copies, snapshot,
    optimizer state and activations, above the level before its adapter was built)."""
    _load_libraries(device)
    with PeakMemory(device) as mem:
        adapter = tta.wrap(tta.models.load(model_name).to(device), method, **method_kwargs(method, model_name, data))
        adapter(batches[0])  # warm-up
    # the floor runs on a model configured like the method's: same norm mode, same adapted parameters
    model, opt = floor_model(method, model_name, device)
    cost = tta.methods.info(method).cost

    def floor(x):
        floor_step(model, x, cost, opt)

    floor(batches[0])  # warm-up
    m_times, f_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine load
        m_times.append(timed(adapter, batches, device))
        f_times.append(timed(floor, batches, device))
    n = sum(len(x) for x in batches)
    m, f = statistics.median(m_times), statistics.median(f_times)
    return n / m, n / f, m / f, mem.peak


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["cifar_resnet20", "cifar_resnet56"])
    ap.add_argument("--methods", nargs="*", default=None)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--batches", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--corruption", default="gaussian_noise", help="severity-5 corruption of the input, or none")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:  # one measurement in this (fresh) process, so memory peaks are the method's own
        torch.set_num_threads(args.threads)
        device = torch.device(args.device)
        from tta.data.corruptions import corrupt_dataset
        from tta.data.datasets import load_cifar10, to_float
        x, _ = load_cifar10(split="test")
        x = x[:args.batch * args.batches]
        if args.corruption != "none":  # shifted input, so filters and gates behave as in a benchmark
            x = corrupt_dataset(x, args.corruption, 5, seed=0)
        data = to_float(x).to(device)
        result = measure(args.one[1], args.one[0], list(data.split(args.batch)), device, args.repeats, data)
        print(json.dumps(result))
        return
    methods = args.methods or [m for m in tta.methods.available() if tta.methods.info(m).requires == "classifier"]
    skipped = [m for m in tta.methods.available() if tta.methods.info(m).requires != "classifier"]
    common = ["--batch", str(args.batch), "--batches", str(args.batches), "--repeats", str(args.repeats),
              "--threads", str(args.threads), "--device", args.device, "--corruption", args.corruption]
    for model_name in args.models:
        print(f"\n### {model_name}, batch {args.batch}, {args.threads} threads, {args.device}, "
              f"input: {args.corruption} (severity 5)\n")
        print("| method | img/s | floor img/s | time ratio method/floor | peak memory (MiB) |")
        print("|---|---|---|---|---|")
        for method in methods:
            out = subprocess.run([sys.executable, __file__, "--one", model_name, method, *common],
                                 capture_output=True, text=True, check=True).stdout
            ips, fips, ratio, peak = json.loads(out.strip().splitlines()[-1])
            print(f"| {method} | {ips:.0f} | {fips:.0f} | {ratio:.2f} | {peak:.0f} |", flush=True)
    if skipped:
        print(f"\nnot measured here (need a CLIP model or a ViT): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
