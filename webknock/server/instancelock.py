"""The instance lock: one writer at a time across webknockd, the cron reaper and webknockctl.

It is filelock's native lock (``flock`` on ``<state file>.lock``, the lock a
``filelock.FileLock`` on that path takes too), held on a descriptor this process keeps
open between uses: taking and dropping it is two system calls, not a path walk and a
file opened and closed each time, which matters on the daemon's path of every knock.
A lock file deleted or replaced while we waited is noticed and the new one locked
instead. Re-entrant within the process (and safe across its threads).
"""

from __future__ import annotations

import os
import threading
import time

from filelock import lock_descriptor, unlock_descriptor

#: How often a waiter tries again while another process holds the lock.
POLL = 0.01


class LockTimeout(OSError):
    """Another process held the lock for longer than we wait."""


class InstanceLock:
    """An exclusive lock on the file at `path`, waiting at most `timeout` seconds."""

    def __init__(self, path: str, *, timeout: float = 30.0) -> None:
        self.path = path
        self.timeout = timeout
        self._fd = -1
        self._depth = 0
        self._mutex = threading.RLock()

    @property
    def held(self) -> bool:
        return self._depth > 0

    def acquire(self) -> None:
        """Take the lock (raises OSError, LockTimeout included, when it cannot be had)."""
        self._mutex.acquire()
        if self._depth:
            self._depth += 1
            return
        try:
            self._lock()
        except BaseException:
            self._mutex.release()
            raise
        self._depth = 1

    def release(self) -> None:
        if not self._depth:
            raise RuntimeError(f"{self.path}: released without being held")
        self._depth -= 1
        try:
            if not self._depth:
                unlock_descriptor(self._fd)
        finally:
            self._mutex.release()

    def close(self) -> None:
        """Drop the descriptor (after the last release)."""
        with self._mutex:
            if self._fd >= 0 and not self._depth:
                os.close(self._fd)
                self._fd = -1

    def _lock(self) -> None:
        deadline = time.monotonic() + self.timeout
        while True:
            if self._fd < 0:
                self._fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
            if lock_descriptor(self._fd, blocking=False):
                if self._is_current():
                    return
                unlock_descriptor(self._fd)  # we locked a file that is gone: lock the new one
                os.close(self._fd)
                self._fd = -1
                continue
            if time.monotonic() >= deadline:
                raise LockTimeout(f"held by another process for over {self.timeout:g} s")
            time.sleep(POLL)

    def _is_current(self) -> bool:
        """Is the file we hold still the one at the path?"""
        held = os.fstat(self._fd)
        try:
            now = os.stat(self.path, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino)
