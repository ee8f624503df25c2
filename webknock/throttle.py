"""Replay cache and bad-packet throttle for the CGI, with no long-running process.

Both live in the spool's ``seen/`` directory (root-owned, sticky, writable by
the web group); webknockd prunes old entries.

* ``r-<mac>``: one empty file per accepted packet, created with O_EXCL. The key
  is the packet's HMAC, i.e. its authenticated content, so copies whose
  unauthenticated random bytes were altered are still recognised as replays.
* ``f-<address>``: a counter of bad packets (undecodable, or replayed) from one
  address, kept as the *size* of a sparse file (no data blocks: a flood from many
  addresses costs inodes, not disk space); it restarts when its last count is older
  than the window. The name is built from the address bytes (never from text a client
  sent), so it is short and made of hex digits, dots and underscores only.

webknockd removes ``r-`` marks after 2 x ts_window + 5 s, ``f-`` counters after
throttle_window + 5 s, and keeps at most MAX_THROTTLE_MARKS counters (oldest go first).
"""

from __future__ import annotations

import ipaddress
import os
import stat
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


def _fail_name(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    plain = ipaddress.ip_address(addr.packed)  # drops any IPv6 scope (``%eth0``)
    return FAIL_PREFIX + str(plain).replace(":", "_")


class Throttle:
    """Counts bad packets per address inside a sliding-ish window (restart when stale)."""

    def __init__(self, seen_dir: Path, limit: int, window: int) -> None:
        self.seen_dir, self.limit, self.window = seen_dir, limit, window

    def blocked(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, now: float) -> bool:
        try:
            st = os.stat(self.seen_dir / _fail_name(addr), follow_symlinks=False)
        except OSError:
            return False
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size >= self.limit
            and now - st.st_mtime < self.window
        )

    def failed(self, addr: ipaddress.IPv4Address | ipaddress.IPv6Address, now: float) -> None:
        """Count one bad packet (two CGIs racing may count one; the throttle is best effort)."""
        path = self.seen_dir / _fail_name(addr)
        flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, 0o640)
        except OSError:
            return  # throttling is best effort; never fail the request over it
        try:
            st = os.fstat(fd)
            count = st.st_size if now - st.st_mtime < self.window else 0
            if count <= self.limit:
                os.ftruncate(fd, count + 1)
                os.utime(fd, (now, now))  # the window restarts at the last counted failure
        except OSError:
            pass
        finally:
            os.close(fd)
