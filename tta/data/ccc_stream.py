"""``setting: ccc``: the CCC stream, generated on the fly or read from the published webdataset shards.

``data.source: generate`` (or ``auto`` without shards) plays :func:`tta.data.ccc.plan` on the ImageNet
validation images: for walk cell k, ``speed`` images drawn without replacement by a generator seeded with
(seed, k), each flipped with probability 1/2 and random-resized-cropped to 224 px (torchvision's
``RandomResizedCrop`` rule: area 8-100 %, aspect ratio 3/4-4/3 in log space, 10 tries, then a central crop;
its draws come from a per-image seeded generator, so workers do not change them) - or, with
``crop: center``, resized to 256 and centre-cropped - then corrupted on the model's device at the cell's two
continuous severities, seeded per 100 images, and (with ``data.jpeg_roundtrip``, as CCC's files are)
saved as JPEG 85 in memory. The stream is as long as ``n_images``; memory stays bounded because nothing
but the schedule is built ahead.

``data.source: files`` reads CCC's shards from ``<root>/CCC/baseline_<b>_transition+speed_<s>_seed_<seed>/
serial_<00000..>.tar``: tar files of samples ``<key>.input.jpg`` (224-px JPEG), ``<key>.output.cls`` (the
label, ASCII) and ``<key>.info`` (which corruptions at which severities). They are read with Python's
``tarfile`` (no ``webdataset`` needed), in file order, ``shard_size`` images per shard (25,000 in CCC's
release); a shard that holds another number of images before the last one needed is one clear error.

Each pair of corruptions is one column of the results (``gaussian_noise+contrast``); a segment holds
about ``shard_size`` images, so the runner checkpoints every 25,000 images.
"""
from __future__ import annotations

import math
import tarfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..errors import ConfigError, MissingFileError
from ..paths import data_root
from . import ccc
from .decode import decode_bytes, read_bytes, resize_crop, resized_crop, spec_of
from .lazy import LazyImages, Source, jpeg85

CROPS = ("random_resized", "center")


