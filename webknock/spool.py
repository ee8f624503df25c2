"""The spool as the CGI (web user) writes it, for webknockd (root) to read.

Layout under ``spool_dir`` (its own size-bounded tmpfs, see :mod:`webknock.spooldirs`)::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the answer)
    rejected/  root:root     0700  invalid requests moved aside for the admin
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO), through which the daemon
                                   hands it the answer (:mod:`webknock.doorbell`)
    server.pub root:root     0644  the server's v2 public key, for the browser page

A request is a relay, not a decision: the raw packet as the client sent it, which form field
carried it, and what the web server said about the connection (REMOTE_ADDR, X-Forwarded-For,
User-Agent), in the frame :func:`encode_request` writes. webknockd decrypts and verifies the
packet, resolves the client address, keeps the replay cache and the throttle, and answers
with the HTTP status and body the CGI returns. Nothing in here is believed by root: the
reader (:mod:`webknock.spool_reader`) checks file and frame as untrusted input.

This module is on the CGI's path: it imports nothing beyond ``os``.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from types import TracebackType

#: First line of every request frame; the version changes with the frame's layout.
MAGIC = b"webknock-spool 2\n"
#: Header lines of a frame, in this order, then an empty line and the packet.
HEADERS = ("field", "remote", "forwarded", "agent")
#: Longest value the CGI writes (longer ones are cut) and the reader accepts per header.
HEADER_LIMITS = {"field": 8, "remote": 64, "forwarded": 1024, "agent": 200}
#: Form fields a packet may come in, and the protocol each carries.
FIELDS = {"data": "v1", "v2": "v2"}
MAX_PACKET_BYTES = 4096
MAX_REQUEST_BYTES = len(MAGIC) + sum(len(h) + 2 + n for h, n in HEADER_LIMITS.items()) + 1
MAX_REQUEST_BYTES += MAX_PACKET_BYTES
#: The spool's sub-directories (:class:`webknock.config.SpoolPaths` builds their paths).
REQUESTS_DIR, CLAIMED_DIR, REJECTED_DIR, WAITS_DIR = "requests", "claimed", "rejected", "waits"
#: The server's v2 public key text, published by webknockd (root, 0644) for the browser
#: page (:mod:`webknock.cgi` embeds it); absent while v2 is off.
SERVER_KEY_NAME = "server.pub"
REQUEST_SUFFIX = ".req"
TEMP_SUFFIX = ".tmp"
#: Request ids: 32 lowercase hex digits (16 random bytes).
ID_LENGTH = 32
#: The doorbell's mode: the web user's, and writable by "others" for root alone. webknockd
#: runs without CAP_DAC_OVERRIDE (the unit's bounding set), so root may write only where
#: the mode lets anyone; and nobody but root and the web group can reach the bell: the
#: spool is 0750 root:WEBGROUP and waits/ 1730.
BELL_MODE = 0o602

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
        from webknock.doorbell import wait_bell  # loads while webknockd works

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
