"""CCC: the walk rule on hand-made accuracy tables, schedule statistics and determinism, continuous severities,
the generated stream, accuracy-table files and the published webdataset shards (written here)."""
import io
import pickle
import tarfile

import numpy as np
import pytest
import torch

from tta.data import ccc, streams
from tta.data.ccc_stream import index_shard, pair_of, random_resized_box
from tta.data.corruptions import continuous
from tta.data.corruptions.api import apply_levels
from tta.data.corruptions.params import IMAGENET
from tta.data.domains import DomainSet
from tta.errors import ConfigError, MissingFileError
from test_data_fakes import imagenet_val, picture

NOISES = ["gaussian_noise", "shot_noise", "contrast", "fog"]


def smooth_table(noises, levels=21):
    """Accuracy falling with both severities, at a pair-dependent rate."""
    i, j = np.meshgrid(np.arange(levels), np.arange(levels), indexing="ij")
    return {(a, b): 76.0 - (1.5 + 0.3 * k) * i - (1.2 + 0.2 * m) * j
            for k, a in enumerate(noises) for m, b in enumerate(noises) if a != b}


def test_walk_on_a_hand_solved_table():
    acc = np.array([[90, 80, 70], [60, 50, 40], [30, 20, 10]], dtype=float)
    # solved by hand with the rule of ccc.walk: from (2, 0) down (mean 50 beats 42), then right twice, then down
    assert ccc.walk(acc, 50) == [(2, 0), (1, 0), (1, 1), (1, 2), (0, 2)]
    assert ccc.walk(acc, 90)[0] == (1, 0)  # the start whose walk is closest to the target


def test_schedule_statistics_and_determinism():
    table = smooth_table(NOISES)
    steps = ccc.plan(table, NOISES, 40, 1000, 123_456, seed=5)
    assert len(steps) == 124  # ceil(n_images / speed) cells
    walks, current = [], []
    for k, (a, b, sa, sb) in enumerate(steps):
        if current and (a, b) != current[-1][:2]:
            walks.append(current)
            current = []
        current.append((a, b, sa, sb))
    for w in walks:  # every complete walk: from "a only" to "b only", one 0.25 level per cell
        assert w[0][3] == 0 and w[-1][2] == 0
        for (_, _, sa0, sb0), (_, _, sa1, sb1) in zip(w, w[1:]):
            assert (sa0 - sa1, sb1 - sb0) in ((0.25, 0), (0, 0.25))
        i = [round(s[2] / 0.25) for s in w]
        j = [round(s[3] / 0.25) for s in w]
        mean = float(np.mean(table[w[0][:2]][i, j]))
        assert abs(mean - 40) < 2, mean  # the reference model's accuracy stays at the target
    for w0, w1 in zip(walks, walks[1:]):
        assert w1[0][0] == w0[0][1] and w1[0][1] != w1[0][0]  # the next pair starts from the previous b
    assert ccc.plan(table, NOISES, 40, 1000, 123_456, seed=5) == steps
    assert ccc.plan(table, NOISES, 40, 1000, 123_456, seed=6) != steps
    assert ccc.noises_for(40)[-1] == "jpeg_compression" and "brightness" not in ccc.noises_for(20)
    assert ccc.noises_for(0) == ("gaussian_noise", "shot_noise", "impulse_noise", "contrast")


