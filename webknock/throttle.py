"""Replay cache and bad-packet throttle for the CGI, with no long-running process.

Both live in the spool's ``seen/`` directory (root-owned, sticky, writable by
the web group); webknockd prunes old entries.

* ``r-<mac>``: one empty file per accepted packet, created with O_EXCL. The key
  is the packet's HMAC, i.e. its authenticated content, so copies whose
  unauthenticated random bytes were altered are still recognised as replays.
* ``f-<address>``: one byte appended per undecodable packet from an address;
  the file restarts when older than the window.
"""

from __future__ import annotations

import os
from pathlib import Path

REPLAY_PREFIX = "r-"
FAIL_PREFIX = "f-"


def first_use(seen_dir: Path, mac: bytes) -> bool:
    """Record the packet; False if it was seen before (a replay)."""
    path = seen_dir / f"{REPLAY_PREFIX}{mac.hex()}"
    try:
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640
        )
    except FileExistsError:
        return False
    os.close(fd)
    return True


def _fail_name(addr: object) -> str:
    return FAIL_PREFIX + str(addr).replace(":", "_")


class Throttle:
    """Counts bad packets per address inside a sliding-ish window (restart when stale)."""

    def __init__(self, seen_dir: Path, limit: int, window: int) -> None:
        self.seen_dir, self.limit, self.window = seen_dir, limit, window

    def blocked(self, addr: object, now: float) -> bool:
        try:
            st = os.stat(self.seen_dir / _fail_name(addr), follow_symlinks=False)
        except OSError:
            return False
        return st.st_size >= self.limit and now - st.st_mtime < self.window

    def failed(self, addr: object, now: float) -> None:
        path = self.seen_dir / _fail_name(addr)
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o640)
        except OSError:
            return  # throttling is best effort; never fail the request over it
        try:
            st = os.fstat(fd)
            if st.st_size and now - st.st_mtime >= self.window:
                os.ftruncate(fd, 0)
            if st.st_size <= self.limit:
                os.write(fd, b"x")
        finally:
            os.close(fd)
