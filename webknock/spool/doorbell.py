"""The doorbell: how webknockd hands the CGI its answer.

The CGI makes the FIFO ``waits/<id>`` and opens its read end *before* it spools the
request (:func:`webknock.spool.request.install_bell`), then sleeps in poll(2) until the daemon
opens the write end, writes the answer in one write(2) and closes it, or until its
timeout. Nothing can be missed (the bell exists before the request does), the answer
arrives whole (a write of at most PIPE_BUF bytes into a pipe is atomic), and waiting
costs a few system calls and no library.

An answer is what the CGI sends the client: ``b"<status> <note>\\n" + body``, where
status is an HTTP status, note a short printable ASCII text for the X-Webknock-Error
header (may be empty) and body the sealed reply packet (200) or nothing.

Root touches the web user's FIFO with care: it opens it non-blocking (no reader: ENXIO
at once), without following a link, and writes only into a FIFO of one name that the web
user (or root) made. The FIFO is the web user's own (see ``spool.BELL_MODE``): its
processes could write into it, as they could answer the client in the CGI's place; what
root applies never depends on it.

On the CGI's path: imports nothing but ``os`` and the built-in ``select``.
"""

from __future__ import annotations

import os
import select
import stat

#: An answer is written into the doorbell in one write(2), which only this size keeps whole.
MAX_ANSWER_BYTES = select.PIPE_BUF
MAX_NOTE = 300
#: Statuses an answer may carry (what the CGI knows how to say).
STATUSES = {
    200: "200 OK",
    400: "400 Bad Request",
    403: "403 Forbidden",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
    504: "504 Gateway Timeout",
}
#: The bell's write end was opened and closed with nothing written, or what came cannot
#: be read: the request went in, so never a success.
UNREADABLE = (500, "", b"")


def encode_answer(status: int, note: str = "", body: bytes = b"") -> bytes:
    """(daemon) One answer as it goes into the doorbell."""
    if status not in STATUSES:
        raise ValueError(f"status {status} cannot be answered")
    if body and status != 200:
        raise ValueError("only a 200 answer carries a body")
    clean = "".join(c if " " <= c < "\x7f" else "?" for c in note[:MAX_NOTE])
    payload = f"{status} {clean}\n".encode("ascii") + body
    if len(payload) > MAX_ANSWER_BYTES:
        raise ValueError(f"an answer of {len(payload)} bytes does not fit a doorbell")
    return payload


def parse_answer(data: bytes) -> tuple[int, str, bytes]:
    """(CGI) Read an answer (checked for shape: the web user's processes can write there
    too); an unreadable one is :data:`UNREADABLE`."""
    head, sep, body = data.partition(b"\n")
    code, _, note = head.partition(b" ")
    if not sep or len(code) != 3 or not code.isdigit() or int(code) not in STATUSES:
        return UNREADABLE
    if len(note) > MAX_NOTE or not note.isascii() or not note.decode().isprintable():
        return UNREADABLE
    if int(code) != 200 and body:
        return UNREADABLE
    return int(code), note.decode(), body


def wait_bell(fd: int, seconds: float) -> tuple[int, str, bytes] | None:
    """(CGI) Sleep until the daemon answers through the bell or `seconds` pass; return its
    answer, None on timeout."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    if not poller.poll(max(1, int(seconds * 1000))):
        return None
    try:
        data = os.read(fd, MAX_ANSWER_BYTES + 1)
    except OSError:  # the request went in: say it failed, never that it worked
        return UNREADABLE
    return parse_answer(data)


def deliver(path: str, owners: frozenset[int], payload: bytes) -> bool:
    """(daemon, root) Write `payload` (an answer) into the bell at `path` if a CGI still
    waits there; True if it was delivered.

    Never blocks, never follows a link, writes only into a FIFO with one name that a uid of
    `owners` made (the web user's, or root's), and only a payload that one write(2) keeps
    whole (at most MAX_ANSWER_BYTES).
    """
    if len(payload) > MAX_ANSWER_BYTES:
        raise ValueError(f"an answer of {len(payload)} bytes does not fit a doorbell")
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
