"""Issue 15's evidence: ``tta run`` with each fast option against fp32 eager, per method: img/s and error.

    TTA_DATA_DIR=../shared/data python benchmarks/fast_options.py                     # everything (hours on 2 cores)
    python benchmarks/fast_options.py --methods tent roid --n 1000                    # what a loaded machine allows
    python benchmarks/fast_options.py --stream dev --methods tent eata sar deyo      # the REFERENCE.md dev stream

``--stream continual`` (default): ``tta run configs/cifar10c/<method>.yaml`` on the continual CIFAR-10-C
stream (15 generated corruptions, severity 5, the first ``--n`` test images each, batch 200), one process
per (method, variant), ``threads=--threads``; the numbers come from the run's ``results.json``: img/s is
the runner's (adapter time only, data generation excluded, compilation included), error the mean over the
15 domains. ``--stream dev``: the 4-domain dev stream of docs/REFERENCE.md through
``benchmarks/reference_oracle.py``'s builder with the variant's options as overrides, in this process.

Variants (``--variants``): ``fp32`` (eager, the default), ``cl`` (channels_last), ``bf16``, ``bf16+cl``,
``compile`` (warm on-disk cache: a short run with the same options fills the tta cache first, untimed),
``compile_cold`` (an empty temporary Inductor cache: pays the full compilation inside the run),
``compile+bf16+cl`` (warm), ``auto`` and ``auto+bf16+cl`` (``compile: auto``: its decision and reason
are printed as an HTML comment). Methods with a loop of their own (CoTTA) have no compiled variants. Prints a
Markdown table with ratios to the first variant (fp32 by default) of the same method and the wall time of
each run (compile warm-ups not included); keeps every run's folder under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "fp32": [],
    "cl": ["memory_format=channels_last"],
    "bf16": ["precision=bf16"],
    "bf16+cl": ["precision=bf16", "memory_format=channels_last"],
    "compile": ["compile=on"],
    "compile_cold": ["compile=on"],
    "compile+bf16+cl": ["compile=on", "precision=bf16", "memory_format=channels_last"],
    "auto": ["compile=auto"],
    "auto+bf16+cl": ["compile=auto", "precision=bf16", "memory_format=channels_last"],
}
OWN_LOOP = {"cotta"}  # compile needs the shared loop
# as in BENCHMARKS.md sections 1 and 5: SAR and DeYO adapt every BN layer on CIFAR ResNets
METHOD_OVERRIDES = {"sar": ["method.skip_top=false"], "deyo": ["method.skip_top=false"]}


def tta_run(method, options, args, run_name, env=None, n=None, corruptions=None):
    cmd = [sys.executable, "-m", "tta.cli", "run", str(ROOT / "configs" / "cifar10c" / f"{method}.yaml"),
           f"data.n_examples={n or args.n}", "data.source=generate", "progress=false", f"threads={args.threads}",
           f"output.dir={args.out}", f"output.run_name={run_name}", *METHOD_OVERRIDES.get(method, []), *options]
    if corruptions:
        cmd.append(f"data.corruptions=[{','.join(corruptions)}]")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    results = json.loads((Path(args.out) / run_name / "results.json").read_text())
    if "compile_auto" in results.get("fast", {}):
        print(f"<!-- {run_name}: compile auto decided: {results['fast']['compile_auto']} -->", flush=True)
    return results["img_per_s"], results["mean_error"], wall


def continual(method, variant, args):
    options = VARIANTS[variant]
    env = dict(os.environ)
    if variant == "compile_cold":
        env["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="tta_cold_compile_")
    elif "compile=on" in options:  # fill the tta compile cache first (same graphs: batch 200, same options)
        tta_run(method, options, args, f"{method}-{variant}-warmup", n=400, corruptions=["gaussian_noise"])
    return tta_run(method, options, args, f"{method}-{variant}")


def dev(method, variant, args, cache={}):
    import torch

    from reference_oracle import run_method, dev_stream
    torch.set_num_threads(args.threads)
    if "stream" not in cache:
        cache["stream"] = dev_stream()
    domains, y = cache["stream"]
    options = VARIANTS[variant]
    if variant == "compile_cold":
        raise SystemExit("--stream dev runs in this process: use --variants without compile_cold")
    if "compile=on" in options:  # warm-up on one batch (fills the cache), untimed
        run_method(method, [d[:200] for d in domains[:1]], y[:200], overrides=options)
    t0 = time.perf_counter()
    errors, speed, _ = run_method(method, domains, y, overrides=options)
    return speed, sum(errors) / len(errors), time.perf_counter() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["tent", "eata", "sar", "deyo", "cotta", "roid"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--stream", choices=("continual", "dev"), default="continual")
    ap.add_argument("--n", type=int, default=2000, help="images per corruption (continual stream)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "results" / "bench" / "fast_options"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    run = continual if args.stream == "continual" else dev
    what = (f"continual CIFAR-10-C, 15 x {args.n} generated images" if args.stream == "continual"
            else "REFERENCE.md dev stream, 4 x 5,000 images")
    print(f"{what}, cifar_resnet20, batch 200, {args.threads} threads, load average at start "
          f"{os.getloadavg()[0]:.1f}\n")
    first = args.variants[0]
    print(f"| method | variant | img/s | x {first} | mean error (%) | vs {first} (pp) | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for method in args.methods:
        base = None
        for variant in args.variants:
            if method in OWN_LOOP and variant.startswith(("compile", "auto")):
                print(f"| {method} | {variant} | n/a (own loop) | | | | |", flush=True)
                continue
            speed, error, wall = run(method, variant, args)
            base = base or (speed, error)
            print(f"| {method} | {variant} | {speed:.0f} | {speed / base[0]:.2f} | {error:.2f} | "
                  f"{error - base[1]:+.2f} | {wall:.0f} |", flush=True)


if __name__ == "__main__":
    main()
