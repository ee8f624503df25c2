"""The spool as the CGI (web user) writes it, for webknockd (root) to read.

Layout under ``spool_dir`` (on tmpfs, e.g. ``/run/webknock/<instance>``)::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the result)
    rejected/  root:root     0700  invalid requests moved aside for the admin
    seen/      root:WEBGROUP 1730  replay marks and bad-packet counters (below)
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO), through which the daemon
                                   hands it the result (:mod:`webknock.doorbell`)

This module is everything the CGI puts there: the replay marks and the throttle's
counters of every packet it opens, and for an openports the request and its doorbell
(:func:`submit`). It is one module because the CGI pays for each module it loads
(0.1-0.3 ms each, per request) and an openports should add no module before its request
is on its way: this one is already loaded for the replay mark. The way back,
:mod:`webknock.doorbell`, is loaded once the request is written, while webknockd works
on it. It imports nothing the CGI does not already have by then. A request file is
untrusted input to root: :mod:`webknock.spool_reader` checks the file itself (regular,
not a link, one link, owner, size) before its content.

Replay marks and counters, in ``seen/``:

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

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from pathlib import Path
    from types import TracebackType
    from typing import Any

    from webknock.addresses import Address
    from webknock.config import ServerConfig

REPLAY_PREFIX = "r-"
FAIL_PREFIX = "f-"
MAX_REQUEST_BYTES = 8192
REQUEST_SUFFIX = ".req"
MAX_UA = 200
#: The doorbell's mode: the web user's, and writable by "others" for root alone. webknockd
#: runs without CAP_DAC_OVERRIDE (the unit's bounding set), so root may write only where
#: the mode lets anyone; and nobody but root and the web group can reach the bell: the
#: spool is 0750 root:WEBGROUP and waits/ 1730.
BELL_MODE = 0o602


# -- replay marks and the bad-packet throttle ---------------------------------------------


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


def _fail_name(addr: Address) -> str:
    plain = ipaddress.ip_address(addr.packed)  # drops any IPv6 scope (``%eth0``)
    return FAIL_PREFIX + str(plain).replace(":", "_")


class Throttle:
    """Counts bad packets per address inside a sliding-ish window (restart when stale)."""

    def __init__(self, seen_dir: Path, limit: int, window: int) -> None:
        self.seen_dir, self.limit, self.window = seen_dir, limit, window

    def blocked(self, addr: Address, now: float) -> bool:
        try:
            st = os.stat(self.seen_dir / _fail_name(addr), follow_symlinks=False)
        except OSError:
            return False
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size >= self.limit
            and now - st.st_mtime < self.window
        )

    def failed(self, addr: Address, now: float) -> None:
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


# -- the request --------------------------------------------------------------------------


def new_request_id() -> str:
    return os.urandom(16).hex()


def encode_request(
    ip: Address, ports: list[tuple[str, int]], time: int, received: float, user_agent: str = ""
) -> bytes:
    import json  # loaded by then on the CGI's path; a throttled request (429) never needs it

    return json.dumps(
        {
            "v": 1,
            "ip": str(ip),
            "ports": [[p, n] for p, n in ports],
            "time": time,
            "received": received,
            "ua": user_agent[:MAX_UA],
        },
        separators=(",", ":"),
    ).encode()


def write_request(requests_dir: str | Path, request_id: str, payload: bytes) -> str:
    """Write the request atomically with mode 0640; return its path.

    A dot temp file (which the daemon skips) is renamed into place once whole: the
    rename is what wakes the daemon. Raises OSError (full disk, read-only spool) and then
    leaves nothing behind. Not fsynced: after a crash the CGI, which waits for the
    result, has answered 504 anyway. (Not :func:`webknock.fsutil.write_atomic`: one
    module less to import on the CGI's path, and none of its fsync or chown.)
    """
    final = os.path.join(requests_dir, f"{request_id}{REQUEST_SUFFIX}")
    tmp = os.path.join(requests_dir, f".{request_id}.tmp")  # the id is random: O_EXCL holds
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        try:
            os.fchmod(fd, 0o640)  # whatever the web server's umask
            view = memoryview(payload)
            while view:
                view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


# -- the doorbell -------------------------------------------------------------------------


def install_bell(path: str) -> int:
    """(CGI) Create the FIFO and open its read end; return the descriptor.

    Raises OSError (no ``waits/``, full disk, no descriptor left); then nothing is left.
    """
    os.mkfifo(path, 0o600)
    fd = -1
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        os.fchmod(fd, BELL_MODE)  # after the umask, which would take the o+w away
    except BaseException:
        remove_bell(path, fd)
        raise
    return fd


def remove_bell(path: str, fd: int) -> None:
    """(CGI) Close and delete the bell; never fails."""
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


# -- the CGI's side -----------------------------------------------------------------------


class Submitted:
    """(CGI) A request on its way to webknockd, with the doorbell its answer will ring.

    Between :func:`submit` and :meth:`result` the CGI may do other work (webknockd works
    on the request meanwhile); used as a context manager it removes the doorbell at the end.
    """

    def __init__(self, request_path: str, bell_path: str, bell: int) -> None:
        self.request_path, self.bell_path, self.bell = request_path, bell_path, bell

    def result(self, seconds: float) -> dict[str, Any] | None:
        """The daemon's result, or None when it did not come within `seconds`.

        None means the daemon did not answer in time. If the request could still be
        withdrawn it will never be applied; if the daemon had claimed it, we waited once
        more, and after that it may still be applied (the client is told 504, never
        success). Never raises for the spool: the request went in.
        """
        from webknock.doorbell import wait_bell  # loads while webknockd works (~0.3 ms)

        got = wait_bell(self.bell, seconds)
        if got is not None:
            return got
        try:  # withdraw: the daemon has not claimed it, so it will never apply it
            os.unlink(self.request_path)
        except FileNotFoundError:  # claimed: the daemon is working on it, give it more time
            return wait_bell(self.bell, seconds)
        except OSError:  # not withdrawn: it may still be applied, so never success
            return None
        return None

    def close(self) -> None:
        remove_bell(self.bell_path, self.bell)
        self.bell = -1

    def __enter__(self) -> Submitted:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def submit(
    cfg: ServerConfig,
    ip: Address,
    ports: list[tuple[str, int]],
    seconds: int,
    now: float,
    user_agent: str,
) -> Submitted:
    """(CGI) Install the doorbell, then spool the request (the rename wakes webknockd).

    Raises OSError when nothing was spooled (full disk, read-only spool, no doorbell):
    the caller answers an error, nothing is applied, nothing is left behind.
    """
    spool = cfg.spool
    request_id = new_request_id()
    bell_path = os.path.join(spool.waits, request_id)
    bell = install_bell(bell_path)
    try:
        request_path = write_request(
            spool.requests, request_id, encode_request(ip, ports, seconds, now, user_agent)
        )
    except BaseException:
        remove_bell(bell_path, bell)
        raise
    return Submitted(request_path, bell_path, bell)
