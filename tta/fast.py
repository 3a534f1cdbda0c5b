"""The fast options of an adapter: ``precision``, ``memory_format``, ``compile``; and ``threads: auto``.

Why a module of its own: the loop in adapter.py stays one readable loop. The adapter hands the model to
:meth:`FastPath.prepare` once (memory format, bf16 hooks), each batch to :meth:`FastPath.run` (input
layout; ``step``: CUDA-graph step marks and timing for ``compile: auto``) and calls the model through
:meth:`FastPath.call` (eager or compiled). With the defaults (fp32, contiguous, off) none of these does
anything: no hook is added, no context is entered and the model is called directly, so published numbers
reproduce bit for bit.

``precision: bf16``
    Every forward of the model runs under ``torch.autocast`` with bfloat16, on CPU or CUDA: a pre-hook
    on the model enters autocast and a hook leaves it and casts the outputs back to fp32 (and hooks on
    its classifier layer hand the features and logits over in fp32, for the feature-space methods). So every
    forward a method makes through the model or a ``deepcopy`` of it (student, teacher, anchor, augmented
    views, filter passes, SAM's second pass) is bf16, while everything between forwards (augmentations,
    losses, filters, weights, pseudo-labels, running averages, the optimizer step) stays fp32.
    Parameters are never cast (autocast casts a copy for each matmul / convolution), so gradients,
    optimizer state and EMA teachers (``teacher.ema_`` lerps the fp32 parameters) stay fp32. Methods
    that call something other than the model's forward (a CLIP model's ``encode_image``) run those
    calls in fp32.
``memory_format: channels_last``
    The model's 4-D parameters and every input batch in NHWC layout: oneDNN (CPU) and cuDNN convolutions
    run faster on it. Helps convolutional models; a ViT sees it only in its patch embedding.
``compile: on | auto``
    ``torch.compile`` of the model call of the shared loop (``Adapter.call_model``: the loss forward, with
    its backward, and SAM's second pass), one compiled function shared by every adapter (the model is its
    argument, so an adapter restored from a checkpoint reuses the graph), with Inductor's on-disk caches
    (compiled kernels, and the forward/backward split) kept under the tta cache folder
    (``tta.paths.cache_dir()/torch_compile``), so only the first run on a machine pays the full
    compilation. Methods with a loop of their own call ``self.model`` directly; for them ``on`` is an
    error and ``auto`` stays eager. On CUDA the compiled call uses CUDA graphs (``reduce-overhead``): the
    shared loop always calls the model on the whole batch, so shapes are fixed for a fixed batch size.
    ``auto``: see :class:`AutoCompile`.

CUDA paths (autocast on CUDA, CUDA graphs, ``torch.cuda.synchronize`` for timing) run only for CUDA
inputs; none of them has been run on a GPU yet (no GPU was available when they were written).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16")
MEMORY_FORMATS = ("contiguous", "channels_last")
COMPILE_MODES = ("off", "on", "auto")
DEFAULTS = {"precision": "fp32", "memory_format": "contiguous", "compile": "off"}


def check_compile(value) -> str:
    """``off | on | auto``; YAML reads a bare ``on`` / ``off`` as a boolean, so True / False are accepted."""
    if value is True or value is False:
        return "on" if value else "off"
    if value not in COMPILE_MODES:
        raise ConfigError(f"compile must be one of {', '.join(COMPILE_MODES)}, got {value!r}")
    return value


def check_options(precision: str = "fp32", memory_format: str = "contiguous", compile="off") -> Tuple[str, str, str]:
    """One clear error for a bad value of any fast option; returns them normalised."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ConfigError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    return precision, memory_format, check_compile(compile)


# ------------------------------------------------------------------------------- bf16 forwards
_AUTOCAST = threading.local()  # per thread: the autocast contexts entered by the hooks below, innermost last


def _autocast_enter(module, args):
    """Forward pre-hook: enter bf16 autocast for this forward (on the input's device type).

    Hooks, not a wrapper, so that the model keeps its own class and state-dict keys and every copy made
    with ``deepcopy`` (teachers, anchors) runs in bf16 too; module-level functions, so a model carrying
    them still pickles (checkpoints). Inside an outer autocast (the compiled call enters it itself) the
    hooks step aside."""
    if torch.compiler.is_compiling():
        return
    stack = _AUTOCAST.__dict__.setdefault("stack", [])
    x = next((a for a in args if isinstance(a, torch.Tensor)), None)
    device = x.device.type if x is not None else "cpu"
    if torch.is_autocast_enabled(device):
        stack.append(None)
        return
    ctx = torch.autocast(device, dtype=torch.bfloat16)
    ctx.__enter__()
    stack.append(ctx)