def random_resized_box(height: int, width: int, rng: np.random.Generator) -> Tuple[int, int, int, int]:
    """(top, left, h, w) by torchvision's RandomResizedCrop rule with scale (0.08, 1), ratio (3/4, 4/3)."""
    area = height * width
    lo, hi = math.log(3 / 4), math.log(4 / 3)
    for _ in range(10):
        target = area * rng.uniform(0.08, 1.0)
        ratio = math.exp(rng.uniform(lo, hi))
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < 3 / 4:
        w, h = width, int(round(width / (3 / 4)))
    elif in_ratio > 4 / 3:
        h, w = height, int(round(height * (4 / 3)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def step_images(n_images: int, speed: int, seed: int, step: int) -> np.ndarray:
    """Validation indices of walk cell ``step``: ``speed`` distinct images (as CCC draws them), or whole
    permutations one after another when the set is smaller than ``speed`` (test folders)."""
    rng = np.random.default_rng(ccc._seed(seed, "ccc-images", step))
    if speed <= n_images:
        return rng.choice(n_images, size=speed, replace=False)
    return np.concatenate([rng.permutation(n_images) for _ in range(-(-speed // n_images))])[:speed]


class CCCSource(Source):
    """Generated CCC images: index = stream position; images, crops and noise follow from the seed."""

    slow = True

    def __init__(self, paths: Sequence, steps, speed: int, seed: int, crop: str = "random_resized",
                 jpeg_roundtrip: bool = True, first_step: int = 0):
        self.paths, self.steps, self.speed, self.seed = [str(p) for p in paths], list(steps), speed, seed
        self.crop, self.jpeg_roundtrip, self.first_step = crop, jpeg_roundtrip, first_step

    def __len__(self) -> int:
        return len(self.steps) * self.speed

    def fetch(self, index):
        out = torch.empty(len(index), 3, 224, 224, dtype=torch.uint8)
        chosen = {}
        for k, pos in enumerate(index.tolist()):
            step = self.first_step + pos // self.speed
            if step not in chosen:
                chosen[step] = step_images(len(self.paths), self.speed, self.seed, step)
            path = self.paths[int(chosen[step][pos % self.speed])]
            img = decode_bytes([read_bytes(path)], where=[path])[0]
            if self.crop == "center":
                out[k] = resize_crop(img, 224, where=path, spec=spec_of(preprocess="resize256"))
            else:
                rng = np.random.default_rng(ccc._seed(self.seed, "ccc-crop", step, pos % self.speed))
                flip = bool(rng.random() < 0.5)
                out[k] = resized_crop(img, random_resized_box(img.shape[-2], img.shape[-1], rng), 224, flip)
        return out

    def finish(self, payload, index, positions, device):
        from .corruptions import RNG_CHUNK
        from .corruptions.continuous import corrupt_levels
        x = payload.to(device, non_blocking=True)
        out = torch.empty_like(x)
        local = self.first_step * self.speed + index  # position in the whole stream
        keys = local // RNG_CHUNK
        for g in torch.unique(keys).tolist():
            sel = (keys == g).nonzero().flatten().to(x.device)
            step = (g * RNG_CHUNK) // self.speed
            a, b, sa, sb = self.steps[step - self.first_step]
            gen = torch.Generator(device=x.device).manual_seed(ccc._seed(self.seed, "ccc-noise", a, b, step, g))
            levels = corrupt_levels(corrupt_levels(x[sel].to(torch.float64), a, sa, gen), b, sb, gen)
            out[sel] = jpeg85(levels) if self.jpeg_roundtrip else levels.to(torch.uint8)
        return out


# ----------------------------------------------------------------------------------- published shards
def index_shard(path: Path) -> List[dict]:
    """Samples of a webdataset tar in file order: ``{"key", "jpg": (offset, size), "label", "info"}``."""
    samples, by_key = [], {}
    try:
        with tarfile.open(path) as tar:
            for m in tar:
                if not m.isfile():
                    continue
                base = m.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                if key not in by_key:
                    by_key[key] = {"key": key}
                    samples.append(by_key[key])
                if ext in ("input.jpg", "jpg"):
                    by_key[key]["jpg"] = (m.offset_data, m.size)
                elif ext in ("output.cls", "cls"):
                    by_key[key]["label"] = int(tar.extractfile(m).read().decode().strip())
                elif ext == "info":
                    by_key[key]["info"] = tar.extractfile(m).read().decode(errors="replace")
    except (tarfile.TarError, ValueError, OSError) as e:
        raise ConfigError(f"{path} is not a readable CCC shard ({type(e).__name__}: {e})") from None
    bad = [s["key"] for s in samples if "jpg" not in s or "label" not in s]
    if bad:
        raise ConfigError(f"{path}: sample(s) {bad[:3]} lack input.jpg or output.cls (a CCC shard holds "
                          "<key>.input.jpg and <key>.output.cls per sample)")
    return samples


def pair_of(info: Optional[str]) -> str:
    """``a+b`` from a CCC info string (``...++n1++<a>++s1++..++n2++<b>++s2++..``), else ``ccc``."""
    if not info or "++n1++" not in info or "++n2++" not in info:
        return "ccc"
    a = info.split("++n1++", 1)[1].split("++", 1)[0]
    b = info.split("++n2++", 1)[1].split("++", 1)[0]
    return f"{ccc.CCC_NAMES.get(a, a)}+{ccc.CCC_NAMES.get(b, b)}"


class ShardSource(Source):
    """The JPEGs of one shard, read at their offsets (workers open the file themselves)."""

    slow = True

    def __init__(self, path: Path, spans: Sequence[Tuple[int, int]]):
        self.path, self.spans = str(path), list(spans)

    def __len__(self) -> int:
        return len(self.spans)

    def fetch(self, index):
        out = []
        with open(self.path, "rb") as f:
            for i in index.tolist():
                offset, size = self.spans[i]
                f.seek(offset)
                out.append(torch.frombuffer(bytearray(f.read(size)), dtype=torch.uint8))
        images = decode_bytes(out, where=[f"{self.path} sample {i}" for i in index.tolist()])
        return torch.stack([resize_crop(img, 224, where=self.path, spec=spec_of(preprocess="none")) for img in images])


def shard_folder(root: Path, baseline, speed: int, seed: int) -> Path:
    return root / "CCC" / f"baseline_{int(baseline)}_transition+speed_{speed}_seed_{seed}"


# ----------------------------------------------------------------------------------- the protocol
def _accuracy_table(root: Path, accuracy: Optional[str]):
    if accuracy is not None:
        return ccc.load_accuracy(Path(accuracy).expanduser())
    candidates = [root / "ccc" / "accuracy.npz", root / "ccc" / "ccc_accuracy_matrix.pickle"]
    for c in candidates:
        if c.is_file():
            return ccc.load_accuracy(c)
    raise MissingFileError(
        f"generating CCC needs the reference model's accuracy table: place CCC's ccc_accuracy_matrix.pickle or an "
        f"accuracy.npz made by tta.data.ccc.calibrate + save_accuracy in {root / 'ccc'}, or set stream.accuracy="
        f"<path>; or play the published shards with data.source=files")


def _check(baseline, speed, n_images, shard_size, crop, noises) -> None:
    if isinstance(speed, bool) or not isinstance(speed, int) or speed < 100 or speed % 100:
        raise ConfigError(f"stream.speed must be a positive multiple of 100 images (CCC: 1000, 2000, 5000), "
                          f"got {speed!r}")
    if isinstance(baseline, bool) or not isinstance(baseline, (int, float)) or not 0 <= baseline <= 100:
        raise ConfigError(f"stream.baseline must be a target accuracy in % (CCC: 0, 20, 40), got {baseline!r}")
    for key, v in (("n_images", n_images), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ConfigError(f"stream.{key} must be a positive integer, got {v!r}")
    if crop not in CROPS:
        raise ConfigError(f"stream.crop must be one of {', '.join(CROPS)}, got {crop!r}")
    if noises is not None:
        from .corruptions.continuous import ZERO
        bad = [n for n in noises if n not in ZERO]
        if bad or len(set(noises)) < 2:
            raise ConfigError(f"stream.noises must name at least two of {', '.join(ZERO)}; got {noises!r}")


def ccc_protocol(domains, *, batch_size: int = 64, baseline: float = 20, speed: int = 1000, seed: int = 43,
                 n_images: int = ccc.IMAGES_TOTAL, accuracy: Optional[str] = None, noises: Optional[list] = None,
                 crop: str = "random_resized", shard_size: int = ccc.SHARD_SIZE):
    """CCC (see the module docstring); one results column, ``ccc``; reset once at the start."""
    from .streams import Stream
    _check(baseline, speed, n_images, shard_size, crop, noises)
    root = data_root(domains.data_dir)
    folder = shard_folder(root, baseline, speed, seed)
    source = domains.source if domains.source != "auto" else ("files" if folder.is_dir() else "generate")
    if source == "files":
        segments = _shard_segments(folder, n_images, shard_size, domains)
    else:
        segments = _generated_segments(domains, root, baseline, speed, seed, n_images, accuracy, noises, crop,
                                       shard_size)
    return Stream(segments, ["ccc"], batch_size)


def _generated_segments(domains, root, baseline, speed, seed, n_images, accuracy, noises, crop, shard_size):
    from .streams import Segment
    steps = ccc.plan(_accuracy_table(root, accuracy), noises or ccc.noises_for(baseline), baseline, speed,
                     n_images, seed)
    val = domains.manifest("imagenet_val")
    per_segment = max(1, -(-shard_size // speed))

    def load(k):
        first = k * per_segment
        source = CCCSource(val.paths, steps[first:first + per_segment], speed, seed, crop, domains.jpeg_roundtrip,
                           first)
        count = min(len(source), n_images - first * speed)
        images = LazyImages.of(source, domains.workers, domains.chunk)[:count]
        return images, val.labels[_chosen(source, count)], torch.zeros(count, dtype=torch.long)
    n_segments = -(-len(steps) // per_segment)
    return [Segment(lambda k=k: load(k), k == 0, 0, f"ccc-{k}") for k in range(n_segments)]


def _chosen(source: CCCSource, count: int) -> torch.Tensor:
    """Validation index of each of the first ``count`` images of a generated segment."""
    out = []
    for s in range(-(-count // source.speed)):
        out.append(step_images(len(source.paths), source.speed, source.seed, source.first_step + s))
    return torch.from_numpy(np.concatenate(out)[:count].astype(np.int64))


def _shard_segments(folder: Path, n_images: int, shard_size: int, domains):
    from .streams import Segment
    shards = sorted(folder.glob("serial_*.tar"))
    if not shards:
        raise MissingFileError(f"no CCC shards (serial_*.tar) in {folder}: place the published shards there or "
                               "use data.source=generate")
    shards = shards[:-(-n_images // shard_size)]

    def load(k):
        samples = index_shard(shards[k])
        wanted = min(shard_size, n_images - k * shard_size)
        if len(samples) < wanted and k + 1 < len(shards):
            raise ConfigError(f"{shards[k]} holds {len(samples)} images; expected {shard_size} per shard "
                              "(stream.shard_size) before the last one")
        samples = samples[:wanted]
        images = LazyImages.of(ShardSource(shards[k], [s["jpg"] for s in samples]), domains.workers, domains.chunk)
        labels = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return images, labels, torch.zeros(len(samples), dtype=torch.long)
    return [Segment(lambda k=k: load(k), k == 0, 0, shards[k].stem) for k in range(len(shards))]