def test_continuous_severities_interpolate_the_engines_constants():
    for name in continuous.ZERO:
        for s in (1, 3, 5):
            assert continuous.op_params(name, s) == IMAGENET[name][s - 1]
        assert continuous.op_params(name, 0) is None
    assert continuous.op_params("gaussian_noise", 2.5) == pytest.approx((0.12 + 0.18) / 2)
    assert continuous.op_params("shot_noise", 0.5) == pytest.approx(120.0)  # 1 / (0.5 * 1/60)
    assert continuous.op_params("jpeg_compression", 0.5) == 55
    assert continuous.op_params("glass_blur", 0.25) == (pytest.approx(0.175), 1, 0)
    assert continuous.op_params("zoom_blur", 1.5) == tuple(float(z) for z in np.arange(1, 1.135, 0.01))
    assert continuous.op_params("contrast", 4.75) == pytest.approx(0.0625)
    assert continuous.grid(0.25)[:3] == (0.0, 0.25, 0.5) and len(continuous.grid(0.25)) == 21
    x = torch.from_numpy(picture(224, 224, 0)).permute(2, 0, 1)[None].double()
    assert torch.equal(continuous.corrupt_levels(x, "fog", 0), x)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(continuous.corrupt_levels(x, "gaussian_noise", 3, g1),
                       apply_levels(x, "gaussian_noise", 3, "imagenet", g2))
    with pytest.raises(Exception, match=r"number in \[0, 5\]"):
        continuous.op_params("fog", 5.5)


def test_random_resized_box_follows_torchvisions_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_box(300, 500, rng)
        assert 0 <= top <= 300 - h and 0 <= left <= 500 - w
        assert 0.08 * 300 * 500 * 0.9 <= h * w <= 300 * 500 and 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("ccc")
    imagenet_val(root, classes=3, per_class=2)
    ccc.save_accuracy(root / "acc.npz", smooth_table(["contrast", "brightness"], levels=21))
    return root


def ccc_stream(root, seed=3, n_images=150, **kw):
    ds = DomainSet("imagenet", "generate", root, None, 0, [], [5], False, workers=0)
    return streams.build("ccc", ds, batch_size=50, baseline=40, speed=100, seed=seed, n_images=n_images,
                         accuracy=str(root / "acc.npz"), noises=["contrast", "brightness"], shard_size=100, **kw)


def test_generated_ccc_stream_is_seeded_and_unbounded_by_construction(tree):
    s = ccc_stream(tree)
    assert len(s.segments) == 2 and s.domain_names == ["ccc"]
    assert [seg.reset for seg in s.segments] == [True, False]
    a = [(b.x, b.y) for b in s]
    assert [len(b[1]) for b in a] == [50, 50, 50] and all(b[0].shape[1:] == (3, 224, 224) for b in a)
    b = [(b.x, b.y) for b in ccc_stream(tree)]
    assert all(torch.equal(u[0], v[0]) and torch.equal(u[1], v[1]) for u, v in zip(a, b))
    other = [bt.x for bt in ccc_stream(tree, seed=4, n_images=50)]
    assert not torch.equal(other[0], a[0][0])
    # nothing but the schedule is built ahead: a 7.5-million image stream is 75,000 cells of 100
    assert len(ccc_stream(tree, n_images=7_500_000).segments) == 75_000
    center = [bt.x for bt in ccc_stream(tree, n_images=50, crop="center")]
    assert center[0].shape == (50, 3, 224, 224)


def test_ccc_needs_its_accuracy_table_and_valid_options(tree):
    ds = DomainSet("imagenet", "generate", tree, None, 0, [], [5], False, workers=0)
    with pytest.raises(MissingFileError, match="accuracy table"):
        streams.build("ccc", ds, n_images=100, speed=100)
    for bad, match in [({"speed": 150}, "multiple of 100"), ({"crop": "random"}, "stream.crop"),
                       ({"noises": ["fog"]}, "at least two"), ({"baseline": 120}, "target accuracy")]:
        with pytest.raises(ConfigError, match=match):
            streams.build("ccc", ds, **bad)


