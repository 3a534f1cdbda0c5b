"""ImageNet-scale data path on a generated ImageNet validation tree: lazy domains, the chunked background
loader (identical batches and run results with 0 and 2 workers), on-the-fly ImageNet-C equal to the engine
and to ``tta make-c`` files, and bounded memory of the chunk cursor."""
import json

import pytest
import torch

from tta.data import streams
from tta.data.corruptions import corrupt_dataset
from tta.data.datasets import imagenet_files, load_images
from tta.data.domains import DomainSet
from tta.data.lazy import LazyImages, TensorSource
from tta.data.loader import Cursor, default_workers, iter_chunks, resolve_workers
from tta.data.make_c import make_imagenet_c
from tta.errors import ConfigError
from test_data_fakes import imagenet_val


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("inet")
    imagenet_val(root, classes=3, per_class=4)
    return root


def play(stream):
    return [(b.x, b.y, b.domain, b.reset, b.context) for b in stream]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) and torch.equal(u[2], v[2])
                                    and u[3] == v[3] and u[4] == v[4] for u, v in zip(a, b))


def domains(root, source="generate", **kw):
    kw.setdefault("workers", 0)
    return DomainSet("imagenet", source, root, None, 0, kw.pop("corruptions", ["gaussian_noise", "contrast"]), [5],
                     False, **kw)


def test_generated_imagenet_c_equals_the_engine_and_the_released_layout(tree, tmp_path):
    """generate = corrupt_dataset of the Resize-256/crop-224 images; with the JPEG round trip it equals the
    files `tta make-c` writes in ImageNet-C's layout (read back through the files path)."""
    paths, labels = imagenet_files("val", tree)
    ds = domains(tree, corruptions=["gaussian_noise"])
    x, y = ds.domains[0].load()
    assert isinstance(x, LazyImages) and x.shape == (12, 3, 224, 224) and y.tolist() == labels.tolist()
    got = torch.cat([b.x for b in streams.build("continual", ds, batch_size=5)])
    clean = load_images(paths, 224, 256, decoder="torchvision")
    assert torch.equal((got * 255).round().to(torch.uint8), corrupt_dataset(clean, "gaussian_noise", 5, 0))

    status = make_imagenet_c(tree / "imagenet" / "val", tree / "ImageNet-C", ["gaussian_noise"], [5], seed=0,
                             progress=False, workers=0)
    assert status == {"gaussian_noise/5": "written"}
    folder = tree / "ImageNet-C" / "gaussian_noise" / "5"
    assert sorted(p.relative_to(folder).as_posix() for p in folder.glob("*/*.JPEG")) == \
        sorted(f"{p.parent.name}/{p.name}" for p in paths)
    assert json.loads((folder / "make_c.json").read_text())["seed"] == 0
    files = torch.cat([b.x for b in streams.build("continual", domains(tree, "files", corruptions=["gaussian_noise"]),
                                                  batch_size=5)])
    # the chunked torchvision path gives exactly the old whole-domain PIL path's pixels on these 224-px files
    assert torch.equal((files * 255).round().to(torch.uint8), load_images(sorted(folder.glob("*/*.JPEG"))))
    generated = domains(tree, jpeg_roundtrip=True, corruptions=["gaussian_noise"])
    roundtrip = torch.cat([b.x for b in streams.build("continual", generated, batch_size=5)])
    assert torch.equal(files, roundtrip)
    # a rerun skips; a missing file is regenerated with the same draws; other settings are refused
    first = sorted(folder.glob("*/*.JPEG"))[0]
    before = first.read_bytes()
    assert make_imagenet_c(tree / "imagenet" / "val", tree / "ImageNet-C", ["gaussian_noise"], [5], seed=0,
                           progress=False, workers=0) == {"gaussian_noise/5": "skipped"}
    first.unlink()  # its 100-image group (here: all 12) is made again, with the same draws
    assert make_imagenet_c(tree / "imagenet" / "val", tree / "ImageNet-C", ["gaussian_noise"], [5], seed=0,
                           progress=False, workers=0) == {"gaussian_noise/5": "written"}
    assert first.read_bytes() == before
    with pytest.raises(ConfigError, match="started with other settings"):
        make_imagenet_c(tree / "imagenet" / "val", tree / "ImageNet-C", ["gaussian_noise"], [5], seed=1,
                        progress=False)


