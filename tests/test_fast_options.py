"""The fast options (tta/fast.py): precision, memory_format, compile, threads: auto.

What must hold: the defaults change nothing (bit for bit); a bad value is one clear error; bf16 runs the
model's forwards in bf16 while parameters, optimizer state, teachers and buffers stay fp32 (every method
family that runs on a plain CNN); reset and checkpoint/resume are exact with every option; ``compile:
auto`` decides by its documented rule; ``threads: auto`` avoids busy cores. Speed is measured by
benchmarks/compile_check.py and benchmarks/fast_options.sh, never here.
"""
import io
import os
from collections import OrderedDict
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import tta
from tta import config, fast
from tta.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = [
    {"precision": "bf16"},
    {"memory_format": "channels_last"},
    {"precision": "bf16", "memory_format": "channels_last"},
    {"compile": "auto"},
]
_g = torch.Generator().manual_seed(3)
SOURCE = {"source_images": (torch.rand(64, 3, 32, 32, generator=_g) * 255).to(torch.uint8),
          "source_labels": torch.randint(0, 10, (64,), generator=_g), "source_batch_size": 32}
FISHER = {"fisher_data": torch.rand(64, 3, 32, 32, generator=_g), "fisher_n": 64, "fisher_batch_size": 32}
# Every vision method family that runs on a small BN CNN (the CLIP methods call encode_image, not the
# model's forward: bf16 does not reach them): the shared loop (entropy, filters, weights, Fisher anchor,
# SAM, consistency, after-step moves), the teacher loops (CoTTA, RoTTA, RMT, CMF, SANTA), feature-space
# methods (AdaContrast, LAME), views loops (MEMO, TTAug), source replay (GTTA) and BN-statistics methods.
METHODS = {
    "source": {}, "norm": {}, "norm_ema": {}, "tent": {}, "eta": {}, "eata": FISHER, "eata_c": FISHER,
    "tent_wisdom": {}, "tsallis": {}, "adte": {}, "rdumb": {}, "lcotta": {}, "come": {}, "roid": {}, "cmf": {},
    "cotta": {}, "rotta": {}, "rpl": {}, "memo": {}, "ttaug": {}, "sar": {"skip_top": False},
    "deyo": {"skip_top": False}, "gtta": SOURCE, "rmt": dict(SOURCE, warmup_samples=64, prototype_samples=64),
    "santa": dict(SOURCE, prototype_samples=64), "adacontrast": {"queue_size": 64}, "lame": {},
}


def tiny():
    """A small BN CNN whose last layer is called ``fc`` (so feature-space methods can split it)."""
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(3, 8, 3, padding=1, bias=False)), ("bn1", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)), ("bn2", nn.BatchNorm2d(16)),
        ("relu2", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(1)), ("flat", nn.Flatten()), ("fc", nn.Linear(16, 10))
    ])).eval()


def batches(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(size, 3, 32, 32, generator=g) for _ in range(n)]


def wrap(method, **options):
    """``method`` around a fresh tiny model, with the keyword arguments it needs here (METHODS)."""
    return tta.wrap(tiny(), method, **METHODS.get(method, {}), **options)


def test_default_options_change_nothing():
    plain, explicit = wrap("tent"), wrap("tent", precision="fp32", memory_format="contiguous", compile="off")
    for x in batches():
        assert torch.equal(plain(x), explicit(x))
    assert explicit.fast.is_default and not explicit.model._forward_hooks and not explicit.model._forward_pre_hooks
    assert all(p.is_contiguous() for p in explicit.model.parameters())


@pytest.mark.parametrize("options, message", [
    ({"precision": "fp16"}, "precision must be one of fp32, bf16, got 'fp16'"),
    ({"memory_format": "nhwc"}, "memory_format must be one of contiguous, channels_last"),
    ({"compile": "maybe"}, "compile must be one of off, on, auto"),
])
def test_a_bad_value_is_one_clear_error(options, message):
    with pytest.raises(ConfigError, match=message):
        wrap("tent", **options)


@pytest.mark.parametrize("override, message", [
    ("precision=fp16", "precision must be one of"), ("memory_format=nchw", "memory_format must be one of"),
    ("compile=sometimes", "compile must be one of"), ("threads=0", "threads must be a positive integer, auto"),
    ("threads=many", "threads must be a positive integer, auto"),
])
def test_config_rejects_bad_fast_options(tmp_path, override, message):
    (tmp_path / "c.yaml").write_text("method: {name: tent}\n")
    with pytest.raises(ConfigError, match=message):
        config.load(tmp_path / "c.yaml", [override])


