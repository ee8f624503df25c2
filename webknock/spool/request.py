"""The request as the CGI (web user) writes it into the spool, for webknockd (root) to read.

A request is a relay, not a decision: the raw packet as the client sent it, which form field
carried it, and what the web server said about the connection (REMOTE_ADDR, X-Forwarded-For,
User-Agent), in the frame :func:`encode_request` writes. webknockd decrypts and verifies the
packet, resolves the client address, keeps the replay cache and the throttle, and answers
with the HTTP status and body the CGI returns. Nothing in here is believed by root: the
reader (:mod:`webknock.spool.reader`) checks file and frame as untrusted input. The names
and limits are :mod:`webknock.spool`'s.

This module is on the CGI's path: it imports nothing beyond ``os``.
"""

from __future__ import annotations

import os

from webknock.spool import (
    BELL_MODE,
    HEADER_LIMITS,
    HEADERS,
    ID_LENGTH,
    MAGIC,
    REQUEST_SUFFIX,
    REQUESTS_DIR,
    TEMP_SUFFIX,
    WAITS_DIR,
)

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from types import TracebackType

_CLEAN = bytes(c if 0x20 <= c < 0x7F else 0x3F for c in range(256))


def header_value(text: str, limit: int) -> bytes:
    """`text` as one header value: printable ASCII (anything else becomes ``?``), cut to
    `limit` bytes."""
    return text[:limit].encode("ascii", "replace").translate(_CLEAN)


def encode_request(field: str, remote: str, forwarded: str, agent: str, packet: bytes) -> bytes:
    """The frame of one request: MAGIC, ``name=value`` header lines, an empty line, packet."""
    values = (field, remote, forwarded, agent)
    head = b"".join(
        name.encode() + b"=" + header_value(value, HEADER_LIMITS[name]) + b"\n"
        for name, value in zip(HEADERS, values, strict=True)
    )
    return MAGIC + head + b"\n" + packet


def new_request_id() -> str:
    return os.urandom(ID_LENGTH // 2).hex()


def write_request(requests_dir: str, request_id: str, payload: bytes) -> str:
    """Write the request atomically with mode 0640; return its path.

    A dot temp file (which the daemon skips) is renamed into place once whole: the
    rename is what wakes the daemon. Raises OSError (full spool, read-only) and then
    leaves nothing behind. Not fsynced: the spool is tmpfs, and after a crash the CGI,
    which waits for the answer, has answered 504 anyway.
    """
    final = os.path.join(requests_dir, f"{request_id}{REQUEST_SUFFIX}")
    tmp = os.path.join(requests_dir, f".{request_id}{TEMP_SUFFIX}")  # random id: O_EXCL holds
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

    Raises OSError (no ``waits/``, full spool, no descriptor left); then nothing is left.
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


class Submitted:
    """(CGI) A request on its way to webknockd, with the doorbell its answer will ring.

    Used as a context manager it removes the doorbell at the end.
    """

    def __init__(self, request_path: str, bell_path: str, bell: int) -> None:
        self.request_path, self.bell_path, self.bell = request_path, bell_path, bell

    def answer(self, seconds: float) -> tuple[int, str, bytes] | None:
        """webknockd's answer (status, note, body), or None when it did not come in time.

        None: if the request could still be withdrawn it will never be applied; if the
        daemon had claimed it, we waited once more, and after that it may still be applied
        (the client is told 504, never success). Never raises for the spool.
        """
        from webknock.spool.doorbell import wait_bell  # loads while webknockd works

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


def submit(spool_dir: str, frame: bytes) -> Submitted:
    """(CGI) Install the doorbell, then spool the request (the rename wakes webknockd).

    Raises OSError when nothing was spooled (full or read-only spool, no doorbell): the
    caller answers an error, nothing is applied, nothing is left behind.
    """
    request_id = new_request_id()
    bell_path = os.path.join(spool_dir, WAITS_DIR, request_id)
    bell = install_bell(bell_path)
    try:
        request_path = write_request(os.path.join(spool_dir, REQUESTS_DIR), request_id, frame)
    except BaseException:
        remove_bell(bell_path, bell)
        raise
    return Submitted(request_path, bell_path, bell)
