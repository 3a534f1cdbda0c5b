"""Experiment trackers (``output.loggers``): one real ``tta run`` logs to TensorBoard, wandb (offline) and mlflow
(./mlruns) at once, and each store is read back with its own reader; names and options are validated; a
missing package is one error naming the pip command; trackers do not change the config hash (no recompute)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tta import config
from tta.errors import ConfigError
from tta.eval import loggers

ROOT = Path(__file__).resolve().parents[1]


def read_wandb_offline(run_dir: Path):
    """(history rows, summary, config) from an offline run's ``run-<id>.wandb``: wandb's LevelDB-style log
    (7-byte file header, 32 KiB blocks of records with a 7-byte header: crc32, length, type) of protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb
    buf = next(run_dir.glob("run-*.wandb")).read_bytes()
    records, chunks, pos, block = [], [], 7, 32768
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos:pos + 7])
        pos += 7
        if n == 0 and kind == 0:  # zero padding to the end of a block
            pos += left - 7
            continue
        chunks.append(buf[pos:pos + n])
        pos += n
        if kind in (1, 4):  # FULL or LAST
            records.append(b"".join(chunks))
            chunks = []
    history, summary, cfg = [], {}, {}
    for data in records:
        rec = pb.Record()
        rec.ParseFromString(data)
        which = rec.WhichOneof("record_type")
        if which == "history":
            history.append({_key(i): json.loads(i.value_json) for i in rec.history.item})
        elif which == "summary":
            summary.update({_key(i): json.loads(i.value_json) for i in rec.summary.update})
        elif which == "run":
            cfg.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    return history, summary, cfg


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # keys with a slash are stored split


@pytest.mark.realdata
def test_one_run_logs_to_tensorboard_wandb_and_mlflow_and_each_reads_back(data_dir, tmp_path, monkeypatch):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_"))}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"), WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
               WANDB_DATA_DIR=str(tmp_path / "wandb_data"))
    cmd = [sys.executable, "-m", "tta.cli", "run", str(ROOT / "configs/cifar10c/tent.yaml"), "data.n_examples=200",
           "data.corruptions=[gaussian_noise,fog]", "data.source=generate", "stream.batch_size=50", "progress=false",
           "threads=1", "device=cpu", f"data.data_dir={data_dir}", f"output.dir={tmp_path / 'results'}",
           "output.run_name=logged", "output.loggers=[tensorboard,wandb,mlflow]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "results" / "logged"
    results = json.loads((run / "results.json").read_text())
    batch_errors, domains = results["batch_errors"], [r["domain"] for r in results["domains"]]
    assert len(batch_errors) == 8 and domains == ["gaussian_noise-5", "fog-5"]
    ece = {r["domain"]: r.get("ece") for r in results["domains"]}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("online/batch_error")] == list(range(8))
    assert [e.value for e in events.Scalars("online/batch_error")] == pytest.approx(batch_errors, rel=1e-6)
    for r in results["domains"]:
        assert events.Scalars(f"domain/error/{r['domain']}")[0].value == pytest.approx(r["error"], rel=1e-6)
        if ece[r["domain"]] is not None:
            assert events.Scalars(f"domain/ece/{r['domain']}")[0].value == pytest.approx(ece[r["domain"]], rel=1e-6)
    assert len(events.Scalars("speed/img_per_s")) == 2 and "summary/img_per_s" in events.Tags()["scalars"]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "name: tent" in config_text

    history, summary, wandb_cfg = read_wandb_offline(next((run / "wandb").glob("offline-run-*")))
    logged = [row["online/batch_error"] for row in history if "online/batch_error" in row]
    assert logged == pytest.approx(batch_errors) and [row["_step"] for row in history][:8] == list(range(8))
    per_domain = {k: v for row in history for k, v in row.items() if k.startswith("domain/error/")}
    assert per_domain == pytest.approx({f"domain/error/{r['domain']}": r["error"] for r in results["domains"]})
    assert summary["summary/mean_error"] == pytest.approx(results["mean_error"])
    assert wandb_cfg["method"]["name"] == "tent" and wandb_cfg["stream"]["batch_size"] == 50

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow import MlflowClient
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())  # ./mlruns of where tta ran
    (mlrun,) = client.search_runs([client.get_experiment_by_name("tta").experiment_id])
    assert mlrun.info.status == "FINISHED" and mlrun.info.run_name == "logged"
    assert mlrun.data.params["method.name"] == "tent" and mlrun.data.params["stream.batch_size"] == "50"
    history = client.get_metric_history(mlrun.info.run_id, "online/batch_error")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(batch_errors)
    assert mlrun.data.metrics["domain/error/fog-5"] == pytest.approx(results["domains"][1]["error"])
    assert mlrun.data.metrics["summary/mean_error"] == pytest.approx(results["mean_error"])
    assert [a.path for a in client.list_artifacts(mlrun.info.run_id)] == ["config.yaml"]