def test_config_reads_yaml_on_off_as_compile_modes(tmp_path):
    (tmp_path / "c.yaml").write_text("method: {name: tent}\ncompile: on\nprecision: bf16\nthreads: auto\n")
    cfg = config.load(tmp_path / "c.yaml")
    assert (cfg["compile"], cfg["precision"], cfg["threads"]) == ("on", "bf16", "auto")
    assert config.load(tmp_path / "c.yaml", ["compile=off"])["compile"] == "off"
    assert config.load(tmp_path / "c.yaml", ["compile=auto"])["compile"] == "auto"


def test_default_fast_options_leave_the_config_hash_unchanged(tmp_path):
    """Cells cached before the options existed stay valid; a non-default option is a different cell."""
    from tta.eval.runner import config_hash
    (tmp_path / "c.yaml").write_text("method: {name: tent}\n")
    cfg = config.load(tmp_path / "c.yaml")
    old = {k: v for k, v in cfg.items() if k not in fast.DEFAULTS}
    assert config_hash(cfg) == config_hash(old)
    assert config_hash(config.load(tmp_path / "c.yaml", ["precision=bf16"])) != config_hash(cfg)


def floating_state(adapter):
    """Every floating tensor the adapter holds: parameters and buffers of all its networks (teachers and
    anchors are submodules), the part states in its state dict and the optimizer state."""
    tensors = {k: v for k, v in adapter.state_dict().items() if torch.is_tensor(v)}
    if adapter.optimizer is not None:
        for i, st in enumerate(adapter.optimizer.state.values()):
            tensors.update({f"optimizer.{i}.{k}": v for k, v in st.items() if torch.is_tensor(v)})
    return {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}


@pytest.mark.parametrize("method", list(METHODS))
def test_bf16_runs_forwards_in_bf16_and_keeps_all_state_fp32(method):
    adapter = wrap(method, precision="bf16")
    conv_dtypes = []  # of every convolution of every network the adapter holds (student, teachers, anchors)
    for conv in [m for m in adapter.modules() if isinstance(m, nn.Conv2d)]:
        conv.register_forward_hook(lambda m, i, o: conv_dtypes.append(o.dtype))
    for x in batches(3):
        out = adapter(x)
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # MEMO's per-image steps run under torch.func (vmap of grad), which autocast does not reach: fp32 there
    assert set(conv_dtypes) == ({torch.bfloat16, torch.float32} if method == "memo" else {torch.bfloat16})
    assert set(floating_state(adapter).values()) == {torch.float32}, floating_state(adapter)


def test_bf16_cotta_teacher_and_anchor_run_bf16_and_average_in_fp32():
    adapter = wrap("cotta", precision="bf16", threshold=2.0, augmentations=4)  # gate always fires
    seen = []
    adapter.ema.model[0].register_forward_hook(lambda m, i, o: seen.append(("teacher", o.dtype)))
    adapter.gate.model[0].register_forward_hook(lambda m, i, o: seen.append(("anchor", o.dtype)))
    x = batches(1)[0]
    before = [p.detach().clone() for p in adapter.ema.model.parameters()]
    assert adapter(x).dtype == torch.float32 and adapter.counters["augmented"] == 1
    assert {s for s, _ in seen} == {"teacher", "anchor"} and {d for _, d in seen} == {torch.bfloat16}
    moved = [float((p - b).abs().max()) for p, b in zip(adapter.ema.model.parameters(), before)]
    assert max(moved) > 0 and all(p.dtype == torch.float32 for p in adapter.ema.model.parameters())


