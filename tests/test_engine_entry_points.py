"""The corruption engine's entry points after issue 15: chunking and threads live in the engine.

Every entry point (functional ops / ``corrupt`` / ``Corrupt``, ``corrupt_dataset``, ``make_c``, on-the-fly
streams) works through 100-image chunks on the engine's worker threads. What must hold: the output does
not depend on the number of threads nor on the input's memory layout; a batch of at most 100 images draws
from the caller's generator exactly as before; a larger one draws one seed per chunk from it (the
documented rule); the same seed gives the same images from every entry point that takes a seed; errors
raised inside a worker reach the caller; the caller's torch thread settings are left alone. Speed is
measured by benchmarks/corruption_speed.py, never here.
"""
import threading

import numpy as np
import pytest
import torch

from tta.data import corruptions as C
from tta.data.corruptions import _workers
from tta.errors import InputError, MissingFileError

RANDOM = ("gaussian_noise", "shot_noise", "impulse_noise", "glass_blur", "snow", "elastic_transform", "fog")
SOME = RANDOM + ("defocus_blur", "zoom_blur", "contrast", "pixelate", "jpeg_compression", "motion_blur")


@pytest.fixture(scope="module")
def images():
    """250 random uint8 images NHWC (three chunks, the last one partial)."""
    g = torch.Generator().manual_seed(1)
    return (torch.rand(250, 32, 32, 3, generator=g) * 255).to(torch.uint8).numpy()


def as_float(u8):
    """What users write: NHWC uint8 -> NCHW float through a permute (not contiguous)."""
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255


@pytest.fixture()
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("name", SOME)
def test_output_does_not_depend_on_threads_or_layout(images, name, threads):
    threads(1)
    one = C.corrupt_dataset(images, name, 3, seed=2)
    f_one = C.corrupt(as_float(images), name, 3, seed=2)
    threads(2)
    assert torch.equal(one, C.corrupt_dataset(images, name, 3, seed=2))
    assert torch.equal(f_one, C.corrupt(as_float(images), name, 3, seed=2))
    assert torch.equal(f_one, C.corrupt(as_float(images).contiguous(), name, 3, seed=2))


@pytest.mark.parametrize("name", RANDOM)
def test_a_large_batch_draws_one_seed_per_chunk_from_the_generator(images, name):
    x = as_float(images)
    got = C.corrupt(x, name, 4, generator=torch.Generator().manual_seed(7))
    seeds = torch.randint(0, 2 ** 62, (3,), generator=torch.Generator().manual_seed(7)).tolist()
    parts = [C.corrupt(x[k * 100:(k + 1) * 100], name, 4, generator=torch.Generator().manual_seed(seeds[k]))
             for k in range(3)]
    assert torch.equal(got, torch.cat(parts))
    assert not torch.equal(parts[0], parts[1][:100])  # chunks draw different noise


def test_corrupt_transform_advances_its_generator_per_call(images):
    x = as_float(images)
    t = C.Corrupt("gaussian_noise", 3, seed=5)
    first, second = t(x), t(x)
    assert not torch.equal(first, second)
    again = C.Corrupt("gaussian_noise", 3, seed=5)
    assert torch.equal(again(x), first) and torch.equal(again(x), second)


@pytest.mark.parametrize("name", ("gaussian_noise", "glass_blur", "fog"))
def test_dataset_make_c_and_stream_give_the_same_images(tmp_path, images, name):
    from tta.data import streams
    from tta.data.domains import DomainSet
    from tta.data.make_c import make_c
    labels = np.arange(len(images)) % 10
    np.savez(tmp_path / "cifar10_test.npz", x=images, y=labels)
    expected = C.corrupt_dataset(images, name, 5, seed=0)
    make_c(tmp_path / "cifar10_test.npz", tmp_path / "out", corruptions=[name], severities=[5], progress=False)
    written = torch.from_numpy(np.load(tmp_path / "out" / f"{name}.npy")).permute(0, 3, 1, 2)
    assert torch.equal(written, expected)
    domains = DomainSet("cifar10", "generate", tmp_path, len(images), 0, [name], [5])
    played = torch.cat([b.x for b in streams.build("continual", domains, batch_size=100)])
    assert torch.equal((played * 255).round().to(torch.uint8), expected)


