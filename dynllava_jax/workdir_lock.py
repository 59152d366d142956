"""One training job per workdir: `WORKDIR/.lock`, held by the job while it runs.

The lock belongs to the job, not to a host: process 0 takes it and tells the others
(a multi-host job's hosts all use the same workdir); a second job is refused on every
host with a message naming the holder. The file holds JSON: a job id, the host and pid
of process 0, the start time and a heartbeat that a background thread refreshes every
`heartbeat_s` seconds while the job lives.

A lock left by a killed job (kill -9, a lost machine) must not block forever. It is
stale, and taken over with a warning, when
  * its host is this host and its pid is not a running process, or
  * its heartbeat is older than `stale_after_s` (the job's host is gone or hung).
On a bucket there is no exclusive create: the lock is written, read back and checked to
be ours (two jobs starting within the same second can still race; do not do that).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional

from . import paths

log = logging.getLogger("dynllava_jax.workdir_lock")
LOCK_NAME = ".lock"


class WorkdirLocked(ValueError):
    pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


class WorkdirLock:
    def __init__(self, workdir, stale_after_s: float = 600.0,
                 heartbeat_s: Optional[float] = None):
        self.path = paths.as_path(workdir) / LOCK_NAME
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = float(heartbeat_s or max(self.stale_after_s / 10, 1.0))
        self.job = uuid.uuid4().hex
        self.held = False
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # -- the file ------------------------------------------------------------------------
    def _record(self, started: float) -> dict:
        return {"job": self.job, "host": socket.gethostname(), "pid": os.getpid(),
                "started": started, "heartbeat": time.time()}

    def _write(self, rec: dict, exclusive: bool = False) -> None:
        text = json.dumps(rec) + "\n"
        if paths.is_url(self.path):
            self.path.write_text(text)
            return
        if exclusive:  # O_EXCL: of two jobs creating it at once, one fails here
            fd = os.open(os.fspath(self.path), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(text)
            return
        tmp = self.path.parent / f"{LOCK_NAME}.{self.job}"
        tmp.write_text(text)
        os.replace(os.fspath(tmp), os.fspath(self.path))  # readers never see half a file

    def read(self) -> Optional[dict]:
        try:
            rec = json.loads(self.path.read_text())
            return rec if isinstance(rec, dict) else {}
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # torn or unreadable: judged by its age below

    def _stale_reason(self, rec: dict) -> Optional[str]:
        if rec.get("host") == socket.gethostname() and isinstance(rec.get("pid"), int):
            if not _pid_alive(rec["pid"]):
                return f"its process {rec['pid']} on this host is gone"
        beat = rec.get("heartbeat")
        if not isinstance(beat, (int, float)):
            try:
                beat = self.path.stat().mtime
            except OSError:
                beat = 0.0
        age = time.time() - float(beat)
        if age > self.stale_after_s:
            return f"no heartbeat for {age:.0f} s (> {self.stale_after_s:.0f} s)"
        return None

    # -- acquire / release ---------------------------------------------------------------
    def _acquire_here(self) -> None:
        rec = self.read()
        if rec is not None:
            why = self._stale_reason(rec)
            if why is None:
                age = time.time() - float(rec.get("heartbeat", time.time()))
                raise WorkdirLocked(
                    f"{self.path.parent} is in use by another training run (pid "
                    f"{rec.get('pid')} on host {rec.get('host')}, heartbeat {age:.0f} s ago); "
                    f"wait for it to finish, or if it is dead delete {self.path} (a lock "
                    f"without a heartbeat for {self.stale_after_s:.0f} s is taken over)")
            log.warning("taking over the stale lock %s (pid %s on host %s): %s", self.path,
                        rec.get("pid"), rec.get("host"), why)
            self.path.unlink()
        started = time.time()
        try:
            self._write(self._record(started), exclusive=True)
        except FileExistsError:
            raise WorkdirLocked(f"{self.path.parent} was locked by another training run "
                                "starting at the same moment") from None
        if paths.is_url(self.path):
            time.sleep(1.0)  # let a racing writer's object land, then check it is ours
        if (self.read() or {}).get("job") != self.job:
            raise WorkdirLocked(f"{self.path.parent} was locked by another training run "
                                "starting at the same moment")
        self.held = True
        self._started = started
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()

    def acquire(self) -> "WorkdirLock":
        """Process 0 takes the lock; every host raises `WorkdirLocked` if it could not."""
        import jax
        err = None
        if jax.process_index() == 0:
            try:
                self._acquire_here()
            except WorkdirLocked as e:
                err = e
        if jax.process_count() > 1:
            import numpy as np
            from jax.experimental import multihost_utils
            ok = int(np.asarray(multihost_utils.broadcast_one_to_all(np.int32(err is None))))
            if not ok and err is None:
                err = WorkdirLocked(f"{self.path.parent} is in use by another training run "
                                    "(see process 0's error)")
        if err is not None:
            raise err
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if (self.read() or {}).get("job") != self.job:
                    log.error("%s is no longer ours (taken over as stale?)", self.path)
                    return
                self._write(self._record(self._started))
            except OSError as e:  # a storage hiccup: try again at the next beat
                log.warning("could not refresh %s: %s", self.path, e)

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        try:
            if (self.read() or {}).get("job") == self.job:
                self.path.unlink()
        except OSError as e:
            log.warning("could not remove %s: %s", self.path, e)
        self.held = False
