"""Throughput and peak memory of every registered method next to its floor.

    python benchmarks/throughput.py --models cifar_resnet20 cifar_resnet56 --batch 200 --threads 2

The floor of a method is the bare work its algorithm needs per batch (METHODS.md 5.1), done on the same
configured model and the same adapted parameters: forwards with gradient, backwards, one optimizer step,
and forwards without gradient (CoTTA's anchor, teacher and 32 augmented views; DeYO's and the wisdom
filter's second forward, counted over the whole batch). The ratio method/floor is the toolkit's
overhead. Method and floor are timed interleaved, several repeats, median taken, in one process: the
machines are noisy, so only ratios measured in the same run are compared. Peak memory is the largest
resident set (CPU, sampled every millisecond, above the level before the measurement) or the CUDA peak
allocation, for the method alone.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import tta
from tta.eval.memory import PeakMemory
from tta.parts.objectives import entropy

# (forwards with grad, backwards, no-grad forwards, no-grad batch multiplier) per batch
FLOORS = {
    "source": (0, 0, 1, 1), "norm": (0, 0, 1, 1), "norm_alpha": (0, 0, 1, 1),
    "tent": (1, 1, 0, 1), "eta": (1, 1, 0, 1), "eata": (1, 1, 0, 1), "tsallis": (1, 1, 0, 1),
    "adte": (1, 1, 0, 1), "rdumb": (1, 1, 0, 1), "lcotta": (1, 1, 0, 1),
    "sar": (2, 2, 0, 1), "deyo": (1, 1, 1, 1), "tent_wisdom": (1, 1, 1, 1),
    "eta_wisdom": (1, 1, 1, 1), "tsallis_wisdom": (1, 1, 1, 1),
    "cotta": (1, 1, 2, 1), "cotta_aug": (0, 0, 1, 32),  # 32 augmented teacher views, one batched forward
}
NEEDS_CLIP = ("cliptta", "tpt", "adte_views", "zero")


def floor_step(adapter, x, n_grad, n_bwd, n_nograd, mult, optimizer):
    model = adapter.model
    for i in range(n_grad):
        loss = entropy(model(x)).mean()
        if i < n_bwd:
            loss.backward()
    if optimizer is not None and n_bwd:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if n_nograd:
        with torch.inference_mode():
            xb = x.repeat(mult, 1, 1, 1) if mult > 1 else x
            for _ in range(n_nograd):
                model(xb)


def method_kwargs(method, model_name, data):
    if method in ("eata",):
        return {"fisher_data": data[:400]}
    return {}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(method, model_name, batches, device, repeats, data):
    adapter = tta.wrap(tta.models.load(model_name).to(device), method, **method_kwargs(method, model_name, data))
    # the floor runs on a model configured like the method's: same norm mode, same adapted parameters
    floor_method = {"source": "source", "cotta": "cotta"}.get(method, "tent" if FLOORS[method][1] else "norm")
    floor_adapter = tta.wrap(tta.models.load(model_name).to(device), floor_method)
    opt = torch.optim.SGD(floor_adapter.params, lr=0.0) if floor_adapter.params else None
    fl = list(FLOORS[method])
    m_times, f_times = [], []
    adapter(batches[0]), floor_step(floor_adapter, batches[0], *fl, opt)  # warm-up
    with PeakMemory(device) as mem:
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            for x in batches:
                adapter(x)
            sync(device)
            m_times.append(time.perf_counter() - t0)
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for x in batches:
            floor_step(floor_adapter, x, *fl, opt)
            if method == "cotta":
                floor_step(floor_adapter, x, *FLOORS["cotta_aug"], None)
        sync(device)
        f_times.append(time.perf_counter() - t0)
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
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from tta.data.datasets import load_cifar10, to_float
    x, _ = load_cifar10(split="test")
    data = to_float(x[:args.batch * args.batches]).to(device)
    batches = list(data.split(args.batch))
    methods = args.methods or [m for m in tta.methods.available() if m in FLOORS]
    skipped = [m for m in tta.methods.available() if m not in FLOORS]
    for model_name in args.models:
        print(f"\n### {model_name}, batch {args.batch}, {args.threads} threads, {device}\n")
        print("| method | img/s | floor img/s | time ratio method/floor | peak memory (MiB) |")
        print("|---|---|---|---|---|")
        for method in methods:
            ips, fips, ratio, peak = measure(method, model_name, batches, device, args.repeats, data)
            print(f"| {method} | {ips:.0f} | {fips:.0f} | {ratio:.2f} | {peak:.0f} |", flush=True)
    if skipped:
        print(f"\nnot measured here (need a CLIP model): {', '.join(skipped)}")


if __name__ == "__main__":
    main()
