"""RobustBench import shim, robustbench/torchvision/timm loaders: offline behaviour and normalisation.

Every test runs with sockets disabled (``no_network``) and downloads patched to fail or to return
a local file, so nothing here ever touches the network and offline errors are tested for real.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import types
import urllib.error
from pathlib import Path

import pytest
import torch

from tta.errors import ConfigError, MissingFileError
from tta.models import hub
from tta.models import robustbench as rbm
from tta.models.common import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]


def _blocked(*args, **kwargs):
    raise OSError("network disabled in tests")


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    monkeypatch.setattr(socket.socket, "connect", _blocked)
    monkeypatch.setattr(socket, "create_connection", _blocked)
    monkeypatch.setattr(socket, "getaddrinfo", _blocked)


def _run(code: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


# --------------------------------------------------------------------------- import shim
def test_shim_imports_robustbench_in_fresh_process():
    out = _run(
        "import sys\n"
        "from tta.models.robustbench import import_robustbench, SHIM_MARKER\n"
        "rb = import_robustbench()\n"
        "import robustbench.data, robustbench.utils, robustbench.loaders, robustbench.eval\n"
        "assert callable(robustbench.utils.load_model) and hasattr(robustbench.data, 'load_cifar10')\n"
        "f = robustbench.loaders.pkg_resources.resource_filename("
        "'robustbench.loaders', 'helper_files/imagenet_test_image_ids.txt')\n"
        "import os; assert os.path.isfile(f), f\n"
        "import pyautoattack, pyautoattack.state\n"
        "assert robustbench.eval.AutoAttack is pyautoattack.AutoAttack\n"
        "assert robustbench.eval.EvaluationState is pyautoattack.state.EvaluationState\n"
        "for name in ('pkg_resources', 'autoattack', 'autoattack.state'):\n"  # stand-ins are scoped
        "    assert not getattr(sys.modules.get(name), SHIM_MARKER, False), name\n"
        "    assert sys.modules.get(name) is not pyautoattack, name\n"
        "print('ok')\n")
    assert out.strip().endswith("ok")


def test_import_tta_models_stays_light():
    out = _run(
        "import sys, time\n"
        "t = time.perf_counter(); import tta, tta.models; dt = time.perf_counter() - t\n"
        "heavy = [m for m in ('timm', 'torchvision', 'robustbench', 'huggingface_hub', 'pyautoattack',\n"
        "                     'tta.models.hub', 'tta.models.robustbench') if m in sys.modules]\n"
        "print(heavy, round(dt, 2))\n")
    heavy, _ = out.strip().rsplit(" ", 1)
    assert heavy == "[]", out


def test_no_shim_when_real_modules_are_imported(monkeypatch):
    fake_pr, fake_aa = types.ModuleType("pkg_resources"), types.ModuleType("autoattack")
    monkeypatch.setitem(sys.modules, "pkg_resources", fake_pr)
    monkeypatch.setitem(sys.modules, "autoattack", fake_aa)
    assert rbm._shims_needed() == {}
    with rbm._shims_installed() as added:
        assert added == {}
        assert sys.modules["pkg_resources"] is fake_pr and sys.modules["autoattack"] is fake_aa


def test_no_shim_when_real_modules_are_installed(monkeypatch):
    for name in ("pkg_resources", "autoattack"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    real_find_spec = rbm.importlib.util.find_spec

    def find_spec(name, *args):  # pretend both are installed (not yet imported)
        if name in ("pkg_resources", "autoattack"):
            return rbm.importlib.machinery.ModuleSpec(name, None)
        return real_find_spec(name, *args)

    monkeypatch.setattr(rbm.importlib.util, "find_spec", find_spec)
    assert rbm._shims_needed() == {}


def test_shims_installed_for_missing_modules_and_removed_after(monkeypatch):
    monkeypatch.setitem(sys.modules, "pkg_resources", None)  # None: "import pkg_resources" fails
    monkeypatch.setitem(sys.modules, "autoattack", None)
    import pyautoattack
    import pyautoattack.state

    with rbm._shims_installed() as added:
        assert {"pkg_resources", "autoattack", "autoattack.state"} <= set(added)
        pr = sys.modules["pkg_resources"]
        assert getattr(pr, rbm.SHIM_MARKER) and not hasattr(pr, "get_distribution")  # only what is used
        # a module name resolves next to the module, a package name inside the package
        assert pr.resource_filename("tta.models.common", "x/y.txt") == str(ROOT / "tta" / "models" / "x" / "y.txt")
        assert pr.resource_filename("tta.models", "common.py") == str(ROOT / "tta" / "models" / "common.py")
        from autoattack import AutoAttack
        from autoattack.state import EvaluationState
        assert AutoAttack is pyautoattack.AutoAttack and EvaluationState is pyautoattack.state.EvaluationState
    assert sys.modules["pkg_resources"] is None and sys.modules["autoattack"] is None
    assert "autoattack.state" not in sys.modules


def test_imagenet_5000_ids():
    path = rbm.imagenet_5000_ids()
    assert path.is_file() and path.name == "imagenet_test_image_ids.txt"
    ids = rbm.imagenet_5000_ids(as_list=True)
    assert len(ids) == 5000 == len(set(ids))
    assert all(i.startswith("n") and i.endswith(".JPEG") and "/" in i for i in ids[:50])


# --------------------------------------------------------------------------- robustbench models
@pytest.fixture
def rb_utils(monkeypatch):
    """robustbench.utils with every download entry point failing like an offline machine."""
    rbm.import_robustbench()
    import gdown
    import requests
    import robustbench.utils as utils

    calls = []

    def offline(gdrive_id, fname_save):
        calls.append((gdrive_id, Path(fname_save)))
        raise requests.exceptions.ConnectionError("Failed to resolve 'drive.google.com'")

    monkeypatch.setattr(utils, "download_gdrive_new", offline)
    monkeypatch.setattr(utils, "download_gdrive", offline)
    monkeypatch.setattr(gdown, "download", lambda *a, **k: pytest.fail("gdown.download called"))
    utils.calls = calls
    yield utils
    del utils.calls


def test_robustbench_offline_missing_checkpoint(rb_utils, tmp_path):
    expected = tmp_path / "cifar10" / "corruptions" / "Standard.pt"
    with pytest.raises(MissingFileError) as info:
        rbm.load("Standard", dataset="cifar10", threat_model="corruptions", model_dir=tmp_path)
    msg = str(info.value)
    assert str(expected) in msg and "https://drive.google.com/uc?id=" in msg and "ConnectionError" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, no chain
    assert [p for _, p in rb_utils.calls] == [expected]
    assert rbm.expected_files("Standard", model_dir=tmp_path) == [expected]


def test_robustbench_partial_download_is_removed(rb_utils, monkeypatch, tmp_path):
    import requests

    def half_download(gdrive_id, fname_save):
        Path(fname_save).write_bytes(b"partial")
        raise requests.exceptions.ConnectionError("connection reset")

    monkeypatch.setattr(rb_utils, "download_gdrive_new", half_download)
    with pytest.raises(MissingFileError):
        rbm.load("Standard", model_dir=tmp_path)
    assert not (tmp_path / "cifar10" / "corruptions" / "Standard.pt").exists()


def test_robustbench_default_model_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TTA_DATA_DIR", str(tmp_path))
    assert rbm.default_model_dir() == tmp_path / "models" / "robustbench"
    assert rbm.expected_files("Standard")[0] == tmp_path / "models" / "robustbench" / "cifar10" / "corruptions" / "Standard.pt"


def test_robustbench_unknown_names():
    with pytest.raises(ConfigError, match="Standard"):
        rbm.load("Standart")
    with pytest.raises(ConfigError, match="cifar10"):
        rbm.load("Standard", dataset="cifar11")
    with pytest.raises(ConfigError, match="corruptions"):
        rbm.load("Standard", threat_model="fog")


# --------------------------------------------------------------------------- torchvision
def _manual(net, x, mean, std):
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    return net((x - m) / s)


def test_torchvision_random_init_normalises_inside():
    torch.manual_seed(0)
    model = hub.load_torchvision("resnet18", weights=None)
    assert not model.training
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 1000)
        assert torch.allclose(out, _manual(model.net, x, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)
        assert not torch.allclose(out, model.net(x), atol=1e-3)  # raw input differs: normalisation is inside
    assert hub.load_torchvision("resnet18", weights=None, num_classes=10)(x).shape == (2, 10)


def test_torchvision_offline_download_names_file(monkeypatch, tmp_path):
    import torch.hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: (_ for _ in ()).throw(urllib.error.URLError("offline")))
    with pytest.raises(MissingFileError) as info:
        hub.load_torchvision("resnet18")
    msg = str(info.value)
    assert "resnet18-f37072fd.pth" in msg and str(tmp_path / "hub" / "checkpoints") in msg
    assert "checkpoint=" in msg and info.value.__cause__ is None and info.value.__suppress_context__


def test_torchvision_weights_from_cache_folder_and_checkpoint(monkeypatch, tmp_path):
    """A file placed where the error message says is used without any download."""
    import torch.hub
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("download attempted"))
    ref = torchvision.models.resnet18()
    target = hub.torchvision_weight_file("resnet18")
    target.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), target)
    model = hub.load_torchvision("resnet18", weights="IMAGENET1K_V1")
    x = torch.rand(1, 3, 64, 64)
    ref.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), _manual(ref, x, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5)
    tagged = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.transforms()
    assert tuple(model.mean.flatten().tolist()) == pytest.approx(tagged.mean)
    # the same file given as a checkpoint path (DataParallel prefix and wrapper dict are accepted)
    wrapped = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in ref.state_dict().items()}}, wrapped)
    with torch.no_grad():
        assert torch.allclose(hub.load_torchvision("resnet18", weights=str(wrapped))(x), model(x))
        assert torch.allclose(hub.load_torchvision("resnet18", checkpoint=wrapped)(x), model(x))
    with pytest.raises(MissingFileError, match="nothere.pth"):
        hub.load_torchvision("resnet18", checkpoint=tmp_path / "nothere.pth")


def test_torchvision_unknown_names():
    with pytest.raises(ConfigError, match="resnet18"):
        hub.load_torchvision("resnet19", weights=None)
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        hub.load_torchvision("resnet18", weights="IMAGENET99")


# --------------------------------------------------------------------------- timm
def test_timm_random_init_stats_from_pretrained_cfg():
    torch.manual_seed(0)
    r18 = hub.load_timm("resnet18", pretrained=False)
    assert tuple(r18.mean.flatten().tolist()) == pytest.approx(r18.net.pretrained_cfg["mean"])
    assert tuple(r18.std.flatten().tolist()) == pytest.approx(IMAGENET_STD)
    vit = hub.load_timm("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    assert vit.net.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert tuple(vit.mean.flatten().tolist()) == pytest.approx((0.5, 0.5, 0.5))
    x = torch.rand(2, 3, 224, 224)
    with torch.no_grad():
        assert r18(x[:, :, :64, :64]).shape == (2, 1000)
        out = vit(x)
        assert out.shape == (2, 10)
        assert torch.allclose(out, _manual(vit.net, x, (0.5,) * 3, (0.5,) * 3), atol=1e-5)


@pytest.fixture
def hf_calls(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    calls = []

    def offline(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs.get("local_files_only", False)))
        raise LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    return calls


def test_timm_offline_pretrained_names_repo_and_file(hf_calls):
    with pytest.raises(MissingFileError) as info:
        hub.load_timm("resnet18", pretrained=True)
    msg = str(info.value)
    assert "timm/resnet18.a1_in1k" in msg and "model.safetensors" in msg and "checkpoint=" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__  # one error, no chain
    assert hf_calls[0] == ("timm/resnet18.a1_in1k", "model.safetensors", True)  # cache looked at first
    assert any(not local for _, _, local in hf_calls)


def test_timm_pretrained_from_cached_file(monkeypatch, tmp_path):
    import huggingface_hub
    from safetensors.torch import save_file

    ref = hub.load_timm("resnet18", pretrained=False).net
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(path))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, fn, **kw: str(path))
    model = hub.load_timm("resnet18.a1_in1k", pretrained=True)
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.net(x), ref(x), atol=1e-5)
        assert torch.allclose(hub.load_timm("resnet18", checkpoint=path).net(x), ref(x), atol=1e-5)


def test_timm_unknown_names():
    with pytest.raises(ConfigError, match="vit_tiny_patch16_224"):
        hub.load_timm("vit_tiny_patch16_244", pretrained=False)
    with pytest.raises(ConfigError, match="resnet18.a1_in1k"):
        hub.load_timm("resnet18.bogus", pretrained=False)
