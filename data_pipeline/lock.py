"""`DirLock`: an advisory single-writer lock on a directory (DIR/.lock), for index builds and training
workdirs.

`fcntl.flock` on DIR/.lock, non-blocking by default. The kernel drops the lock when the holder's file
descriptor closes, which includes any death of the process (kill -9, OOM), so a stale lock can never
block the next run. The file holds the holder's pid and host only so that a refused second writer can say
who holds it; the lock itself is the flock, never the file's content or existence (the file is left in
place on release: deleting it would race with a concurrent opener).

Advisory: it stops other `DirLock` users, not arbitrary writers. On NFS, Linux maps flock to POSIX
locks, which work across hosts when the server supports locking; the host name in the message is there
for the cross-host case. A forked child inherits the open lock (it is the same open file description), so
a child that outlives the parent keeps holding it, as it should while it still writes.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import DataPipelineError

LOCK_NAME = ".lock"


class LockedError(DataPipelineError):
    """Another process holds the directory's lock."""


class DirLock:
    """Single-writer lock on `directory` (created if missing); `what` names its use in messages.

    with DirLock(out, what="token index output"):   # or lock.acquire() ... lock.release()
        ...

    acquire() raises LockedError naming the holder's pid and host unless `wait=True`, which blocks until
    the holder is gone. Not re-entrant: a second DirLock on the same directory in the same process is
    refused like any other holder."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory", *, wait: bool = False):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self.what, self.wait = what, wait
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> DirLock:
        if self._fd is not None:
            raise RuntimeError(f"{self.path}: already acquired by this DirLock")
        self.directory.mkdir(parents=True, exist_ok=True)
        # O_RDWR without O_TRUNC: the current holder's record must survive our open.
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if self.wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockedError(f"{self.directory} ({self.what}) is in use by {self._holder()}; "
                              f"wait for it or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "what": self.what,
                             "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode() + b"\n"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (idempotent). The record is cleared first, so nobody is named as a holder."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _holder(self) -> str:
        # The holder writes its record just after locking; give a fresh holder a moment to do so.
        for _ in range(20):
            try:
                info = json.loads(self.path.read_bytes() or b"null")
            except (OSError, ValueError):
                info = None
            if isinstance(info, dict) and "pid" in info:
                return f"pid {info['pid']} on host {info.get('host', '?')}"
            time.sleep(0.01)
        return f"another process (no holder recorded in {self.path})"

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"DirLock({str(self.directory)!r}, what={self.what!r}, held={self.held})"