def _autocast_exit(module, args, output):
    """Forward hook (runs even when the forward raises): leave the autocast entered by
    :func:`_autocast_enter` and hand back floating outputs in fp32, so that losses, filters, weights,
    pseudo-labels and running averages are computed in fp32."""
    stack = _AUTOCAST.__dict__.get("stack")
    if torch.compiler.is_compiling() or not stack:  # (a graph break can run one hook compiled, one eager)
        return None
    ctx = stack.pop()
    if ctx is None:
        return None
    ctx.__exit__(None, None, None)
    return _to_fp32(output)


def _fp32_inputs(module, args):
    """Pre-hook on the classifier layer: its input (the features that feature-space methods read with
    a hook, ``tta.models.split``) in fp32."""
    cast = _to_fp32(args)
    return None if all(a is b for a, b in zip(cast, args)) else cast


def _fp32_output(module, args, output):
    """Hook on the classifier layer: its output in fp32 already, so that the model's output is the
    classifier's output object (what ``tta.models.split`` checks) and no later cast is needed."""
    return _to_fp32(output)


def classifier_layer(model):
    """The model's last layer as ``tta.models.split`` finds it (None when it finds none, or for CLIP)."""
    from .models.split import split
    try:
        head = split(model)[1]
    except ConfigError:
        return None
    return head if any(head is m for m in model.modules()) else None


def _to_fp32(output):
    if isinstance(output, torch.Tensor):
        return output.float() if output.dtype == torch.bfloat16 else output
    if isinstance(output, (tuple, list)):
        return type(output)(_to_fp32(t) for t in output)
    return output


# --------------------------------------------------------------------------------- compiled call
def _call(model, x):
    return model(x)


_COMPILED: Dict[str, Any] = {}


def compile_cache_dir():
    """Where Inductor keeps its compiled graphs: ``<tta cache>/torch_compile`` unless the user already
    chose a folder with ``TORCHINDUCTOR_CACHE_DIR``. Importing parts of Inductor writes torch's own default
    (a per-user folder under the system temp dir, wiped on reboot) into that variable, so that value
    counts as unset."""
    from .paths import cache_dir
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == _torch_default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = current = str(cache_dir() / "torch_compile")
    return current


def _torch_default_cache_dir() -> Optional[str]:
    try:
        from torch._inductor.runtime.runtime_utils import default_cache_dir
        return os.path.abspath(default_cache_dir())
    except Exception:  # noqa: BLE001 - a torch without this helper: only an unset variable counts as unset
        return None


def compiled(cuda_graphs: bool = False):
    """``torch.compile(lambda model, x: model(x))``, built once per process and mode. The model is an
    argument, not a constant, so every model of the same architecture (student, teacher copy, an adapter
    restored from a checkpoint) runs the same compiled graph."""
    mode = "reduce-overhead" if cuda_graphs else "default"
    if mode not in _COMPILED:
        compile_cache_dir()  # before Inductor's modules load: they fill in torch's default folder
        import torch._functorch.config as functorch_config
        import torch._inductor.config as inductor_config
        import torch._dynamo.config as dynamo_config
        inductor_config.fx_graph_cache = True  # compiled kernels on disk
        functorch_config.enable_autograd_cache = True  # the forward/backward split on disk
        # One function serves every model of the process (a table runs many cells): each architecture,
        # batch shape and grad mode is a cache entry of its own, so allow more than torch's default 8.
        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
        _COMPILED[mode] = torch.compile(_call, mode=mode)
    return _COMPILED[mode]


