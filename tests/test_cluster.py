"""``tta table --backend ray|slurm`` with the real engines: a local Ray cluster (2 CPUs, started and stopped here)
and submitit's local executor compute a 4-cell table whose numbers equal ``--backend local`` to the last digit;
a Ray worker killed with SIGKILL in the middle of a cell is retried and the table completes; a cell that keeps
failing is listed as failed while the others finish; options are checked before any work starts."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tta.errors import ConfigError
from tta.eval import cluster, table
from tta.eval.cells import Task
from tta.eval.lock import LOCK_NAME

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "configs/cifar10c/base.yaml")
TINY = ["data.source=generate", "data.n_examples=300", "data.corruptions=[gaussian_noise,fog]", "stream.batch_size=50",
        "progress=false", "device=cpu", "threads=1"]
GRID = dict(methods=["norm", "tent"], seeds=[1, 2])


def numbers(out: Path):
    """Everything a cell computed except timings and memory: errors, calibration, counters, per-batch errors."""
    cells = {}
    for path in sorted((out / "cells").glob("*.json")):
        res = json.loads(path.read_text())["results"]
        timing = ("seconds", "img_per_s")
        cells[path.stem] = {"domains": [{k: v for k, v in r.items() if k not in timing} for r in res["domains"]],
                            "batch_errors": res["batch_errors"], "mean_error": res["mean_error"]}
    return cells


def errors_only(markdown: str):
    return [line.rsplit("|", 3)[0] for line in markdown.splitlines()]  # drop the img/s and peak MB columns


@pytest.fixture(scope="module")
def local_table(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    res = table.run_table([BASE], **GRID, overrides=[*TINY, f"data.data_dir={data_dir}"], out=out, log=lambda m: None)
    assert len(numbers(out)) == 4 and not res["failed"]
    return out, res["markdown"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.mark.realdata
def test_ray_table_equals_local_and_a_failing_cell_is_reported(local_table, ray_cluster, data_dir, tmp_path):
    bad = tmp_path / "broken.yaml"  # valid config, fails in the worker: the checkpoint is not there
    bad.write_text(f"_base_: {BASE}\nname: broken\nmodel: {{checkpoint: {tmp_path / 'missing.th'}}}\n")
    res = table.run_table([BASE, str(bad)], methods=["norm", "tent"], seeds=[1, 2], backend="ray",
                          backend_options={"retries": 1}, overrides=[*TINY, f"data.data_dir={data_dir}"],
                          out=tmp_path / "ray", log=lambda m: None)
    assert sorted(res["failed"]) == ["norm_(broken)__seed1", "norm_(broken)__seed2", "tent_(broken)__seed1",
                                     "tent_(broken)__seed2"]
    assert all("FileNotFoundError" in e and "missing.th" in e and "(2 attempts)" in e for e in res["failed"].values())
    assert "| norm (broken) | failed | failed | failed | - | - |" in res["markdown"]
    assert "Failed cells" in res["markdown"] and "`tent_(broken)__seed2`: FileNotFoundError" in res["markdown"]
    local_out, local_md = local_table
    renamed = {k.replace("_(base)", ""): v for k, v in numbers(tmp_path / "ray").items()}
    assert renamed == numbers(local_out)  # to the last digit
    rows = [line.replace(" (base)", "") for line in errors_only(res["markdown"])[2:4]]
    assert rows == errors_only(local_md)[2:4]


@pytest.mark.realdata
def test_a_killed_ray_worker_is_retried_and_the_table_completes(local_table, ray_cluster, data_dir, tmp_path):
    out = tmp_path / "killed"
    killed = {}

    def kill_a_worker_mid_cell():
        deadline = time.time() + 600
        while not killed and time.time() < deadline:
            for lock in (out / "runs").glob(f"*/{LOCK_NAME}"):
                try:
                    pid = json.loads(lock.read_text())["pid"]
                except (OSError, ValueError):
                    continue
                if (lock.parent / "state.pt").exists():  # one domain done, the next under way
                    os.kill(pid, signal.SIGKILL)
                    killed.update(pid=pid, cell=lock.parent.name)
                    return
            time.sleep(0.01)

    killer = threading.Thread(target=kill_a_worker_mid_cell, daemon=True)
    killer.start()
    res = table.run_table([BASE], **GRID, backend="ray", backend_options={"retries": 2},
                          overrides=[*TINY, f"data.data_dir={data_dir}"], out=out, log=lambda m: None)
    killer.join(timeout=5)
    assert killed, "no cell was caught mid-way"
    assert not res["failed"]
    record = json.loads((out / "cells" / f"{killed['cell']}.json").read_text())
    assert not record["worker"].endswith(f":{killed['pid']}")  # computed again by another worker
    assert numbers(out) == numbers(local_table[0])
    assert errors_only(res["markdown"]) == errors_only(local_table[1])


@pytest.mark.realdata
def test_submitit_local_executor_gives_the_same_table(local_table, data_dir, tmp_path, capsys):
    pytest.importorskip("submitit")
    from tta.cli import main
    out = tmp_path / "slurm"
    argv = ["table", BASE, "--methods", "norm", "tent", "--seeds", "1", "2", "--backend", "slurm",
            "--submitit-cluster", "local", "--partition", "ignored-here", "--sbatch", "account=x", "--out", str(out),
            *[o for o in TINY if o != "progress=false"], f"data.data_dir={data_dir}"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "table (slurm)" in captured.err and "4/4" in captured.err  # the progress bar over cells
    assert numbers(out) == numbers(local_table[0])
    assert errors_only((out / "table.md").read_text()) == errors_only(local_table[1])
    assert len(list((out / "slurm").glob("*_0_result.pkl"))) == 4  # one job per cell
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    assert main(argv) == 0  # a rerun submits nothing and rewrites no cell
    assert len(list((out / "slurm").glob("*_0_result.pkl"))) == 4
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}


@pytest.mark.parametrize("options, backend, message", [
    ({"partition": "gpu"}, "ray", "--partition do"),
    ({"ray_address": "auto"}, "local", "--ray-address do"),
    ({"gpus_per_cell": 0.5}, "slurm", "whole number on Slurm"),
    ({"cpus_per_cell": 0}, "ray", "--cpus-per-cell must be > 0"),
    ({"retries": -1}, "ray", "--retries must be >= 0"),
    ({"sbatch": ["=x"]}, "slurm", "--sbatch takes KEY=VALUE"),
])
def test_backend_options_are_checked(options, backend, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        cluster.make_backend(backend, tmp_path, options)


def test_cli_flags_reach_the_backend_and_sbatch_options_are_parsed(tmp_path):
    args = table.parse(["a.yaml", "--backend", "slurm", "--partition", "p", "--time", "30", "--gpus-per-cell", "1",
                        "--cpus-per-cell", "4", "--array-parallelism", "8", "--sbatch", "account=abc",
                        "--sbatch=--qos=high", "x.y=1"])
    assert args["backend"] == "slurm" and args["overrides"] == ["x.y=1"]
    engine = cluster.make_backend(args["backend"], tmp_path, args["backend_options"])
    assert engine.params == {"name": "tta-table", "timeout_min": 30, "cpus_per_task": 4, "gpus_per_node": 1,
                             "slurm_partition": "p", "slurm_array_parallelism": 8,
                             "slurm_additional_parameters": {"account": "abc", "qos": "high"}}
    ray_engine = cluster.make_backend("ray", tmp_path, {"gpus_per_cell": 0.25, "cpus_per_cell": 0.5})
    assert (ray_engine.gpus, ray_engine.cpus, ray_engine.retries) == (0.25, 0.5, 2)


class FakeSubmitit:
    """submitit's surface the Slurm backend uses; job outcomes follow a script per cell key."""

    def __init__(self, script):
        self.script, self.submitted, self.params = script, [], {}
        fake = self

        class Job:
            def __init__(self, key):
                self.outcome = fake.script[key].pop(0)

            def done(self):
                return True

            def result(self):
                if self.outcome == "fail":
                    raise RuntimeError("Job (task=0) failed during processing with trace:\n----------------------\n"
                                       "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\n"
                                       "RuntimeError: node lost\n\nYou can check full logs with 'job.stderr(0)'")
                return {"results": {"mean_error": 1.0}, "seconds": 0.5, "worker": "node:1"}

        class AutoExecutor:
            def __init__(self, folder, cluster):
                fake.folder, fake.cluster = folder, cluster

            def update_parameters(self, **params):
                fake.params.update(params)

            @contextlib.contextmanager
            def batch(self):
                yield

            def submit(self, fn, task):
                fake.submitted.append(task.key)
                return Job(task.key)

        self.AutoExecutor = AutoExecutor


