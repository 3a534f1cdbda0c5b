"""The results-folder lock: one writer per folder, a clear message for the second, takeover of a lock whose
holder was killed (same host: the pid is gone; another host: a stale heartbeat), and two real ``tta run``
processes aimed at one folder."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tta.eval import lock as lock_mod
from tta.eval.lock import LOCK_NAME, FolderLock, LockHeld

ROOT = Path(__file__).resolve().parents[1]


def write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    raw = {"pid": os.getpid(), "host": lock_mod.HOST, "started": time.time(), "token": "t0", "pid_start": None}
    path = folder / LOCK_NAME
    path.write_text(json.dumps({**raw, **fields}))
    return path


def held_elsewhere(folder: Path, wait=0.0):
    """Try the lock from another thread (another holder in this process's eyes), return the error or None."""
    box = {}

    def attempt():
        try:
            with FolderLock(folder, wait=wait, poll=0.05, log=lambda m: None):
                box["got"] = True
        except LockHeld as e:
            box["error"] = e
    t = threading.Thread(target=attempt)
    t.start()
    t.join()
    return box.get("error")


def test_second_holder_gets_one_message_naming_the_holder_and_reentry_is_allowed(tmp_path):
    with FolderLock(tmp_path / "r") as held:
        assert json.loads(held.path.read_text())["pid"] == os.getpid()
        with FolderLock(tmp_path / "r"):  # the same thread again: re-entrant
            pass
        assert held.path.exists()
        error = held_elsewhere(tmp_path / "r")
        assert error is not None
        msg = str(error)
        assert f"pid {os.getpid()} on host {lock_mod.HOST}" in msg and "output.lock_wait" in msg
    assert not (tmp_path / "r" / LOCK_NAME).exists()
    assert held_elsewhere(tmp_path / "r") is None  # released: free again


def test_a_waiting_process_gets_the_lock_when_the_holder_finishes(tmp_path):
    lk = FolderLock(tmp_path, log=lambda m: None).acquire()
    threading.Timer(0.3, lk.release).start()
    t0 = time.monotonic()
    assert held_elsewhere(tmp_path, wait=10) is None
    assert 0.2 < time.monotonic() - t0 < 10


def test_lock_of_a_kill_9_process_is_taken_over(tmp_path):
    code = ("import sys, time; from tta.eval.lock import FolderLock; FolderLock(sys.argv[1]).acquire(); "
            "print('held', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind
    messages = []
    with FolderLock(tmp_path, wait=0, log=messages.append) as lk:
        assert json.loads(lk.path.read_text())["token"] == lk.token
    assert len(messages) == 1 and f"pid {proc.pid}" in messages[0] and "no longer running" in messages[0]


def test_reused_pid_and_stale_heartbeat_of_another_host(tmp_path):
    write_lock(tmp_path / "a", pid_start=-5)  # our live pid, but recorded with another start time
    messages = []
    with FolderLock(tmp_path / "a", log=messages.append):
        assert "now belongs to another process" in messages[0]

    path = write_lock(tmp_path / "b", host="node-elsewhere", pid=1)  # fresh heartbeat: alive for all we know
    with pytest.raises(LockHeld, match="pid 1 on host node-elsewhere"):
        FolderLock(tmp_path / "b", wait=0.2, poll=0.05, log=lambda m: None).acquire()
    old = time.time() - lock_mod.STALE_AFTER_S - 60
    os.utime(path, (old, old))
    messages.clear()
    with FolderLock(tmp_path / "b", log=messages.append):
        assert "no heartbeat" in messages[0]


def test_the_holder_refreshes_its_heartbeat(tmp_path):
    with FolderLock(tmp_path, heartbeat=0.05) as lk:
        os.utime(lk.path, (0, 0))
        deadline = time.time() + 10
        while lk.path.stat().st_mtime < 1 and time.time() < deadline:
            time.sleep(0.02)
        assert lk.path.stat().st_mtime > time.time() - 60


TINY = ["data.n_examples=200", "data.corruptions=[gaussian_noise,fog]", "data.source=generate", "stream.batch_size=100",
        "progress=false", "threads=1", "device=cpu", "output.run_name=shared"]


def tta_run(out: Path, data_dir, **kw):
    cmd = [sys.executable, "-m", "tta.cli", "run", str(ROOT / "configs/cifar10c/source.yaml"), *TINY,
           f"output.dir={out}", f"data.data_dir={data_dir}"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for_lock(path: Path, proc, timeout=300):
    deadline = time.time() + timeout
    while not path.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert path.exists(), proc.communicate()[1]


@pytest.mark.realdata
def test_two_concurrent_runs_on_one_folder_give_one_result_and_one_message(data_dir, tmp_path):
    first = tta_run(tmp_path, data_dir)
    wait_for_lock(tmp_path / "shared" / LOCK_NAME, first)
    os.kill(first.pid, signal.SIGSTOP)  # hold it mid-run, so the second surely meets the lock
    try:
        second = tta_run(tmp_path, data_dir)
        out, err = second.communicate(timeout=300)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == 2 and "Traceback" not in err, err
    assert err.startswith(f"error: results folder {tmp_path / 'shared'} is in use by pid {first.pid} on host "), err
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    results = json.loads((tmp_path / "shared" / "results.json").read_text())
    assert [r["domain"] for r in results["domains"]] == ["gaussian_noise-5", "fog-5"]
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["config.yaml", "results.csv", "results.json",
                                                                       "table.md"]


@pytest.mark.realdata
def test_a_run_killed_with_sigkill_leaves_a_lock_the_next_run_takes_over(data_dir, tmp_path):
    killed = tta_run(tmp_path, data_dir)
    wait_for_lock(tmp_path / "shared" / LOCK_NAME, killed)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (tmp_path / "shared" / LOCK_NAME).exists()
    rerun = tta_run(tmp_path, data_dir)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"took over the lock on {tmp_path / 'shared'} from pid {killed.pid}" in err
    assert "| source |" in out and not (tmp_path / "shared" / LOCK_NAME).exists()


def test_file_systems_without_hard_links_fall_back_to_exclusive_create(tmp_path, monkeypatch):
    def no_link(src, dst):
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(lock_mod.os, "link", no_link)
    with FolderLock(tmp_path) as lk:
        assert json.loads(lk.path.read_text())["token"] == lk.token
        assert isinstance(held_elsewhere(tmp_path), LockHeld)
    assert not (tmp_path / LOCK_NAME).exists() and list(tmp_path.iterdir()) == []