def test_lazy_streams_match_in_memory_streams(tree):
    """Windows, label-sorted and mixed streams cut lazy ImageNet-C domains (files read chunk by chunk) exactly
    as they cut the same images held in memory."""
    make_imagenet_c(tree / "imagenet" / "val", tree / "ImageNet-C", ["fog", "contrast"], [5], seed=0, progress=False,
                    workers=0)
    lazy_ds = domains(tree, "files", corruptions=["fog", "contrast"])
    mem_ds = domains(tree, "files", corruptions=["fog", "contrast"])
    mem = {}
    for d in mem_ds.domains:
        x, y = d.load()
        mem[(d.corruption, d.severity)] = (torch.cat([c for _, _, c in iter_chunks(x, "cpu")]), y)
    mem_ds._load = lambda c, s, src: mem[(c, s)]
    for setting, options in [("continual", {"window": 7}), ("correlated", {}), ("mixed_domains", {"seed": 3}),
                             ("lifelong", {"rounds": 2})]:
        lazy = play(streams.build(setting, lazy_ds, batch_size=5, **options))
        ref = play(streams.build(setting, mem_ds, batch_size=5, **options))
        assert same(lazy, ref), setting


def test_identical_batches_with_zero_and_two_workers(tree):
    """Two chunks of 100 generated positions: decoding in worker processes changes nothing."""
    def run(workers):
        ds = DomainSet("imagenet", "generate", tree, None, 0, ["contrast"], [5], False, workers=workers, chunk=100)
        x, y = ds.domains[0].load()
        many = LazyImages(x.sources, x.src.repeat(17)[:200], x.idx.repeat(17)[:200], workers, 100)
        return torch.cat([c for _, _, c in iter_chunks(many, "cpu")])
    assert torch.equal(run(0), run(2))


def test_same_run_numbers_with_zero_and_two_workers(tree, tmp_path):
    """The whole runner on ImageNet-C files with 0 and 2 decode workers: identical results."""
    from tta.eval.runner import run_config
    make_imagenet_c(tree / "imagenet" / "val", tree / "ImageNet-C", ["contrast"], [5], seed=0, progress=False,
                    workers=0)
    cfg = {"name": "w", "device": "cpu", "progress": False, "setting": "continual",
           "model": {"name": "cifar_resnet20", "checkpoint": "none"},
           "data": {"dataset": "imagenet", "data_dir": str(tree), "source": "files", "corruptions": ["contrast"],
                    "severities": [5], "imagenet_subset": "all", "workers": 0},
           "stream": {"batch_size": 4}, "method": {"name": "norm"}, "output": {"save": False}}
    zero = run_config(cfg)
    two = run_config({**cfg, "data": {**cfg["data"], "workers": 2}})
    assert zero["domains"][0]["n"] == 12
    assert [r["error"] for r in zero["domains"]] == [r["error"] for r in two["domains"]]
    assert zero["batch_errors"] == two["batch_errors"] and zero["mean_nll"] == two["mean_nll"]


def test_cursor_keeps_only_the_window_and_one_chunk():
    images = LazyImages.of(TensorSource(torch.arange(1000, dtype=torch.uint8).view(1000, 1, 1, 1).repeat(1, 3, 1, 1)))
    cur = Cursor(iter_chunks(images, "cpu", chunk=100))
    held = 0
    for j in range(10, 1000, 10):
        out = cur.take(max(0, j - 30), j)
        assert out[:, 0, 0, 0].tolist() == [v % 256 for v in range(max(0, j - 30), j)]
        held = max(held, len(cur.buf))
    assert held <= 30 + 100
    with pytest.raises(ValueError, match="backwards"):
        cur.take(0, 5)


def test_worker_defaults_and_errors():
    assert 0 <= default_workers() <= 8 and resolve_workers(None) == default_workers()
    assert resolve_workers(3) == 3
    with pytest.raises(ConfigError, match="data.workers must be an integer >= 0 or null"):
        resolve_workers(-1)
    images = LazyImages.of(TensorSource(torch.zeros(5, 3, 2, 2, dtype=torch.uint8)))
    with pytest.raises(ConfigError, match="multiple of 100"):
        next(iter_chunks(images, "cpu", chunk=50))
