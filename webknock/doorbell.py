"""The doorbell: how webknockd hands the CGI the result of its request.

The CGI makes the FIFO ``waits/<id>`` and opens its read end *before* it spools the
request (:func:`webknock.spool.install_bell`), then sleeps in poll(2) until the daemon
opens the write end, writes the result in one write(2) and closes it, or until its
timeout. Nothing can be missed (the bell exists before the request does), the result
arrives whole (a write of at most PIPE_BUF bytes into a pipe is atomic), and waiting
costs a few system calls and no library (an inotify binding takes milliseconds to load,
as long as the daemon takes to answer); no result file is written, renamed, read and
pruned. Root touches the web user's FIFO with care: it opens it non-blocking (no
reader: ENXIO at once), without following a link, and writes only into a FIFO of one
name that the web user (or root) made; anything else planted under the name is left
alone (and pruned). The FIFO is the web user's own (see ``spool.BELL_MODE``): its
processes could write into it, as they could answer the client in the CGI's place;
what root applies never depends on it.

The CGI imports this module only once its request is written, so it loads while the
daemon works; it imports nothing the CGI does not already have but `select`, which is
built into the interpreter.
"""

from __future__ import annotations

import json
import os
import select
import stat

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from typing import Any

#: A result is written into the doorbell in one write(2), which only this size keeps whole.
MAX_RESULT_BYTES = select.PIPE_BUF
#: The bell's write end was opened and closed with nothing written: never a success.
NO_RESULT = {"ok": False, "error": "result missing", "errorcode": "INTERNAL"}
#: A result that cannot be read or parsed: the request went in, so never a success.
UNREADABLE = {"ok": False, "error": "unreadable result", "errorcode": "INTERNAL"}


# -- the result ---------------------------------------------------------------------------


def result_payload(ok: bool, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "ok": ok, **fields}, separators=(",", ":")).encode()


def parse_result(data: bytes) -> dict[str, Any]:
    """Read a result the daemon wrote into a doorbell (checked for shape: the web user's
    processes can write there too)."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("ok"), bool):
        raise ValueError("malformed result")
    return obj


# -- the two ends -------------------------------------------------------------------------


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
