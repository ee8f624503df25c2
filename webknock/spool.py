"""The spool: how the CGI (web user) hands grant requests to webknockd (root).

Layout under ``spool_dir`` (on tmpfs, e.g. ``/run/webknock/<instance>``)::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the result)
    rejected/  root:root     0700  invalid requests moved aside for the admin
    seen/      root:WEBGROUP 1730  replay cache, one empty file per accepted packet MAC
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO), through which the daemon
                                   hands it the result

This module is the format of both messages, the doorbell, and the CGI's side of it
(:func:`submit_and_wait`). It is on the path of every openports, so it is one module
that imports nothing the CGI does not already have (each import costs the CGI about
0.1-0.3 ms). A request file is untrusted input to root: :mod:`webknock.spool_reader`
checks the file itself (regular, not a link, one link, owner, size) before its content.

The doorbell: the CGI makes the FIFO and opens its read end *before* it spools the
request, then sleeps in poll(2) until the daemon opens the write end, writes the result
in one write(2) and closes it, or until its timeout. Nothing can be missed (the bell
exists before the request does), the result arrives whole (a write of at most PIPE_BUF
bytes into a pipe is atomic), and waiting costs a few system calls and no library (an
inotify binding takes milliseconds to load, as long as the daemon takes to answer); no
result file is written, renamed, read and pruned. Root touches the web user's FIFO with
care: it opens it non-blocking (no reader: ENXIO at once), without following a link, and
writes only into a FIFO of one name that the web user (or root) made; anything else
planted under the name is left alone (and pruned). The FIFO is the web user's own (see
BELL_MODE): its processes could write into it, as they could answer the client in the
CGI's place; what root applies never depends on it.
"""

from __future__ import annotations

import json
import os
import select
import stat

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from webknock.addresses import Address
    from webknock.config import ServerConfig

MAX_REQUEST_BYTES = 8192
REQUEST_SUFFIX = ".req"
MAX_UA = 200
#: A result is written into the doorbell in one write(2), which only this size keeps whole.
MAX_RESULT_BYTES = select.PIPE_BUF
#: The doorbell's mode: the web user's, and writable by "others" for root alone. webknockd
#: runs without CAP_DAC_OVERRIDE (the unit's bounding set), so root may write only where
#: the mode lets anyone; and nobody but root and the web group can reach the bell: the
#: spool is 0750 root:WEBGROUP and waits/ 1730.
BELL_MODE = 0o602
#: The bell's write end was opened and closed with nothing written: never a success.
NO_RESULT = {"ok": False, "error": "result missing", "errorcode": "INTERNAL"}
#: A result that cannot be read or parsed: the request went in, so never a success.
UNREADABLE = {"ok": False, "error": "unreadable result", "errorcode": "INTERNAL"}


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


def result_payload(ok: bool, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "ok": ok, **fields}, separators=(",", ":")).encode()


def parse_result(data: bytes) -> dict[str, Any]:
    """Read a result the daemon wrote into a doorbell (checked for shape: the web user's
    processes can write there too)."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("ok"), bool):
        raise ValueError("malformed result")
    return obj


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


def wait_bell(fd: int, seconds: float) -> dict[str, Any] | None:
    """(CGI) Sleep until the daemon answers through the bell or `seconds` pass; return its
    result, None on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(max(1, int(seconds * 1000))):
        return None
    try:
        data = os.read(fd, MAX_RESULT_BYTES + 1)
    except OSError:  # the request went in: say it failed, never that it worked
        return UNREADABLE
    if not data:  # opened and closed, nothing written
        return NO_RESULT
    try:
        return parse_result(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError included; "[[[[..."
        return UNREADABLE


def remove_bell(path: str, fd: int) -> None:
    """(CGI) Close and delete the bell; never fails."""
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def deliver(path: str, owners: frozenset[int], payload: bytes) -> bool:
    """(daemon, root) Write `payload` (a result) into the bell at `path` if a CGI still waits
    there; True if it was delivered.

    Never blocks, never follows a link, writes only into a FIFO with one name that a uid of
    `owners` made (the web user's, or root's as the CGI's requests may be), and only a
    payload that one write(2) keeps whole (at most MAX_RESULT_BYTES).
    """
    if len(payload) > MAX_RESULT_BYTES:
        raise ValueError(f"a result of {len(payload)} bytes does not fit a doorbell")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:  # ENOENT no bell, ENXIO nobody listens any more, ELOOP a link
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid not in owners or st.st_nlink != 1:
            return False  # e.g. a hard link to some FIFO of root's: not a byte into it
        return os.write(fd, payload) == len(payload)
    except OSError:  # EAGAIN: the pipe is full (not by us), EPIPE: the reader just left
        return False
    finally:
        os.close(fd)


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
