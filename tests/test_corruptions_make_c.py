"""make_c: RobustBench file layout, atomic writes, skip-on-rerun, equality with on-the-fly generation."""
import argparse
import json
import os

import numpy as np
import pytest

from tta.data import corruptions as C
from tta.data import make_c as M
from tta.errors import ConfigError


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "src.npz"
    np.savez(path, x=rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8), y=rng.integers(0, 10, 120))
    return path


def test_layout_and_equality_with_corrupt_dataset(source, tmp_path):
    out = tmp_path / "c"
    status = M.make_c(source, out, corruptions=["gaussian_noise", "contrast"], severities=(2, 5), seed=7,
                      progress=False)
    assert status == {"gaussian_noise": "written", "contrast": "written"}
    x = np.load(source)["x"]
    y = np.load(source)["y"]
    arr = np.load(out / "gaussian_noise.npy")
    assert arr.shape == (240, 32, 32, 3) and arr.dtype == np.uint8
    labels = np.load(out / "labels.npy")
    assert labels.dtype == np.uint8 and np.array_equal(labels, np.tile(y, 2))
    for k, severity in enumerate((2, 5)):
        fly = C.corrupt_dataset(x, "gaussian_noise", severity, seed=7).permute(0, 2, 3, 1).numpy()
        assert np.array_equal(arr[k * 120:(k + 1) * 120], fly)
    meta = json.loads((out / "make_c.json").read_text())
    assert meta["gaussian_noise"]["seed"] == 7 and meta["gaussian_noise"]["severities"] == [2, 5]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]


def test_rerun_skips_complete_files_and_redoes_changed_or_broken_ones(source, tmp_path):
    out = tmp_path / "c"
    M.make_c(source, out, corruptions=["contrast", "fog"], severities=(1,), progress=False)
    mtime = os.path.getmtime(out / "contrast.npy")
    assert M.make_c(source, out, corruptions=["contrast", "fog"], severities=(1,), progress=False) == \
        {"contrast": "skipped", "fog": "skipped"}
    assert os.path.getmtime(out / "contrast.npy") == mtime
    np.save(out / "fog.npy", np.zeros((3, 32, 32, 3), np.uint8))              # wrong shape
    assert M.make_c(source, out, corruptions=["contrast", "fog"], severities=(1,), progress=False) == \
        {"contrast": "skipped", "fog": "written"}
    assert M.make_c(source, out, corruptions=["contrast"], severities=(1,), seed=1, progress=False) == \
        {"contrast": "written"}                                                 # other seed


def test_interrupted_write_leaves_no_partial_file(source, tmp_path, monkeypatch):
    """The engine writes into a memory map of a temp file; an interrupt between two severities (the file
    half written) leaves neither the .npy nor the temp file, and no sidecar entry."""
    out = tmp_path / "c"
    real, calls = M.corrupt_dataset, []

    def interrupted(*args, **kwargs):
        calls.append(kwargs["out"].shape)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(M, "corrupt_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        M.make_c(source, out, corruptions=["contrast"], severities=(1, 2), progress=False)
    assert len(calls) == 2
    assert sorted(os.listdir(out)) == ["labels.npy"]


def test_cli_parsing_and_handler(source, tmp_path, capsys):
    parser = argparse.ArgumentParser(prog="tta")
    M.register_cli(parser.add_subparsers())
    args = parser.parse_args(["make-c", "--source", str(source), "--out", str(tmp_path / "o"),
                              "--corruptions", "brightness", "--severities", "1", "3", "--seed", "2", "--quiet"])
    assert args.func(args) == 0
    assert np.load(tmp_path / "o" / "brightness.npy").shape == (240, 32, 32, 3)
    assert "brightness: written" in capsys.readouterr().out
    assert M.parse_severities(["1-5"]) == [1, 2, 3, 4, 5]
    assert M.parse_severities(["1,3", "5"]) == [1, 3, 5]
    for bad in (["0"], ["2-7"], ["x"]):
        with pytest.raises(ConfigError):
            M.parse_severities(bad)
