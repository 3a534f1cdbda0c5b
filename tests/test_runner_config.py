"""Configs (inheritance, overrides, clear errors) and the runner (outputs, determinism across processes,
resume after kill -9). Runner tests use generated corruptions of a few hundred real test images."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from tta import config
from tta.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_base_inheritance_and_dotted_overrides(tmp_path):
    write(tmp_path / "base.yaml", {"name": "b", "stream": {"batch_size": 64}, "method": {"name": "tent", "lr": 0.5}})
    write(tmp_path / "child.yaml", {"_base_": "base.yaml", "name": "c", "data": {"severities": [3]}})
    cfg = config.load(tmp_path / "child.yaml", ["method.lr=0.25", "setting=reset_each_shift", "data.n_examples=10"])
    assert cfg["name"] == "c" and cfg["stream"]["batch_size"] == 64
    assert cfg["method"] == {"name": "tent", "lr": 0.25}
    assert cfg["setting"] == "reset_each_shift" and cfg["data"]["severities"] == [3]
    assert cfg["data"]["n_examples"] == 10 and cfg["model"]["name"] == "cifar_resnet20"  # default kept
    # switching the method drops the options of the old one
    assert config.load(tmp_path / "child.yaml", ["method.name=norm"])["method"] == {"name": "norm"}


def test_shipped_configs_all_validate():
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert len(paths) >= 6
    for path in paths:
        if path.name != "base.yaml":
            config.load(path)


@pytest.mark.parametrize("override, message", [
    (["modle.name=x"], r"unknown config key\(s\) \['modle'\]"),
    (["data.corruption=[fog]"], "allowed: dataset, data_dir"),
    (["seed=abc"], "seed must be int"),
    (["stream.batch_size=2", "stream.batchsize=3"], "unknown stream option"),
    (["method.name=tnet"], "unknown method 'tnet'"),
    (["method.lrr=1"], "unknown option"),
    (["model.name=resnet9000"], "unknown model name"),
    (["data.corruptions=[fgo]"], "unknown corruption"),
    (["setting=sometimes"], "unknown setting"),
    (["data.severities=[6]"], "severities"),
    (["progress=1"], "progress must be bool"),
    (["justtext"], "key=value"),
])
def test_config_errors_are_clear(tmp_path, override, message):
    write(tmp_path / "c.yaml", {"method": {"name": "tent"}})
    with pytest.raises(ConfigError, match=message):
        config.load(tmp_path / "c.yaml", override)


def test_missing_config_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("method: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")


TINY = ["data.n_examples=400", "data.corruptions=[gaussian_noise,contrast,fog]", "data.source=generate",
        "progress=false", "threads=1"]


def run_cli(tmp_path, run_name, extra=(), wait=True):
    cmd = [sys.executable, "-m", "tta.cli", "run", str(ROOT / "configs/cifar10c/tent.yaml"), *TINY,
           f"output.dir={tmp_path}", f"output.run_name={run_name}", *extra]
    env = dict(os.environ)
    if wait:
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


@pytest.mark.realdata
def test_run_writes_outputs_and_is_deterministic_across_processes(data_dir, tmp_path):
    a, b = run_cli(tmp_path, "a"), run_cli(tmp_path, "b")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert "| tent |" in a.stdout and "gaussian_noise-5" in a.stdout
    ra = json.loads((tmp_path / "a" / "results.json").read_text())
    rb = json.loads((tmp_path / "b" / "results.json").read_text())
    for name in ("config.yaml", "results.csv", "table.md"):
        assert (tmp_path / "a" / name).exists()
    assert [r["domain"] for r in ra["domains"]] == ["gaussian_noise-5", "contrast-5", "fog-5"]
    assert all(r["n"] == 400 and r["backward"] == 2 for r in ra["domains"])
    assert ra["batch_errors"] == rb["batch_errors"] and ra["mean_error"] == rb["mean_error"]
    assert not (tmp_path / "a" / "state.pt").exists()


@pytest.mark.realdata
def test_resume_after_kill_gives_identical_results(data_dir, tmp_path):
    full = run_cli(tmp_path, "full")
    assert full.returncode == 0, full.stderr
    proc = run_cli(tmp_path, "killed", wait=False)
    state = tmp_path / "killed" / "state.pt"
    deadline = time.time() + 300
    while not state.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert state.exists(), "the run finished or failed before writing its first checkpoint"
    os.kill(proc.pid, signal.SIGKILL)  # mid-way through the second domain
    proc.wait()
    assert not (tmp_path / "killed" / "results.json").exists()
    resumed = run_cli(tmp_path, "killed")
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "killed" / "results.json").read_text())
    assert [r["error"] for r in a["domains"]] == [r["error"] for r in b["domains"]]
    assert a["batch_errors"] == b["batch_errors"]


def test_cli_reports_config_errors_without_traceback(tmp_path):
    write(tmp_path / "c.yaml", {"method": {"name": "tent", "lrr": 1}})
    out = subprocess.run([sys.executable, "-m", "tta.cli", "run", str(tmp_path / "c.yaml")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("error: unknown option") and "Traceback" not in out.stderr


def test_fisher_images_from_an_imagenet_val_folder(tmp_path):
    """EATA's ImageNet Fisher images: a seeded subset, shorter side resized to 256, centre crop 224."""
    import numpy as np
    from PIL import Image
    from tta.eval.runner import fisher_images
    for k, wnid in enumerate(("n01", "n02")):
        (tmp_path / "imagenet" / "val" / wnid).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((300, 400, 3), 40 * k + j, np.uint8)).save(tmp_path / "imagenet" / "val" / wnid / f"{j}.JPEG")
    x = fisher_images({"dataset": "imagenet_val", "n": 4}, tmp_path, seed=1)
    assert x.shape == (4, 3, 224, 224) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.equal(x, fisher_images({"dataset": "imagenet_val", "n": 4}, tmp_path, seed=1))
    with pytest.raises(ConfigError, match="dataset one of"):
        fisher_images({"dataset": "svhn"}, tmp_path, seed=1)


def test_imagenet_c_folder_layout_with_all_images(tmp_path):
    """ImageNet-C layout <root>/ImageNet-C/<corruption>/<severity>/<wnid>/*.JPEG; labels = sorted-wnid index."""
    import numpy as np
    from PIL import Image
    from tta.data.domains import DomainSet
    for k, wnid in enumerate(("n02", "n01")):
        folder = tmp_path / "ImageNet-C" / "fog" / "5" / wnid
        folder.mkdir(parents=True)
        for j in range(2):
            Image.fromarray(np.full((224, 224, 3), 50 * k + j, np.uint8)).save(folder / f"img{j}.JPEG")
    domains = DomainSet("imagenet", "files", tmp_path, corruptions=["fog"], severities=[5], imagenet_subset=False)
    x, y = domains.domains[0].load()
    assert x.shape == (4, 3, 224, 224) and x.dtype == torch.uint8
    assert y.tolist() == [0, 0, 1, 1]  # n01 first (sorted), then n02
    from tta.errors import MissingFileError
    with pytest.raises(MissingFileError, match="ImageNet-C folder"):
        DomainSet("imagenet", "files", tmp_path, corruptions=["snow"], severities=[5]).domains[0].load()