def test_values_are_checked_per_chunk_and_named(images):
    x = as_float(images).contiguous()
    x[150, 0, 3, 3] = float("nan")
    with pytest.raises(InputError, match=r"NaN values \(in images 100..199\)"):
        C.corrupt(x, "contrast", 2, seed=0)
    x[150, 0, 3, 3] = 1.5
    with pytest.raises(InputError, match=r"\[0, 1\], got range \[.*, 1.5\] \(in images 100..199\)"):
        C.corrupt(x, "contrast", 2, seed=0)
    with pytest.raises(InputError, match=r"\[0, 1\]"):
        C.corrupt(x[150:151], "contrast", 2, seed=0)


def test_corrupt_dataset_writes_into_a_given_array_of_any_layout(images):
    expected = C.corrupt_dataset(images, "fog", 2, seed=4)
    nhwc = np.zeros(images.shape, dtype=np.uint8)
    target = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    assert C.corrupt_dataset(images, "fog", 2, seed=4, out=target) is target
    assert np.array_equal(nhwc, expected.permute(0, 2, 3, 1).numpy())
    for bad in (torch.zeros(250, 3, 32, 32), torch.zeros(249, 3, 32, 32, dtype=torch.uint8)):
        with pytest.raises(InputError, match="out must be a CPU uint8 tensor of shape"):
            C.corrupt_dataset(images, "fog", 2, seed=4, out=bad)


def test_float64_input_is_not_modified(images):
    x = as_float(images).double().contiguous()
    before = x.clone()
    C.corrupt(x, "brightness", 3)
    assert torch.equal(x, before)


def test_a_worker_error_reaches_the_caller(images, tmp_path, threads):
    threads(2)
    with pytest.raises(MissingFileError, match="frost1.png"):
        C.corrupt_dataset(images, "frost", 1, seed=0, frost_dir=tmp_path / "nowhere")


def test_run_chunks_covers_every_chunk_once_with_at_most_threads_workers():
    done, names, lock = [], set(), threading.Lock()

    def fn(k):
        with lock:
            done.append(k)
            names.add(threading.current_thread().name)

    _workers.run_chunks(fn, 37, "cpu", threads=2)
    assert sorted(done) == list(range(37)) and 1 <= len(names) <= 2
    assert all(n.startswith("tta-corrupt") for n in names)
    _workers.run_chunks(fn, 0, "cpu")  # nothing to do is fine


def test_engine_leaves_the_callers_thread_settings_alone(images, threads):
    threads(2)
    C.corrupt_dataset(images, "gaussian_noise", 1, seed=0)
    assert torch.get_num_threads() == 2
    seen = []
    t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    t.start()
    t.join()
    assert seen == [2]  # a new thread still gets the process default, not the workers' single thread


def test_workers_run_one_torch_thread_each_while_the_caller_keeps_its_own(threads):
    """Each worker's OpenMP team is fixed at one thread when the pool starts: a team of the caller's size
    per worker (the state before this test existed) put 4 busy threads on 2 cores and cost ~20 % of the
    engine's time. A fresh pool is started while the caller runs 2 threads, the case that went wrong."""
    threads(2)
    _workers._forget_pool()
    seen, lock = set(), threading.Lock()

    def fn(k):
        with lock:
            seen.add(torch.get_num_threads())

    _workers.run_chunks(fn, 8, "cpu", threads=2)
    assert seen == {1}
    assert torch.get_num_threads() == 2
    threads(3)
    _workers.run_chunks(fn, 8, "cpu", threads=2)   # a later change of the caller's setting leaves them alone
    assert seen == {1} and torch.get_num_threads() == 3


def test_seeded_groups_equal_one_call_per_group(images, threads):
    from tta.data.corruptions.api import apply_levels, apply_levels_seeded
    levels = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    groups = [(torch.arange(0, 250, 2), 11), (torch.arange(1, 250, 2), 12)]
    threads(2)
    got = apply_levels_seeded(levels, "shot_noise", 3, "cifar", groups)
    for index, seed in groups:
        alone = apply_levels(levels[index], "shot_noise", 3, "cifar", torch.Generator().manual_seed(seed))
        assert torch.equal(got[index], alone)
