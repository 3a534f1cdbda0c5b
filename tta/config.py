"""Benchmark configs: YAML with ``_base_`` inheritance, dotted ``key=value`` overrides, and validation.

A config is a plain nested dict checked against :data:`SCHEMA` (types and allowed keys). The ``method``
block is checked against the method's own options and the ``stream`` block against the protocol's, so
an unknown key, a wrong type, an unknown method or model name is one clear error listing what is allowed.
Nothing here builds objects: the runner reads the validated dict.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Dict, Iterable, Union

import yaml

from .errors import ConfigError

ANY = object()  # a value of any type (method and stream options are checked by their owners)

SCHEMA: Dict[str, Any] = {
    "name": str,
    "seed": int,
    "device": str,
    "threads": (int, str, type(None)),  # an int, auto (the idle cores: tta.fast.auto_threads) or null (torch's default)
    # the fast options (tta.fast); YAML reads a bare on/off as a boolean, so compile also takes true/false
    "precision": str,  # fp32 | bf16
    "memory_format": str,  # contiguous | channels_last
    "compile": (str, bool),  # off | on | auto
    "progress": bool,
    "setting": str,
    "model": {"name": str, "checkpoint": (str, type(None)), "options": dict},
    "data": {
        "dataset": str,  # cifar10 | cifar100 | imagenet (corruptions) | a folder data set (tta.data.folders)
        "data_dir": (str, type(None)),
        "source": str,  # files | generate | auto
        "corruptions": list,
        "severities": list,
        "n_examples": (int, type(None)),
        "seed": int,
        "imagenet_subset": str,  # robustbench_5000 (CoTTA protocol, list order) | all (EATA/SAR/DeYO: 50,000)
        # reading files (tta.data.loader / decode / folders); none of these changes which images are shown
        "workers": (int, type(None)),  # background decode processes; null: half the CPUs, at most 8
        "decoder": str,  # torchvision | pil
        "preprocess": (str, type(None)),  # resize256 | square256 | clip224 | none; null: the data set's default
        "jpeg_roundtrip": bool,  # generated ImageNet-C / CCC: the released files' JPEG-85 save
        "shuffle": (bool, type(None)),  # seeded random order; null: folder data sets yes, corruption sets no
        "domains": list,  # domains of domainnet126 / imagenet_d109 (empty: all)
        "sh_filter": bool,  # reproduce the TDA family's lister that drops names containing "sh"
    },
    "stream": dict,  # protocol options, validated against the protocol's signature
    "method": dict,  # name + options, validated against the method's signature
    "output": {"dir": str, "save": bool, "run_name": (str, type(None)),
               # run-time settings that do not change the numbers (left out of the runner's config hash):
               "loggers": list,  # any of tta.eval.loggers.LOGGERS
               "logger_options": dict,  # {logger name: {option: value}}, see tta.eval.loggers
               "lock_wait": (float, type(None))},  # seconds to wait for a busy results folder; None: the caller's
}

DEFAULTS: Dict[str, Any] = {
    "name": "run", "seed": 1, "device": "auto", "threads": None, "progress": True, "setting": "continual",
    "precision": "fp32", "memory_format": "contiguous", "compile": "off",
    "model": {"name": "cifar_resnet20", "checkpoint": None, "options": {}},
    "data": {"dataset": "cifar10", "data_dir": None, "source": "auto", "corruptions": [], "severities": [5],
             "n_examples": None, "seed": 0, "imagenet_subset": "robustbench_5000", "workers": None,
             "decoder": "torchvision", "preprocess": None, "jpeg_roundtrip": False, "shuffle": None, "domains": [],
             "sh_filter": False},
    "stream": {"batch_size": 200},
    "method": {"name": "source"},
    "output": {"dir": "results", "save": True, "run_name": None, "loggers": [], "logger_options": {},
               "lock_wait": None},
}


def load(path: Union[str, Path], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    """Read ``path`` (following ``_base_``), apply ``key=value`` overrides, fill defaults, validate."""
    cfg = merge(copy.deepcopy(DEFAULTS), _read_with_bases(Path(path), set()))
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def from_dict(raw: Dict[str, Any], overrides: Iterable[str] = ()) -> Dict[str, Any]:
    cfg = merge(copy.deepcopy(DEFAULTS), copy.deepcopy(raw))
    for item in overrides:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


def _read_with_bases(path: Path, seen: set) -> Dict[str, Any]:
    path = path.resolve()
    if not path.exists():
        raise ConfigError(f"config file {path} not found")
    if path in seen:
        raise ConfigError(f"_base_ cycle through {path}")
    seen.add(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping at the top level")
    bases = raw.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: Dict[str, Any] = {}
    for base in bases:
        merged = merge(merged, _read_with_bases(path.parent / base, seen))
    return merge(merged, raw)


def merge(base: Dict[str, Any], top: Dict[str, Any]) -> Dict[str, Any]:
    """Recursive dict merge; ``top`` wins. The ``method`` block is replaced, not merged, when the method
    name changes (options of one method mean nothing to another); so is the ``model`` block when the
    model name changes (a RobustBench model's ``dataset`` option means nothing to a timm model)."""
    out = dict(base)
    for k, v in top.items():
        if k == "method" and isinstance(v, dict) and isinstance(out.get(k), dict) \
                and "name" in v and v["name"] != out[k].get("name"):
            out[k] = copy.deepcopy(v)
        elif k == "model" and isinstance(v, dict) and isinstance(out.get(k), dict) \
                and "name" in v and v["name"] != out[k].get("name"):
            out[k] = merge({"checkpoint": None, "options": {}}, v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def apply_override(cfg: Dict[str, Any], item: str) -> None:
    """``a.b.c=value``; the value is parsed as YAML (numbers, lists, booleans, null)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key=value (dotted keys for nesting, e.g. "
                          "method.lr=0.001)")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = cfg
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    if parts[-1] == "name" and node is cfg.get("method") and value != node.get("name"):
        node.clear()  # a new method starts from its own defaults
    if parts[-1] == "name" and node is cfg.get("model") and value != node.get("name"):
        node.update(checkpoint=None, options={})  # a new model starts without the old one's options
    node[parts[-1]] = value


def _type_name(t) -> str:
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    return "null" if t is type(None) else t.__name__


def _check(node: Any, schema: Any, path: str) -> None:
    if isinstance(schema, dict):
        if not isinstance(node, dict):
            raise ConfigError(f"{path or 'config'} must be a mapping, got {type(node).__name__}")
        unknown = sorted(set(node) - set(schema))
        if unknown:
            raise ConfigError(f"unknown config key(s) {unknown} in {path or 'the top level'}; "
                              f"allowed: {', '.join(schema)}")
        for k, v in node.items():
            _check(v, schema[k], f"{path}.{k}" if path else k)
        return
    if schema is ANY:
        return
    types = schema if isinstance(schema, tuple) else (schema,)
    if float in types and isinstance(node, int) and not isinstance(node, bool):
        return
    if isinstance(node, bool) and bool not in types:
        raise ConfigError(f"{path} must be {_type_name(schema)}, got a boolean ({node})")
    if not isinstance(node, types):
        raise ConfigError(f"{path} must be {_type_name(schema)}, got {type(node).__name__} ({node!r})")


def validate(cfg: Dict[str, Any]) -> None:
    """Types and keys everywhere; method, protocol, model and corruption names against their registries."""
    _check(cfg, SCHEMA, "")
    from . import methods
    from .data import streams
    method = dict(cfg["method"])
    name = method.pop("name", None)
    if not isinstance(name, str):
        raise ConfigError(f"method.name must be a method name; available: {', '.join(methods.available())}")
    allowed = set(methods.method_options(name)) | set(methods.COMMON_KEYS) | set(RUNNER_METHOD_KEYS)
    unknown = sorted(set(method) - allowed)
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown} for method {name!r}; allowed: {', '.join(sorted(allowed))}")
    from .parts.postprocess import build as build_postprocess
    for key in ("postprocess", "sharpen"):
        if method.get(key) is not None:
            build_postprocess(method[key])  # a wrong name or option is a ConfigError now, not mid-run
    streams.check_options(cfg["setting"], cfg["stream"])
    _check_model_name(cfg["model"]["name"])
    if cfg["data"]["source"] not in ("files", "generate", "auto"):
        raise ConfigError(f"data.source must be files, generate or auto, got {cfg['data']['source']!r}")
    if cfg["data"]["imagenet_subset"] not in ("robustbench_5000", "all"):
        raise ConfigError(f"data.imagenet_subset must be robustbench_5000 or all, got {cfg['data']['imagenet_subset']!r}")
    _check_data(cfg["data"])
    for s in cfg["data"]["severities"]:
        if s not in (1, 2, 3, 4, 5):
            raise ConfigError(f"data.severities must hold integers 1..5, got {s!r}")
    _check_corruptions(cfg["data"]["corruptions"])
    _check_output(cfg["output"])
    from . import fast
    fast.check_threads(cfg["threads"])
    cfg["compile"] = fast.check_options(cfg["precision"], cfg["memory_format"], cfg["compile"])[2]  # True: "on"


DATASETS = ("cifar10", "cifar100", "imagenet")  # corruption data sets; folder data sets: tta.data.folders


def _check_data(data: Dict[str, Any]) -> None:
    """Data set name, reader options and the keys that only apply to one kind of data set."""
    from .data.folders import available
    from .data.decode import check_decoder, check_preprocess
    from .data.loader import resolve_workers
    folders = available()
    if data["dataset"] not in DATASETS + tuple(folders):
        raise ConfigError(f"data.dataset must be one of {', '.join(DATASETS + tuple(folders))}, "
                          f"got {data['dataset']!r}")
    if data["dataset"] in folders and data["corruptions"]:
        raise ConfigError(f"data.dataset {data['dataset']} has domains, not corruptions: set data.corruptions=[] "
                          "(data.domains chooses DomainNet/ImageNet-D domains)")
    if data["dataset"] in folders and data["source"] == "generate":
        raise ConfigError(f"data.source=generate makes corruptions of cifar10, cifar100 or imagenet, not of "
                          f"{data['dataset']}")
    check_decoder(data["decoder"])
    if data["preprocess"] is not None:
        check_preprocess(data["preprocess"])
    resolve_workers(data["workers"])
# method options the runner turns into objects before calling tta.wrap (data specs)
RUNNER_METHOD_KEYS = ("fisher", "source")


def _check_model_name(name: str) -> None:
    from .models import FAMILIES
    if name.startswith("cifar_resnet"):
        if name not in FAMILIES:
            raise ConfigError(f"unknown model name {name!r}; expected one of: {', '.join(FAMILIES)}")
    elif name.partition(":")[0] not in ("robustbench", "torchvision", "timm", "openclip") or ":" not in name:
        raise ConfigError(f"unknown model name {name!r}; expected one of: {', '.join(FAMILIES)}")


def _check_corruptions(names) -> None:
    from .data.domains import known_corruptions
    known = known_corruptions()
    bad = [n for n in names if n not in known]
    if bad:
        raise ConfigError(f"unknown corruption(s) {bad}; allowed: {', '.join(known)}")


def _check_output(output: Dict[str, Any]) -> None:
    from .eval.loggers import check_options
    check_options(output["loggers"], output["logger_options"])
    wait = output["lock_wait"]
    if wait is not None and wait < 0:
        raise ConfigError(f"output.lock_wait must be a number of seconds >= 0 or null, got {wait!r}")


def dump(cfg: Dict[str, Any]) -> str:
    return yaml.safe_dump(cfg, sort_keys=False)
