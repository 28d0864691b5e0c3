"""One run per folder: an exclusive OS file lock on RUN/.lock for the life of the run.

fcntl.flock is released by the kernel when the process dies however it dies (SIGKILL, OOM killer, a lost node),
so a killed run never leaves a stale lock, and a run.json that says "running" while nobody holds the lock
describes a run that was killed. The lock file holds the holder's pid, host and start time, for the refusal
message. On a filesystem without flock support (some network filesystems) the lock is skipped with a note.
Under torchrun only rank 0 takes it (one run is many processes).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

LOCK_NAME = ".lock"


class RunLocked(Exception):
    """The folder is held by a live run; the message names its pid and host."""


class RunLock:
    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd: int | None = None
        self.note: str | None = None

    def acquire(self) -> "RunLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            self.note = "run folder lock unavailable on this platform (no fcntl)"
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"
                   if holder else "another process")
            raise RunLocked(f"--out {str(self.path.parent)!r} is in use by a running run ({who}); wait for it "
                            "to end, or give another --out") from None
        except OSError as e:  # e.g. ENOLCK on a filesystem without locks
            os.close(fd)
            self.note = f"run folder lock unavailable on this filesystem ({e.strerror}): not locked"
            return self
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
