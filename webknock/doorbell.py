"""A doorbell per waiting CGI: a FIFO in the spool's ``waits/`` that webknockd rings once
the CGI's result is in ``results/``.

The CGI makes the FIFO and opens its read end *before* it spools the request, then
sleeps in poll(2) until the daemon opens the write end, writes a byte and closes it, or
until its timeout. Nothing can be missed (the bell exists before the request does), and
waiting costs the CGI a few system calls and no import: loading an inotify library
takes milliseconds, as long as the daemon takes to answer.

Root touches the web user's FIFO with care: it opens it non-blocking (no reader: ENXIO
at once), without following a link, and writes its byte only into a FIFO that the web
user owns; anything else planted under the name is left alone (and pruned).
"""

from __future__ import annotations

import os
import select
import stat

#: What the daemon writes; the CGI never reads it, the wake-up is the message.
RING = b"\n"


def install(path: str) -> int:
    """(CGI) Create the FIFO and open its read end; return the descriptor.

    Raises OSError (no ``waits/``, full disk, no descriptor left); then nothing is left.
    """
    os.mkfifo(path, 0o600)
    try:
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except BaseException:
        remove(path, -1)
        raise


def wait(fd: int, seconds: float) -> bool:
    """(CGI) Sleep until the bell rings or `seconds` pass; True when it rang."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(max(1, int(seconds * 1000))))


def remove(path: str, fd: int) -> None:
    """(CGI) Close and delete the bell; never fails."""
    if fd >= 0:
        os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        pass


def ring(path: str, owner: int) -> bool:
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