def test_bf16_predictions_stay_close_to_fp32():
    x = batches(1, size=64)[0]
    a, b = wrap("norm")(x), wrap("norm", precision="bf16")(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.9
    assert torch.allclose(a, b, atol=0.1, rtol=0.05)


def test_channels_last_converts_weights_and_inputs():
    adapter = wrap("tent", memory_format="channels_last")
    strides = []
    adapter.model[0].register_forward_pre_hook(lambda m, i: strides.append(i[0].is_contiguous(
        memory_format=torch.channels_last)))
    reference = wrap("tent")
    for x in batches(2):
        assert torch.allclose(adapter(x), reference(x), atol=1e-4)
    assert strides == [True, True]
    assert adapter.model[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_reset_is_exact_with_every_option(options):
    adapter = wrap("tent", **options)
    xs = batches(3)
    first = [adapter(x) for x in xs]
    adapter.reset()
    assert all(torch.equal(a, adapter(x)) for a, x in zip(first, xs))


def resume_matches(method, options, n_before=2, n_after=2):
    """Run ``n_before`` batches, checkpoint (torch.save of the adapter, as the runner does), run on; then
    restore the checkpoint and run the same batches again: the predictions must be identical."""
    adapter = wrap(method, **options)
    xs = batches(n_before + n_after)
    for x in xs[:n_before]:
        adapter(x)
    buf = io.BytesIO()
    torch.save(adapter, buf)
    straight = [adapter(x) for x in xs[n_before:]]
    buf.seek(0)
    restored = torch.load(buf, weights_only=False)
    assert restored.fast.options() == adapter.fast.options()
    return all(torch.equal(a, restored(x)) for a, x in zip(straight, xs[n_before:]))


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("method", ["tent", "cotta"])
def test_checkpoint_resume_is_exact_with_every_option(method, options):
    assert resume_matches(method, options)


@pytest.mark.slow
def test_compile_on_runs_compiled_and_resumes_exactly():
    """One real Inductor compilation of the tiny CNN (forward and backward; a cold cache took ~20 s here,
    a warm one ~4 s) - the compiled adapter pickles, restores and recompiles from the on-disk cache."""
    from torch._dynamo.utils import counters
    before = counters["stats"]["unique_graphs"]
    assert resume_matches("tent", {"compile": "on"})
    assert counters["stats"]["unique_graphs"] > before
    eager, compiled = wrap("tent"), wrap("tent", compile="on")
    for x in batches(2):
        assert torch.allclose(eager(x), compiled(x), atol=1e-4)
    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).is_dir()


def test_compile_on_is_an_error_for_a_method_with_its_own_loop_and_auto_stays_eager():
    with pytest.raises(ConfigError, match="compile: on needs the shared adaptation loop"):
        wrap("cotta", compile="on")
    adapter = wrap("cotta", compile="auto")
    adapter(batches(1)[0])
    assert adapter.fast.auto.decided is False and "loop of its own" in adapter.fast.auto.reason


@pytest.fixture()
def records(tmp_path, monkeypatch):
    """Compile records in a fresh folder."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    return tmp_path


def feed(auto, seconds_per_batch, batches_, compiled_now=False, shape=(200, 3, 32, 32)):
    for _ in range(batches_):
        auto.observe(shape, seconds_per_batch, compiled_now, "cpu")


def test_compile_auto_weighs_the_stream_length_against_the_compile_cost(records):
    # eager 1 ms/img; default estimate: 60 s to compile, 1.4x speed-up -> pays beyond 210,000 images to come
    short, long_ = fast.AutoCompile(expected=100_000), fast.AutoCompile(expected=300_000)
    feed(short, 0.2, fast.PROBE_BATCHES)
    feed(long_, 0.2, fast.PROBE_BATCHES)
    assert short.decided is False and "default estimate" in short.reason
    assert long_.decided is True and "from the config" in long_.reason
    # what this machine measured replaces the defaults: a warm cache compiles in 5 s
    fast.write_record(long_.key, cold_s=200.0, warm_s=5.0, speedup=1.5)
    again = fast.AutoCompile(expected=100_000)
    feed(again, 0.2, fast.PROBE_BATCHES)
    assert again.decided is True and "measured on this machine" in again.reason
    # a measured speed-up <= 1 never compiles
    fast.write_record(long_.key, speedup=0.9)
    never = fast.AutoCompile(expected=10 ** 9)
    feed(never, 0.2, fast.PROBE_BATCHES)
    assert never.decided is False


def test_compile_auto_without_a_length_compiles_once_the_stream_has_run_long_enough(records):
    auto = fast.AutoCompile()
    feed(auto, 0.2, fast.PROBE_BATCHES)
    assert auto.decided is None  # 600 images seen: not worth 60 s yet; asked again every batch
    feed(auto, 0.2, 1100)  # ~221,000 images seen -> as many expected to come
    assert auto.decided is True and "as many as seen so far" in auto.reason


def test_compile_auto_records_the_measured_compile_time_and_speed_up(records):
    auto = fast.AutoCompile(expected=10 ** 7)
    feed(auto, 0.2, fast.PROBE_BATCHES)
    assert auto.decided is True
    feed(auto, 30.2, 1, compiled_now=True)  # the first compiled batch compiles: 30 s more than eager
    feed(auto, 0.1, 1 + fast.MEASURE_BATCHES, compiled_now=True)
    record = fast.read_records()[auto.key]
    assert record["cold_s"] == pytest.approx(30.0) and record["speedup"] == pytest.approx(2.0)
    assert (records / fast.RECORDS_FILE).exists() and not auto.timing


def test_stream_images_counts_the_configured_stream(tmp_path):
    (tmp_path / "c.yaml").write_text("method: {name: tent}\ndata: {corruptions: [fog, snow], n_examples: 300}\n")
    assert fast.stream_images(config.load(tmp_path / "c.yaml")) == 600
    cfg = config.load(tmp_path / "c.yaml", ["setting=lifelong", "stream.rounds=4", "data.n_examples=null"])
    assert fast.stream_images(cfg) == 2 * 10000 * 4


@pytest.mark.parametrize("busy, threads, note", [
    (0.1, 2, ""), (0.9, 1, "other processes keep 0.9 cores busy"), (2.0, 1, "Every core is busy")])
def test_threads_auto_uses_only_idle_cores_and_says_why(monkeypatch, busy, threads, note):
    monkeypatch.setattr(fast, "usable_cores", lambda: 2)
    monkeypatch.setattr(fast, "busy_cores", lambda interval=0.3: busy)
    chosen, message = fast.auto_threads()
    assert chosen == threads and note in message and bool(message) == bool(note)


def test_threads_auto_sets_torch_threads():
    saved = torch.get_num_threads()
    try:
        fast.apply_threads("auto")
        assert 1 <= torch.get_num_threads() <= fast.usable_cores()
        assert fast.busy_cores(0.05) is None or 0 <= fast.busy_cores(0.05) <= fast.usable_cores() + 0.5
    finally:
        torch.set_num_threads(saved)


TINY_RUN = ["data.n_examples=400", "data.corruptions=[gaussian_noise,contrast,fog]", "data.source=generate",
            "progress=false"]


def run_cli(tmp_path, run_name, extra=(), wait=True):
    cmd = [sys.executable, "-m", "tta.cli", "run", str(ROOT / "configs/cifar10c/tent.yaml"), *TINY_RUN,
           f"output.dir={tmp_path}", f"output.run_name={run_name}", *extra]
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def kill_after_first_checkpoint(tmp_path, run_name, extra):
    proc = run_cli(tmp_path, run_name, extra, wait=False)
    state = tmp_path / run_name / "state.pt"
    deadline = time.time() + 600
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "the run finished or failed before writing its first checkpoint"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.realdata
@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["precision=bf16", "memory_format=channels_last", "compile=auto", "threads=auto"],
    ["compile=on", "threads=1"],
], ids=["bf16+channels_last+auto", "compile_on"])
def test_tta_run_kill_and_resume_with_fast_options(data_dir, tmp_path, extra):
    import json
    full = run_cli(tmp_path, "full", extra)
    assert full.returncode == 0, full.stderr
    kill_after_first_checkpoint(tmp_path, "killed", extra)
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = run_cli(tmp_path, "killed", extra)
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert a["batch_errors"] == b["batch_errors"] and a["mean_error"] == b["mean_error"]
    chosen = dict(e.split("=") for e in extra if not e.startswith("threads"))
    assert {k: a["fast"][k] for k in chosen} == chosen


def test_compile_cache_is_the_tta_folder_unless_the_user_chose_one(tmp_path, monkeypatch):
    from torch._inductor.runtime.runtime_utils import default_cache_dir
    monkeypatch.setenv("TTA_CACHE_DIR", str(tmp_path / "tta"))
    for unset in (None, default_cache_dir()):  # importing Inductor writes its default into the variable
        if unset is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", unset)
        assert fast.compile_cache_dir() == str(tmp_path / "tta" / "torch_compile")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "tta" / "torch_compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert fast.compile_cache_dir() == str(tmp_path / "mine")
