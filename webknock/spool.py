"""The spool: how the CGI (web user) hands grant requests to webknockd (root).

Layout under ``spool_dir`` (on tmpfs, e.g. ``/run/webknock/<instance>``)::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the result)
    rejected/  root:root     0700  invalid requests moved aside for the admin
    seen/      root:WEBGROUP 1730  replay cache, one empty file per accepted packet MAC
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO), through which the daemon
                                   hands it the result (:mod:`webknock.doorbell`)

This module is the request's way in: its format, the CGI's doorbell, and the CGI's side
(:func:`submit_and_wait`). It is what an openports adds to the CGI before its request is
on its way, so it imports nothing the CGI does not already have (each import costs the
CGI about 0.1-0.3 ms); the way back, :mod:`webknock.doorbell`, is imported once the
request is written, while webknockd works on it. A request file is untrusted input to
root: :mod:`webknock.spool_reader` checks the file itself (regular, not a link, one link,
owner, size) before its content.
"""

from __future__ import annotations

import json
import os

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from webknock.addresses import Address
    from webknock.config import ServerConfig

MAX_REQUEST_BYTES = 8192
REQUEST_SUFFIX = ".req"
MAX_UA = 200
#: The doorbell's mode: the web user's, and writable by "others" for root alone. webknockd
#: runs without CAP_DAC_OVERRIDE (the unit's bounding set), so root may write only where
#: the mode lets anyone; and nobody but root and the web group can reach the bell: the
#: spool is 0750 root:WEBGROUP and waits/ 1730.
BELL_MODE = 0o602


# -- the file formats ---------------------------------------------------------------------


def new_request_id() -> str:
    return os.urandom(16).hex()


def encode_request(
    ip: Address, ports: list[tuple[str, int]], time: int, received: float, user_agent: str = ""
) -> bytes:
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


def submit_and_wait(
    cfg: ServerConfig,
    ip: Address,
    ports: list[tuple[str, int]],
    seconds: int,
    now: float,
    user_agent: str,
) -> dict[str, Any] | None:
    """(CGI) Spool the request; return the daemon's result, or None on timeout.

    Raises OSError when nothing was spooled (full disk, read-only spool, no doorbell):
    the caller answers an error, nothing is applied.

    None means the daemon did not answer within ``result_timeout``. If the request
    could still be withdrawn it will never be applied; if the daemon had claimed it,
    we waited once more, and after that it may still be applied (the client is told
    504, never success).
    """
    spool = cfg.spool
    request_id = new_request_id()
    bell_path = os.path.join(spool.waits, request_id)
    bell = install_bell(bell_path)
    try:
        write_request(
            spool.requests, request_id, encode_request(ip, ports, seconds, now, user_agent)
        )
        # Only now: webknockd works on the request while this module loads (~0.3 ms).
        from webknock.doorbell import wait_bell

        result = wait_bell(bell, cfg.result_timeout)
        if result is not None:
            return result
        try:  # withdraw: the daemon has not claimed it, so it will never apply it
            os.unlink(os.path.join(spool.requests, f"{request_id}{REQUEST_SUFFIX}"))
        except FileNotFoundError:  # claimed: the daemon is working on it, give it more time
            return wait_bell(bell, cfg.result_timeout)
        return None
    finally:
        remove_bell(bell_path, bell)
