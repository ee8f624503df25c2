"""The spool: how the CGI (web user) hands grant requests to webknockd (root).

Layout under ``spool_dir`` (on tmpfs, e.g. ``/run/webknock/<instance>``)::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the result)
    results/   root:WEBGROUP 0750  daemon writes ``<id>.json`` (atomic); CGI only reads
    rejected/  root:root     0700  invalid requests moved aside for the admin
    seen/      root:WEBGROUP 1730  replay cache, one empty file per accepted packet MAC
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO) that the daemon rings
                                   once the result is written

This module is the format of both file kinds, the doorbell, and the CGI's side of it
(:func:`submit_and_wait`). It is on the path of every openports, so it is one module
that imports nothing the CGI does not already have (each import costs the CGI about
0.1-0.3 ms). A request file is untrusted input to root: :mod:`webknock.spool_reader`
checks the file itself (regular, not a link, one link, owner, size) before its content.

The doorbell: the CGI makes the FIFO and opens its read end *before* it spools the
request, then sleeps in poll(2) until the daemon opens the write end, writes a byte and
closes it, or until its timeout. Nothing can be missed (the bell exists before the
request does), and waiting costs a few system calls and no library (an inotify binding
takes milliseconds to load, as long as the daemon takes to answer). Root touches the
web user's FIFO with care: it opens it non-blocking (no reader: ENXIO at once), without
following a link, and writes its byte only into a FIFO that the web user owns; anything
else planted under the name is left alone (and pruned).
"""

from __future__ import annotations

import json
import os
import select
import stat

from webknock.fsutil import write_atomic

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from webknock.config import ServerConfig
    from webknock.grants import Address

MAX_REQUEST_BYTES = 8192
REQUEST_SUFFIX = ".req"
RESULT_SUFFIX = ".json"
MAX_UA = 200
#: What the daemon writes into a doorbell; the CGI never reads it, the wake-up is the message.
RING = b"\n"
#: The daemon rang, but there is no result to read: a failure, never a success.
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
    """Write the request atomically (dot temp file + rename) with mode 0640; return its path.

    Raises OSError (full disk, read-only spool) and then leaves nothing behind. Not fsynced:
    after a crash the CGI, which waits for the result, has answered 504 anyway.
    """
    final = os.path.join(requests_dir, f"{request_id}{REQUEST_SUFFIX}")
    write_atomic(final, payload, 0o640, fsync=False)
    return final


def result_payload(ok: bool, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "ok": ok, **fields}, separators=(",", ":")).encode()


def parse_result(data: bytes) -> dict[str, Any]:
    """Read a result file written by the daemon (trusted, but still checked for shape)."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("ok"), bool):
        raise ValueError("malformed result file")
    return obj


# -- the doorbell -------------------------------------------------------------------------


def install_bell(path: str) -> int:
    """(CGI) Create the FIFO and open its read end; return the descriptor.

    Raises OSError (no ``waits/``, full disk, no descriptor left); then nothing is left.
    """
    os.mkfifo(path, 0o600)
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        remove_bell(path, -1)
        raise


def wait_bell(fd: int, seconds: float) -> bool:
    """(CGI) Sleep until the bell rings or `seconds` pass; True when it rang."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(1, int(seconds * 1000))))


def remove_bell(path: str, fd: int) -> None:
    """(CGI) Close and delete the bell; never fails."""
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def ring_bell(path: str, owner: int) -> bool:
    """(daemon, root) Ring the bell at `path` if a CGI still waits there; True if it rang.

    Never blocks, never follows a link, writes only into a FIFO owned by uid `owner`.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:  # ENOENT no bell, ENXIO nobody listens any more, ELOOP a link
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISFIFO(st.st_mode) or st.st_uid != owner:
            return False
        os.write(fd, RING)
    except OSError:  # EAGAIN: the pipe is full, so it rang already
        return False
    finally:
        os.close(fd)
    return True


# -- the CGI's side -----------------------------------------------------------------------


def _read_result(path: str) -> dict[str, Any] | None:
    """The result at `path`, None when there is none yet (plain system calls: no file
    object to build on the path of every knock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError:
        return UNREADABLE
    try:
        return parse_result(os.read(fd, 4096))
    except (ValueError, OSError):  # the request went in: say it failed, never that it worked
        return UNREADABLE
    finally:
        os.close(fd)


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
    result_path = os.path.join(spool.results, f"{request_id}{RESULT_SUFFIX}")
    bell_path = os.path.join(spool.waits, request_id)
    bell = install_bell(bell_path)
    try:
        write_request(
            spool.requests, request_id, encode_request(ip, ports, seconds, now, user_agent)
        )
        result = _wait(bell, result_path, cfg.result_timeout)
        if result is not None:
            return result
        try:  # withdraw: the daemon has not claimed it, so it will never apply it
            os.unlink(os.path.join(spool.requests, f"{request_id}{REQUEST_SUFFIX}"))
        except FileNotFoundError:  # claimed: the daemon is working on it, give it more time
            return _wait(bell, result_path, cfg.result_timeout)
        return None
    finally:
        remove_bell(bell_path, bell)


def _wait(bell: int, path: str, seconds: float) -> dict[str, Any] | None:
    """The result at `path` once the bell rings (or it is there already), None on timeout."""
    rang = wait_bell(bell, seconds)
    result = _read_result(path)  # also after a timeout: the bell is only the fast way
    if result is None and rang:
        return NO_RESULT
    return result