def test_any_per_domain_metric_in_the_rows_is_logged(tmp_path):
    """Metrics the evaluator adds later (a new column in the rows) reach the trackers without code here."""
    pytest.importorskip("tensorboard")
    cfg = config.from_dict({"output": {"loggers": ["tensorboard"]}})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tta.eval.metrics import ErrorAccumulator
    with loggers.open_trackers(cfg, tmp_path) as trackers:
        acc = ErrorAccumulator()
        acc.batch_errors += [10.0, 30.0]
        trackers.segment(acc, 1.0)
        trackers.finish({"domains": [{"round": 0, "domain": "fog-5", "error": 20.0, "future_metric": 0.25,
                                      "img_per_s": None}],
                         "rounds": [{"round": 0, "mean_error": 20.0}], "mean_error": 20.0, "mean_future": 0.5,
                         "batch_errors": [10.0, 30.0]})
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert events.Scalars("domain/future_metric/fog-5")[0].value == 0.25
    assert events.Scalars("summary/mean_future")[0].value == 0.5
    assert [e.value for e in events.Scalars("online/mean_error")] == [10.0, 20.0]
    assert "domain/img_per_s/fog-5" not in events.Tags()["scalars"]  # None: nothing to log


@pytest.mark.parametrize("override, message", [
    (["output.loggers=[tensorbord]"], "output.loggers must name each of tensorboard, wandb, mlflow"),
    (["output.loggers=[wandb,wandb]"], "at most once"),
    (["output.loggers=wandb"], "must be list"),
    (["output.logger_options.wandb.projekt=x"], r"unknown option\(s\) \['projekt'\] in output.logger_options.wandb"),
    (["output.logger_options.neptune.x=1"], "must map logger names"),
    (["output.lock_wait=-1"], "lock_wait must be a number of seconds >= 0"),
])
def test_logger_and_lock_options_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        config.load(ROOT / "configs/cifar10c/tent.yaml", override)


def test_a_missing_tracker_package_is_one_error_naming_pip(monkeypatch, tmp_path):
    real = loggers.importlib.util.find_spec
    monkeypatch.setattr(loggers.importlib.util, "find_spec", lambda name: None if name == "mlflow" else real(name))
    cfg = config.from_dict({"output": {"loggers": ["mlflow"]}})
    with pytest.raises(ConfigError, match=r"mlflow package is not installed: pip install 'tta\[loggers\]'"):
        loggers.open_trackers(cfg, tmp_path)


def test_trackers_and_lock_wait_do_not_change_the_config_hash():
    """A table computed without trackers is reused, not recomputed, when they are switched on."""
    from tta.eval.runner import config_hash
    plain = config.load(ROOT / "configs/cifar10c/tent.yaml")
    logged = config.load(ROOT / "configs/cifar10c/tent.yaml", ["output.loggers=[tensorboard]", "output.lock_wait=5",
                                                              "output.logger_options.wandb.mode=online"])
    assert config_hash(plain) == config_hash(logged)
    assert config_hash(plain) != config_hash(config.load(ROOT / "configs/cifar10c/tent.yaml", ["seed=2"]))
