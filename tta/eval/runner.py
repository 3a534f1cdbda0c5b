"""The runner: the only place that knows models, data, streams, methods and reports together.

``run_config(cfg)`` builds the model, the domains and the stream, wraps the model in the method's
adapter, feeds the stream batch by batch (resetting where the stream says), accumulates errors per
(round, domain) and writes ``results/<run>/``: the resolved config, ``results.json``, ``results.csv``
and ``table.md``. After every finished segment the adapter and the tallies are checkpointed atomically,
so a run killed mid-way continues from the last finished segment and ends with the same numbers.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Union

import numpy as np
import torch

from .. import config as config_mod
from .. import fast
from ..data import streams
from ..data.datasets import imagenet_files, load_cifar10, load_images, to_float
from ..data.domains import DomainSet
from ..errors import ConfigError
from .loggers import open_trackers
from .lock import FolderLock
from .memory import PeakMemory
from .metrics import ErrorAccumulator, mean
from .report import write_outputs

STATE_FILE = "state.pt"


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_adapter(cfg: Dict[str, Any], device: torch.device, data_dir=None):
    """The model of ``cfg.model`` wrapped in the adapter of ``cfg.method`` (seeded before building)."""
    from .. import methods, models  # imported here: a results table need not pull in timm / open_clip
    seed_everything(cfg["seed"])
    m = cfg["model"]
    model = restrict_to_dataset(cfg, models.load(m["name"], m["checkpoint"], data_dir=data_dir,
                                                     **m["options"])).to(device)
    options = {k: v for k, v in cfg["method"].items() if k != "name"}
    options.setdefault("seed", cfg["seed"])
    options.update({k: cfg.get(k, v) for k, v in fast.DEFAULTS.items()})  # precision, memory_format, compile
    if "fisher" in options:
        options["fisher_data"] = fisher_images(options.pop("fisher"), data_dir, cfg["seed"]).to(device)
    if "source" in options:
        images, labels = source_set(options.pop("source"), data_dir, cfg["seed"], "method.source")
        options["source_images"] = images
        if "source_labels" in methods.method_options(cfg["method"]["name"]):  # FOA, PeTTA use no labels
            options["source_labels"] = labels
    return methods.build(model, cfg["method"]["name"], **options)


SOURCE_DATASETS = ("cifar10_train", "imagenet_train", "imagenet_val")


def source_set(spec: Dict[str, Any], data_dir, seed: int, option: str = "method.source",
               default_n: int = 10000):
    """Labelled clean source images named by a ``{dataset, n}`` mapping: a seeded random subset of ``n``
    (all when ``n`` is at least the set's size: a seeded permutation of it). CIFAR-10 training images from
    ``TTA_DATA_DIR`` (``cifar10_train.npz`` or the 10,000-image ``cifar10_train_10k.npz``), or ImageNet
    ``train``/``val`` folders (Resize 256, CenterCrop 224). Returns uint8 NCHW images (float at use, so
    memory stays a quarter) and int64 labels, on the CPU."""
    allowed = {"dataset", "n"}
    if not isinstance(spec, dict) or set(spec) - allowed or spec.get("dataset", SOURCE_DATASETS[0]) not in SOURCE_DATASETS:
        raise ConfigError(f"{option} must be a mapping with keys {sorted(allowed)} and dataset one of "
                          f"{SOURCE_DATASETS}, got {spec!r}")
    n = spec.get("n", default_n)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"{option}.n must be a positive integer, got {n!r}")
    g = torch.Generator().manual_seed(seed)
    dataset = spec.get("dataset", SOURCE_DATASETS[0])
    if dataset.startswith("imagenet_"):
        paths, labels = imagenet_files(dataset.split("_", 1)[1], data_dir)
        idx = torch.randperm(len(paths), generator=g)[:n]
        return load_images([paths[i] for i in idx.tolist()], 224, resize=256), labels[idx]
    x, y = load_cifar10(data_dir, "train")
    idx = torch.randperm(len(x), generator=g)[:n]
    return x[idx], y[idx]


def fisher_images(spec: Dict[str, Any], data_dir, seed: int) -> torch.Tensor:
    """A random subset of clean source images for EATA's Fisher estimate (``{dataset, n}``, labels unused):
    CIFAR-10 training images, or ImageNet validation images (Resize 256, CenterCrop 224, as EATA)."""
    if isinstance(spec, dict) and spec.get("dataset") == "imagenet_train":
        raise ConfigError(f"method.fisher dataset must be cifar10_train or imagenet_val, got {spec!r}")
    return to_float(source_set(spec, data_dir, seed, "method.fisher", default_n=2000)[0])


def build_stream(cfg: Dict[str, Any]) -> streams.Stream:
    """The stream of ``cfg.setting`` over ``cfg.data``; file-backed domains are read chunk by chunk by
    ``data.workers`` background processes while the adapter runs (tta.data.loader)."""
    d = cfg["data"]
    domains = DomainSet(d["dataset"], d["source"], d["data_dir"], d["n_examples"], d["seed"],
                        d["corruptions"], d["severities"], d["imagenet_subset"] == "robustbench_5000",
                        workers=d["workers"], decoder=d["decoder"], jpeg_roundtrip=d["jpeg_roundtrip"],
                        preprocess=d["preprocess"], shuffle=d["shuffle"], domains=d["domains"] or None,
                        sh_filter=d["sh_filter"])
    return streams.build(cfg["setting"], domains, **cfg["stream"])


def restrict_to_dataset(cfg: Dict[str, Any], model):
    """ImageNet-A/R/D109 are scored on their classes only: a 1,000-class model keeps those outputs
    (tta.data.classes.restrict_outputs). A CLIP model built for the data set's own class list
    (``model.options.classes``) already has them."""
    from ..data.classes import SUBSETS, logit_indices, restrict_outputs
    if cfg["data"]["dataset"] not in SUBSETS:
        return model
    if cfg["model"]["name"].startswith("openclip:") and cfg["model"]["options"].get("classes") != "imagenet":
        return model
    return restrict_outputs(model, logit_indices(cfg["data"]["dataset"]))


# output settings that do not change the numbers: a cell computed without a tracker is not recomputed with one
RUNTIME_OUTPUT_KEYS = ("loggers", "logger_options", "lock_wait")


def config_hash(cfg: Dict[str, Any]) -> str:
    output = {k: v for k, v in cfg["output"].items() if k not in RUNTIME_OUTPUT_KEYS}
    # fast options at their defaults are left out, so cells computed before they existed stay valid
    cfg = {k: v for k, v in cfg.items() if fast.DEFAULTS.get(k, object()) != v}
    return hashlib.sha256(config_mod.dump({**cfg, "output": output}).encode()).hexdigest()[:16]


def run_dir(cfg: Dict[str, Any]) -> Path:
    return Path(cfg["output"]["dir"]) / (cfg["output"]["run_name"] or cfg["name"])


def run_config(cfg: Union[str, Path, Dict[str, Any]], overrides: Iterable[str] = (),
               out_dir: Optional[Path] = None) -> Dict[str, Any]:
    """Run one benchmark config end to end; returns the results dict that is also written to disk.
    While it writes ``out`` it holds the folder's lock (``output.lock_wait`` seconds of waiting, none by default),
    so a second run aimed at the same folder stops with one message instead of corrupting the checkpoint."""
    cfg = config_mod.from_dict(cfg, overrides) if isinstance(cfg, dict) else config_mod.load(cfg, overrides)
    out = Path(out_dir or run_dir(cfg))
    lock = FolderLock(out, wait=cfg["output"]["lock_wait"] or 0) if cfg["output"]["save"] else nullcontext()
    with lock, open_trackers(cfg, out) as trackers:
        return _run_locked(cfg, out, trackers)


def _run_locked(cfg: Dict[str, Any], out: Path, trackers) -> Dict[str, Any]:
    note = fast.apply_threads(cfg["threads"])  # an int, auto (the idle cores) or None (torch's default)
    if note:
        print(note, file=sys.stderr)
    device = resolve_device(cfg["device"])
    save = cfg["output"]["save"]
    stream = build_stream(cfg)
    state = _load_state(out, cfg, device) if save else None
    if state is None:
        adapter = build_adapter(cfg, device, cfg["data"]["data_dir"])
        acc, start, elapsed = ErrorAccumulator(), 0, 0.0
    else:
        adapter, acc, start, elapsed = state["adapter"], state["acc"], state["segment"], state["elapsed"]
    adapter.fast.expect(fast.stream_images(cfg))  # compile: auto weighs the stream's length
    trackers.begin(acc, elapsed)
    bar = _progress(cfg)
    with PeakMemory(device) as memory:
        for k, seg in enumerate(stream.segments[start:], start):
            elapsed = _run_segment(adapter, stream, seg, acc, device, bar, cfg["method"]["name"], elapsed)
            trackers.segment(acc, elapsed)
            if save and k + 1 < len(stream.segments):
                _save_state(out, cfg, {"adapter": adapter, "acc": acc, "segment": k + 1, "elapsed": elapsed})
    if bar is not None:
        bar.close()
    results = summarise(cfg, stream, acc, elapsed, device, memory.peak)
    if not adapter.fast.is_default or cfg["threads"] == "auto":
        results["fast"] = dict(adapter.fast.describe(), threads=torch.get_num_threads())
    if save:
        write_outputs(out, cfg, results)
        (out / STATE_FILE).unlink(missing_ok=True)
    trackers.finish(results)
    return results


def _run_segment(adapter, stream, seg, acc: ErrorAccumulator, device, bar, method: str, elapsed: float) -> float:
    """Feed one segment batch by batch; returns the adapter time so far (data movement excluded)."""
    for batch in stream.batches(seg, device):
        if batch.reset:
            adapter.reset()
        x = batch.x
        before = dict(adapter.counters)
        t0 = time.perf_counter()
        logits = adapter(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        elapsed += dt
        delta = {k: v - before.get(k, 0) for k, v in adapter.counters.items()}
        acc.update(logits[batch.context:], batch.y, batch.domain, batch.round, delta, dt)  # window context unscored
        if bar is not None:
            bar.set_description(f"{method} {seg.label}")
            bar.update(len(batch.y))
    return elapsed


def summarise(cfg, stream, acc: ErrorAccumulator, elapsed: float, device, peak_mb: float) -> Dict[str, Any]:
    rows = acc.rows(stream.domain_names)
    n = sum(r["n"] for r in rows)
    rounds = sorted({r["round"] for r in rows})
    per_round = [{"round": r, "mean_error": mean(x["error"] for x in rows if x["round"] == r)} for r in rounds]
    return {
        "name": cfg["name"], "method": cfg["method"]["name"], "model": cfg["model"]["name"],
        "setting": cfg["setting"], "seed": cfg["seed"], "device": str(device),
        "domains": rows, "rounds": per_round,
        "mean_error": mean(r["error"] for r in rows),
        # calibration of the scored predictions: mean over (round, domain) cells, as the error
        "mean_ece": mean(r["ece"] for r in rows), "mean_nll": mean(r["nll"] for r in rows),
        "mean_brier": mean(r["brier"] for r in rows),
        "img_per_s": n / elapsed if elapsed > 0 else None,
        # memory the run added on top of what was resident when it started (model, data, activations)
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": "cuda allocated" if device.type == "cuda" else "resident set above start",
        "backward": sum(r["backward"] for r in rows),
        "batch_errors": acc.batch_errors,
    }


def _progress(cfg):
    if not cfg["progress"]:
        return None
    from tqdm.auto import tqdm
    return tqdm(unit="img", leave=False, dynamic_ncols=True)


def _save_state(out: Path, cfg, state: Dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = dict(state, config_hash=config_hash(cfg))
    tmp = out / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / STATE_FILE)


def _load_state(out: Path, cfg, device) -> Optional[Dict[str, Any]]:
    path = out / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location=device, weights_only=False)
    if state.get("config_hash") != config_hash(cfg):
        return None  # a different config: start over
    return state