def test_slurm_backend_resubmits_failed_jobs_then_reports_the_error(monkeypatch, tmp_path):
    fake = FakeSubmitit({"a": ["fail", "ok"], "b": ["fail", "fail"], "c": ["ok"]})
    monkeypatch.setattr(cluster, "_require", lambda module, import_it=True: fake)
    engine = cluster.SlurmBackend(tmp_path / "slurm", retries=1, partition="p", poll=0)
    tasks = [Task(k, {}, "d", str(tmp_path), {}) for k in "abc"]
    outcomes = []
    engine.run(tasks, outcomes.append)
    assert sorted(fake.submitted) == ["a", "a", "b", "b", "c"] and fake.params["slurm_partition"] == "p"
    by_key = {o.key: o for o in outcomes}
    assert by_key["a"].results == {"mean_error": 1.0} and by_key["a"].attempts == 2
    assert by_key["b"].results is None and by_key["b"].error == "RuntimeError: node lost" and by_key["b"].attempts == 2
    assert by_key["c"].attempts == 1 and by_key["c"].worker == "node:1"


def test_a_missing_engine_is_one_error_naming_pip(monkeypatch, tmp_path, capsys):
    from tta.cli import main
    real = cluster.importlib.util.find_spec
    monkeypatch.setattr(cluster.importlib.util, "find_spec", lambda name: None if name == "ray" else real(name))
    assert main(["table", BASE, "--backend", "ray", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == "error: --backend ray needs the ray package: pip install 'tta[cluster]' (or pip install ray)\n"


def test_importing_tta_and_its_cli_loads_no_engine_or_tracker():
    code = ("import sys, tta, tta.cli, tta.eval.table, tta.eval.runner; tta.cli.build_parser(); "
            "print(sorted(m for m in ('ray', 'submitit', 'wandb', 'mlflow', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "[]", out.stderr