def test_accuracy_table_files(tmp_path):
    table = smooth_table(["contrast", "fog"], levels=5)
    ccc.save_accuracy(tmp_path / "a.npz", table)
    back = ccc.load_accuracy(tmp_path / "a.npz")
    assert set(back) == set(table) and np.array_equal(back[("contrast", "fog")], table[("contrast", "fog")])
    # CCC's own file: a pickled mapping with its short names
    (tmp_path / "ccc.pickle").write_bytes(pickle.dumps({"n1_elastic_n2_jpeg": np.ones((21, 21))}))
    assert set(ccc.load_accuracy(tmp_path / "ccc.pickle")) == {("elastic_transform", "jpeg_compression")}

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "evil.pickle").write_bytes(pickle.dumps({"n1_fog_n2_snow": Evil()}))
    with pytest.raises(ConfigError, match="refusing to unpickle builtins.print"):
        ccc.load_accuracy(tmp_path / "evil.pickle")
    with pytest.raises(MissingFileError):
        ccc.load_accuracy(tmp_path / "none.npz")


def test_calibrate_measures_a_reference_models_accuracy():
    """A 'model' that is right exactly when the image still has contrast: accuracy falls with severity."""
    images = torch.from_numpy(np.stack([picture(224, 224, k) for k in range(4)])).permute(0, 3, 1, 2).contiguous()

    def model(x):
        spread = x.flatten(1).std(1)
        return torch.stack([spread - 0.05, 0.05 - spread], 1)
    table = ccc.calibrate(model, images, torch.zeros(4, dtype=torch.long), ["contrast", "brightness"], step=2.5)
    acc = table[("contrast", "brightness")]
    assert acc.shape == (3, 3) and acc[0, 0] == 100 and acc[2, 0] == 0


def write_shard(path, samples, writer):
    if writer == "webdataset":
        wds = pytest.importorskip("webdataset")
        with wds.TarWriter(str(path)) as sink:
            for key, jpg, label, info in samples:
                sink.write({"__key__": key, "input.jpg": jpg, "output.cls": label, "info": info})
        return
    with tarfile.open(path, "w") as tar:
        for key, jpg, label, info in samples:
            for ext, data in (("info", info.encode()), ("input.jpg", jpg), ("output.cls", str(label).encode())):
                member = tarfile.TarInfo(f"{key}.{ext}")
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))


@pytest.mark.parametrize("writer", ["webdataset", "tarfile"])
def test_published_shards_are_read_in_order(tmp_path, writer):
    from PIL import Image
    folder = tmp_path / "CCC" / "baseline_20_transition+speed_1000_seed_44"
    folder.mkdir(parents=True)
    pictures, labels = [], []
    for shard in range(2):
        samples = []
        for k in range(3):
            img = picture(224, 224, 10 * shard + k)
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=85)
            pictures.append(buf.getvalue())
            labels.append(7 * shard + k)
            samples.append((f"sample_{3 * shard + k}", buf.getvalue(), labels[-1],
                            "++dir++n01++name++x.JPEG++n1++elastic++s1++1.25++n2++fog++s2++0.5"))
        write_shard(folder / f"serial_{shard:05d}.tar", samples, writer)
    assert [s["label"] for s in index_shard(folder / "serial_00001.tar")] == labels[3:]
    assert pair_of(index_shard(folder / "serial_00000.tar")[0]["info"]) == "elastic_transform+fog"
    ds = DomainSet("imagenet", "files", tmp_path, None, 0, [], [5], False, workers=0)
    s = streams.build("ccc", ds, batch_size=2, baseline=20, speed=1000, seed=44, n_images=5, shard_size=3)
    batches = list(s)
    assert [b.y.tolist() for b in batches] == [labels[:2], labels[2:3], labels[3:5]]
    from tta.data.decode import decode_one
    first = decode_one(torch.frombuffer(bytearray(pictures[0]), dtype=torch.uint8))
    assert torch.equal((batches[0].x[0] * 255).round().to(torch.uint8), first)
    with pytest.raises(ConfigError, match="expected 4 per shard"):
        list(streams.build("ccc", ds, batch_size=2, baseline=20, speed=1000, seed=44, n_images=8, shard_size=4))
    with pytest.raises(MissingFileError, match="no CCC shards"):
        streams.build("ccc", ds, baseline=40, speed=1000, seed=44)
    (folder / "serial_00002.tar").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="not a readable CCC shard"):
        index_shard(folder / "serial_00002.tar")
