"""The CGI's side of the spool: write one grant request and wait for its result.

Before the request is written the CGI installs its doorbell (see
:mod:`webknock.doorbell`), a FIFO that webknockd rings once the result is in place:
the CGI sleeps in poll(2) and wakes the moment the daemon has answered; no sleep loop,
and no library to load for it.
"""

from __future__ import annotations

import os

from webknock import doorbell
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

#: The daemon rang, but there is no result to read: a failure, never a success.
NO_RESULT = {"ok": False, "error": "result missing", "errorcode": "INTERNAL"}


def _read_result(path: str) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as fh:
            return parse_result(fh.read(4096))
    except FileNotFoundError:
        return None
    except (ValueError, OSError):  # the request went in: say it failed, never that it worked
        return {"ok": False, "error": "unreadable result", "errorcode": "INTERNAL"}


def submit_and_wait(
    cfg: ServerConfig,
    ip: Address,
    ports: list[tuple[str, int]],
    seconds: int,
    now: float,
    user_agent: str,
) -> dict[str, Any] | None:
    """Spool the request; return the daemon's result, or None on timeout.

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
    bell = doorbell.install(bell_path)
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
        doorbell.remove(bell_path, bell)


def _wait(bell: int, path: str, seconds: float) -> dict[str, Any] | None:
    """The result at `path` once the bell rings (or it is there already), None on timeout."""
    rang = doorbell.wait(bell, seconds)
    result = _read_result(path)  # also after a timeout: the bell is only the fast way
    if result is None and rang:
        return NO_RESULT
    return result
