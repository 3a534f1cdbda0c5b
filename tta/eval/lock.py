"""One writer per results folder: ``tta run`` and every ``tta table`` cell hold a lock on the folder they write.

Two processes writing the same checkpoint and result files corrupt each other (or crash on each other's
temporary files), and on a cluster two workers can be handed the same cell. The lock is a file,
``<folder>/lock.json``, that names its holder (pid, host, start time); it works on any shared file system
because it is created with ``os.link`` of a fully written temporary file (atomic, also on NFS), so a reader
never sees a half-written lock.

A lock left behind by a killed process (``kill -9``, a node that died) is taken over:

- same host: the holder's pid is no longer running, or it now belongs to another process (its start time
  in ``/proc`` differs from the one recorded: pids are reused);
- another host (we cannot see its processes): the holder refreshes the file's modification time every
  :data:`HEARTBEAT_S` seconds from a background thread, and a lock whose heartbeat is older than
  :data:`STALE_AFTER_S` seconds is stale. The margin is wide so that clock skew between hosts and a busy
  file server do not break a live lock.

A process that meets a live lock waits (``wait`` seconds, ``None`` for as long as the holder lives) and
then stops with :class:`LockHeld`, one message naming the holder. The same thread may take the same lock
again (re-entrant): a table cell holds its folder's lock while it checks for a finished result and then
calls the runner, which takes the lock too.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from ..errors import TTAError

LOCK_NAME = "lock.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0
BREAK_STALE_S = 60.0  # a takeover in progress (lock.json.break) older than this was itself interrupted
HOST = socket.gethostname()

_HELD: Dict[Tuple[str, int], list] = {}  # (folder, thread id) -> [lock, depth]: re-entrant per thread
_HELD_GUARD = threading.Lock()


class LockHeld(TTAError):
    """Another live process holds the results folder."""


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _proc_start(pid: int) -> Optional[int]:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the holder."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, owned by someone else
    return True


@dataclass
class Holder:
    pid: int
    host: str
    started: float
    token: str
    pid_start: Optional[int]
    heartbeat: float  # the lock file's modification time

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (f"pid {self.pid} on host {self.host} (since {since}, "
                f"last heartbeat {max(0.0, time.time() - self.heartbeat):.0f} s ago)")

    def stale_reason(self, stale_after: float) -> Optional[str]:
        """Why this holder is gone, or None while it may be alive."""
        if self.host == HOST:
            if not _pid_alive(self.pid):
                return "that process is no longer running"
            now_start = _proc_start(self.pid)
            if self.pid_start is not None and now_start is not None and now_start != self.pid_start:
                return "that pid now belongs to another process"
            return None
        age = time.time() - self.heartbeat
        return f"no heartbeat for {age:.0f} s (> {stale_after:.0f} s)" if age > stale_after else None


class FolderLock:
    """``with FolderLock(folder, wait=0): ...`` writes nothing else; see the module docstring."""

    def __init__(self, folder, wait: Optional[float] = 0.0, *, heartbeat: float = HEARTBEAT_S,
                 stale_after: float = STALE_AFTER_S, poll: float = 0.5, log: Callable[[str], None] = _stderr):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.wait, self.heartbeat, self.stale_after, self.poll, self.log = wait, heartbeat, stale_after, poll, log
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._key = (str(self.folder.resolve()), threading.get_ident())

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> "FolderLock":
        with _HELD_GUARD:
            if self._key in _HELD:
                _HELD[self._key][1] += 1
                return self
        deadline = None if self.wait is None else time.monotonic() + self.wait
        announced = False
        while not self._try_create():
            holder = self.read()
            if holder is None:
                continue  # released between our attempt and the read: try again
            reason = holder.stale_reason(self.stale_after)
            if reason:
                if self._break(holder):
                    self.log(f"tta: took over the lock on {self.folder} from {holder.describe()}: {reason}")
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise LockHeld(f"results folder {self.folder} is in use by {holder.describe()}. Wait for it to "
                               "finish, let this run wait for it with output.lock_wait=SECONDS, or delete "
                               f"{self.path} if that process is gone.")
            if not announced:
                self.log(f"tta: waiting for {self.folder}, in use by {holder.describe()}")
                announced = True
            time.sleep(self.poll if deadline is None else max(0.0, min(self.poll, deadline - time.monotonic())))
        with _HELD_GUARD:
            _HELD[self._key] = [self, 1]
        self._thread = threading.Thread(target=self._beat, name=f"tta-lock-heartbeat {self.folder}", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        with _HELD_GUARD:
            entry = _HELD.get(self._key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del _HELD[self._key]
            owner = entry[0]
        owner._stop.set()
        if owner._thread is not None:
            owner._thread.join()
        holder = owner.read()
        if holder is not None and holder.token == owner.token:
            owner.path.unlink(missing_ok=True)

    def read(self) -> Optional[Holder]:
        """The current holder, or None when there is no lock (or it vanished while being read)."""
        try:
            text, mtime = self.path.read_text(), self.path.stat().st_mtime
            raw = json.loads(text)
            return Holder(int(raw["pid"]), str(raw["host"]), float(raw["started"]), str(raw["token"]),
                          raw.get("pid_start"), mtime)
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            # not written by us (link() makes ours whole): a holder we cannot check, stale by its age only
            try:
                return Holder(-1, "unknown", 0.0, "", None, self.path.stat().st_mtime)
            except FileNotFoundError:
                return None

    def _try_create(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"pid": os.getpid(), "host": HOST, "started": time.time(), "token": self.token,
                           "pid_start": _proc_start(os.getpid())})
        tmp = self.folder / f"{LOCK_NAME}.{self.token}.tmp"
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create (a reader may briefly see it empty)
            return self._create_exclusive(text)
        finally:
            tmp.unlink(missing_ok=True)

    def _create_exclusive(self, text: str) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def _break(self, stale: Holder) -> bool:
        """Remove ``stale``'s lock if it is still the one there; a second mutex keeps two breakers apart."""
        guard = self.folder / f"{LOCK_NAME}.break"
        try:
            fd = os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                if time.time() - guard.stat().st_mtime > BREAK_STALE_S:
                    guard.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            time.sleep(0.05)
            return False
        os.close(fd)
        try:
            current = self.read()
            if current is None or current.token != stale.token:
                return False
            self.path.unlink(missing_ok=True)
            return True
        finally:
            guard.unlink(missing_ok=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            holder = self.read()
            if holder is None or holder.token != self.token:
                self.log(f"tta: the lock on {self.folder} was taken over by another process")
                return
            try:
                os.utime(self.path)
            except OSError:
                pass
