"""The CGI's side of the spool: write one grant request and wait for its result.

The wait is an inotify watch on ``results/``, so the CGI wakes the moment the daemon
renames the result into place; no sleep loop. The watch is set up right *after* the
request is written: loading the inotify library takes about as long as the daemon
takes to answer, so the two overlap instead of adding up, and the first look at
``results/`` after the watch exists catches a result that was faster than that.
"""

from __future__ import annotations

import os
import time

from webknock.spool import (
    REQUEST_SUFFIX,
    RESULT_SUFFIX,
    encode_request,
    new_request_id,
    parse_result,
    write_request,
)

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from typing import Any

    from webknock.config import ServerConfig
    from webknock.grants import Address


class OutcomeUnknown(Exception):
    """The request is in the daemon's hands, but its result cannot be waited for."""


def _read_result(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            return parse_result(fh.read(4096))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # the request went in: say it failed, never that it worked
        return {"ok": False, "error": "unreadable result", "errorcode": "INTERNAL"}


def _withdraw(request: str) -> bool:
    """Take the request back; False when the daemon has claimed it already."""
    try:
        os.unlink(request)
    except FileNotFoundError:
        return False
    return True


#: inotify instances left to process exit (``linger``).
_LINGERING: list[Any] = []


def submit_and_wait(
    cfg: ServerConfig,
    ip: Address,
    ports: list[tuple[str, int]],
    seconds: int,
    now: float,
    user_agent: str,
    *,
    linger: bool = False,
) -> dict[str, Any] | None:
    """Spool the request; return the daemon's result, or None on timeout.

    Raises OSError when nothing was spooled or the request could be taken back (full
    disk, read-only spool, no inotify instance left): the caller answers an error and
    nothing is applied. Raises OutcomeUnknown when no watch could be set up but the
    daemon had already claimed the request: it may be applied, and we cannot wait.

    None means the daemon did not answer within ``result_timeout``. If the request
    could still be withdrawn it will never be applied; if the daemon had claimed it,
    we waited once more, and after that it may still be applied (the client is told
    504, never success).

    `linger` leaves the inotify instance open until the process exits: closing one waits
    for an RCU grace period in the kernel (several milliseconds on an idle host), which a
    CGI should spend after its answer is out, not before (see ``cgi.hang_up``).
    """
    spool = cfg.spool
    request_id = new_request_id()
    result_name = f"{request_id}{RESULT_SUFFIX}"
    result_path = os.path.join(spool.results, result_name)
    request_path = os.path.join(spool.requests, f"{request_id}{REQUEST_SUFFIX}")
    write_request(spool.requests, request_id, encode_request(ip, ports, seconds, now, user_agent))
    try:
        from webknock.inotify import INotify, flags

        inotify = INotify()
    except (OSError, ImportError) as exc:
        if _withdraw(request_path):
            raise OSError(f"cannot wait for the result: {exc}") from None
        raise OutcomeUnknown(f"claimed, but no watch for its result: {exc}") from None
    try:
        try:
            inotify.add_watch(spool.results, flags.MOVED_TO)  # results appear by rename only
        except OSError as exc:
            if _withdraw(request_path):
                raise
            raise OutcomeUnknown(f"claimed, but no watch for its result: {exc}") from None
        result = _wait(inotify, result_path, result_name, cfg.result_timeout)
        if result is not None:
            return result
        if _withdraw(request_path):  # the daemon has not claimed it: it will never apply it
            return None
        # claimed: the daemon is working on it, give it more time
        return _wait(inotify, result_path, result_name, cfg.result_timeout)
    finally:
        if linger:
            _LINGERING.append(inotify)
        else:
            inotify.close()


def _wait(inotify: Any, path: str, name: str, seconds: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + seconds
    while True:
        result = _read_result(path)
        if result is not None:
            return result
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        for event in inotify.read(timeout=max(1, int(left * 1000))):
            if event.name == name:
                break