# --------------------------------------------------------------------------------- compile: auto
RECORDS_FILE = "tta_compile_records.json"
# Used until this machine has measured a graph: compile seconds on a cold cache and the speed-up of the
# compiled step, as measured on the 2-core development CPU for cifar_resnet20 TENT (issue 15: 36 s cold,
# 1.45x warm). A GPU compiles about as long and gains less on small models.
DEFAULT_COLD_S = {"cpu": 60.0, "cuda": 60.0}
DEFAULT_SPEEDUP = {"cpu": 1.4, "cuda": 1.2}
PROBE_BATCHES = 3  # eager batches timed before deciding (the first is not used: one-time set-up)
MEASURE_BATCHES = 5  # compiled batches timed after compiling, to record the real speed-up


def _records_path():
    return os.path.join(compile_cache_dir(), RECORDS_FILE)


def read_records() -> Dict[str, Dict[str, float]]:
    try:
        with open(_records_path()) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def write_record(key: str, **values: float) -> None:
    """Merge ``values`` into this graph's record (atomic replace: concurrent runs lose nothing worse than
    one update)."""
    records = read_records()
    records[key] = {**records.get(key, {}), **values}
    path = _records_path()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(records, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


@dataclass
class AutoCompile:
    """``compile: auto``: compile once the time it saves on the rest of the stream exceeds what it costs.

    1. The first ``PROBE_BATCHES`` batches run eager and are timed (the first only warms up); this gives
       ``t``, eager seconds per image.
    2. ``cost``: seconds this graph took to compile on this machine the last time the cache was already
       filled (``warm_s``), else the first time (``cold_s``), else ``DEFAULT_COLD_S``. ``speedup``:
       measured on this machine for this graph, else ``DEFAULT_SPEEDUP``. A graph is one (torch version,
       device, model architecture, precision, memory format, batch shape).
    3. ``remaining``: images still to come, from the stream length in the config (the runner calls
       :meth:`FastPath.expect`); when nobody said, as many as have been seen so far, re-checked every
       batch, so an open-ended stream compiles once it has run long enough.
    4. Compile iff ``remaining * t * (1 - 1 / speedup) > cost``. The first compiled batch then gives the
       measured compile time and the next ``MEASURE_BATCHES`` the measured speed-up; both are written to a
       records file next to Inductor's cache, so later decisions on this machine use its own numbers (and
       a measured speed-up at or below 1 keeps ``auto`` eager for that graph).
    """
    base_key: str = ""
    key: str = ""
    expected: Optional[int] = None
    seen: int = 0
    eager: list = field(default_factory=lambda: [0, 0, 0.0])  # batches, images and seconds after the first
    fast: list = field(default_factory=lambda: [0, 0, 0.0])  # the same for compiled batches
    decided: Optional[bool] = None
    reason: str = f"eager so far: decides after {PROBE_BATCHES} batches"

    @staticmethod
    def per_image(tally) -> float:
        return tally[2] / max(tally[1], 1)

    @property
    def timing(self) -> bool:
        return self.decided is None or (self.decided and self.fast[0] <= MEASURE_BATCHES)

    def observe(self, shape, seconds: float, compiled_now: bool, device: str) -> None:
        """One batch done: keep its time, decide when enough is known, record what compiling gave."""
        self.key = self.key or f"{self.base_key}|batch{tuple(shape)}"
        self.seen += shape[0]
        tally = self.fast if compiled_now else self.eager
        tally[0] += 1
        if compiled_now and tally[0] == 1:  # compile time: the first compiled batch minus an eager one
            warm = "cold_s" in read_records().get(self.key, {})
            spent = max(0.0, seconds - self.per_image(self.eager) * shape[0])
            write_record(self.key, **{"warm_s" if warm else "cold_s": round(spent, 2)})
            return
        if tally[0] == 1:
            return  # the first eager batch sets things up: not timed
        tally[1] += shape[0]
        tally[2] += seconds
        if compiled_now and tally[0] == 1 + MEASURE_BATCHES:
            write_record(self.key, speedup=round(self.per_image(self.eager) / max(self.per_image(tally), 1e-12), 3))
        elif not compiled_now and self.decided is None and tally[0] >= PROBE_BATCHES:
            self.decide(device)

    def decide(self, device: str) -> None:
        record = read_records().get(self.key, {})
        cost = record.get("warm_s", record.get("cold_s", DEFAULT_COLD_S.get(device, 60.0)))
        speedup = record.get("speedup", DEFAULT_SPEEDUP.get(device, 1.2))
        t = self.per_image(self.eager)
        remaining = max(0, self.expected - self.seen) if self.expected is not None else self.seen
        saving = remaining * t * (1 - 1 / speedup) if speedup > 1 else 0.0
        go = saving > cost
        horizon = "from the config" if self.expected is not None else "assumed: as many as seen so far"
        self.reason = (f"{'compiled' if go else 'eager'}: {remaining} images to come ({horizon}) x {t * 1e3:.2f} "
                       f"ms/img eager x (1 - 1/{speedup:.2f}) = {saving:.1f} s saved vs {cost:.1f} s to compile "
                       f"({'measured on this machine' if record else 'default estimate'})")
        if go or self.expected is not None:
            self.decided = go


# ------------------------------------------------------------------------------------- the path
class FastPath:
    """The fast options of one adapter (see module docstring). Holds strings and numbers only, so it
    pickles with the adapter (checkpoints); the compiled function lives at module level."""

    def __init__(self, precision: str = "fp32", memory_format: str = "contiguous", compile="off"):
        self.precision, self.memory_format, self.compile = check_options(precision, memory_format, compile)
        self.auto = AutoCompile() if self.compile == "auto" else None

    @property
    def is_default(self) -> bool:
        return (self.precision, self.memory_format, self.compile) == ("fp32", "contiguous", "off")

    def options(self) -> Dict[str, str]:
        return {"precision": self.precision, "memory_format": self.memory_format, "compile": self.compile}

    def describe(self) -> Dict[str, Any]:
        """The options and, for ``compile: auto``, what was decided and why."""
        out: Dict[str, Any] = self.options()
        if self.auto is not None:
            out["compile_auto"] = self.auto.reason
        return out

    def prepare(self, model, method: str = "", loop_compiles: bool = True):
        """Configure ``model`` in place for these options (once, before the adapter snapshots it).
        ``loop_compiles``: False when the method's own loop calls the model without ``call_model``."""
        if self.compile == "on" and not loop_compiles:
            raise ConfigError(f"compile: on needs the shared adaptation loop, but method {method!r} runs a loop of "
                              "its own whose forwards are not compiled; use compile: off (or auto, which keeps "
                              "it eager)")
        if self.auto is not None and not loop_compiles:
            self.auto.decided, self.auto.reason = False, f"eager: method {method!r} runs a loop of its own"
        if self.memory_format == "channels_last":
            model = model.to(memory_format=torch.channels_last)
        if self.precision == "bf16" and _autocast_enter not in model._forward_pre_hooks.values():
            model.register_forward_pre_hook(_autocast_enter)
            model.register_forward_hook(_autocast_exit, always_call=True)
            head = classifier_layer(model)
            if head is not None:
                head.register_forward_pre_hook(_fp32_inputs)
                head.register_forward_hook(_fp32_output)
        if self.auto is not None:
            self.auto.base_key = graph_key(model, self)
        return model

    def expect(self, images: Optional[int]) -> None:
        """The number of images the stream will hold (for ``compile: auto``)."""
        if self.auto is not None:
            self.auto.expected = images

    # ------------------------------------------------------------------------------ per batch
    def input(self, x):
        if self.memory_format == "channels_last" and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @property
    def compiling(self) -> bool:
        return self.compile == "on" or (self.auto is not None and bool(self.auto.decided))

    def cuda_graphs(self, x) -> bool:
        return self.compiling and x.is_cuda

    def run(self, adapt, x):
        """``adapt(x)`` for one batch with these options: the input layout, then inside ``step``."""
        if self.is_default:
            return adapt(x)
        x = self.input(x)
        with self.step(x):
            return adapt(x)

    @contextmanager
    def step(self, x):
        """Around one batch's adaptation (non-default options only, see :meth:`run`): the CUDA-graph step
        mark, and timing for ``compile: auto``."""
        if self.cuda_graphs(x):
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the previous batch may be overwritten now
        timing, compiled_now = self.auto is not None and self.auto.timing, self.compiling
        start = time.perf_counter() if timing else 0.0
        yield
        if timing:
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            self.auto.observe(tuple(x.shape), time.perf_counter() - start, compiled_now, x.device.type)

    def call(self, model, x):
        """``model(x)``, through the compiled function when compiling (its output cloned under CUDA graphs,
        whose next replay would overwrite it while the loop still holds it, e.g. SAM's first logits)."""
        if not self.compiling:
            return model(x)
        graphs = self.cuda_graphs(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext():
            out = compiled(graphs)(model, x)
        return _to_fp32(out).clone() if graphs else _to_fp32(out)


def graph_key(model, fast: FastPath) -> str:
    """What a compiled graph depends on, as a short stable string (the records' key)."""
    shapes = ";".join(f"{n}:{tuple(p.shape)}:{p.requires_grad}" for n, p in model.named_parameters())
    digest = hashlib.blake2b(f"{type(model).__name__}|{shapes}".encode(), digest_size=8).hexdigest()
    device = next(model.parameters()).device.type if any(True for _ in model.parameters()) else "cpu"
    return f"torch{torch.__version__}|{device}|{type(model).__name__}:{digest}|{fast.precision}|{fast.memory_format}"


# --------------------------------------------------------------------------------- threads: auto
def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity, capped by a cgroup CPU quota if there is one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cores = max(1, min(cores, int(float(quota) / float(period))))
    except (OSError, ValueError):
        pass
    return cores


def _cpu_times(cpus) -> Dict[int, Tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3:4].isdigit():
                name, *fields = line.split()
                cpu = int(name[3:])
                if cpu in cpus:
                    values = [int(v) for v in fields[:8]]
                    idle = values[3] + values[4]  # idle + iowait
                    out[cpu] = (sum(values) - idle, sum(values))
    return out


def busy_cores(interval: float = 0.3) -> Optional[float]:
    """How many of this process's cores other processes kept busy over ``interval`` seconds (this process
    sleeps meanwhile), or None where /proc/stat is not readable (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        before = _cpu_times(cpus)
        time.sleep(interval)
        after = _cpu_times(cpus)
    except (AttributeError, OSError):
        return None
    busy = 0.0
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (b1, t1))
        busy += (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0
    return busy


def auto_threads(interval: float = 0.3) -> Tuple[int, str]:
    """``threads: auto``: as many torch threads as there are idle cores (at least 1), and why.

    A torch thread on a core that another process holds makes every parallel operation wait for it at
    the operation's end: on the 2-core development machine, 2 threads with one core taken ran TENT 6x
    slower than 1 thread. So a core counts as free only when it is mostly idle: threads =
    ``int(usable cores - busy cores + 0.25)``, i.e. with 2 cores, 2 threads only while the others use
    less than a quarter of a core in total. Returns (threads, a sentence for the user when cores are
    busy, else "").
    """
    cores = usable_cores()
    busy = busy_cores(interval)
    if busy is None:
        return cores, ""
    threads = max(1, min(cores, int(cores - busy + 0.25)))
    if threads == cores:
        return threads, ""
    note = (f"threads: auto uses {threads} of {cores} cores: other processes keep {busy:.1f} cores busy "
            f"(load average {os.getloadavg()[0]:.1f}); a torch thread on a busy core would make every "
            f"operation wait for it.")
    if busy > cores - 0.5:
        note += " Every core is busy, so this run will be slower than on an idle machine."
    return threads, note


def apply_threads(value) -> str:
    """Apply the config's ``threads`` (None: torch's default; an int; ``auto``); returns a note or ""."""
    if value is None:
        return ""
    note = ""
    if value == "auto":
        value, note = auto_threads()
    torch.set_num_threads(int(value))
    return note


def check_threads(value) -> None:
    if value is None or value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return
    raise ConfigError(f"threads must be a positive integer, auto or null, got {value!r}")


def stream_images(cfg: Dict[str, Any]) -> Optional[int]:
    """About how many images the config's stream holds (for ``compile: auto``): images per domain times
    domain visits times rounds. Approximate where the data set's size is not known up front (None)."""
    data, stream = cfg["data"], cfg.get("stream", {})
    sizes = {"cifar10": 10000, "cifar100": 10000,
             "imagenet": 50000 if data.get("imagenet_subset") == "all" else 5000}
    per_domain = data.get("n_examples") or sizes.get(data["dataset"])
    if per_domain is None:
        return None
    if cfg.get("setting") == "gradual":
        from .data.streams import gradual_schedule
        visits = len(gradual_schedule(data["corruptions"]))
    else:
        visits = max(1, len(data.get("corruptions") or []) * len(data.get("severities") or [1]))
    return per_domain * visits * int(stream.get("rounds", 1))
