"""How webknockd reads a request file of the spool: as untrusted input.

The web user writes these files, root reads them. :func:`read_request` checks the
file itself on the open descriptor (regular, not a link, one link, owner, size)
before :func:`parse_request` checks its frame (:func:`webknock.spool.request.encode_request`).
Nothing read here is believed: the packet is verified, the addresses are parsed and
checked against ``trusted_proxies`` by the daemon.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from webknock.protocol.transport import TransportError, check_v1_packet, check_v2_packet
from webknock.spool import (
    HEADER_LIMITS,
    HEADERS,
    ID_LENGTH,
    MAGIC,
    MAX_REQUEST_BYTES,
    REQUEST_SUFFIX,
)

REQUEST_ID = re.compile(f"[0-9a-f]{{{ID_LENGTH}}}")
PROTOCOLS = ("v1", "v2")


class SpoolError(ValueError):
    """A spool file is not a valid request; the message says why."""


@dataclass(frozen=True)
class SpooledRequest:
    """A request as the CGI relayed it: nothing here is verified yet."""

    id: str
    protocol: str  # "v1" or "v2": which form field carried the packet
    remote: str  # REMOTE_ADDR as the web server gave it
    forwarded: str  # X-Forwarded-For, believed only from trusted proxies
    agent: str  # User-Agent, for the audit trail only
    packet: bytes
    arrived: float  # when the file last changed (ctime: the web user cannot set it back)


def request_name_id(name: str) -> str | None:
    """The request id of a spool file name ``<id>.req``, or None."""
    stem = name[: -len(REQUEST_SUFFIX)] if name.endswith(REQUEST_SUFFIX) else ""
    return stem if REQUEST_ID.fullmatch(stem) else None


def parse_request(request_id: str, data: bytes, arrived: float = 0.0) -> SpooledRequest:
    """Check the frame of a request file (raises SpoolError)."""
    if not data.startswith(MAGIC):
        raise SpoolError("not a request frame of this version")
    rest = data[len(MAGIC) :]
    values: list[str] = []
    for name in HEADERS:
        line, sep, rest = rest.partition(b"\n")
        key, eq, value = line.partition(b"=")
        if not sep or not eq or key != name.encode():
            raise SpoolError(f"header {name!r} missing or out of order")
        if len(value) > HEADER_LIMITS[name] or any(c < 0x20 or c > 0x7E for c in value):
            raise SpoolError(f"header {name!r} is too long or not printable ASCII")
        values.append(value.decode("ascii"))
    if not rest.startswith(b"\n"):
        raise SpoolError("no empty line after the headers")
    packet = rest[1:]
    protocol = values[0]
    if protocol not in PROTOCOLS:
        raise SpoolError(f"unknown protocol {protocol!r}")
    try:
        (check_v1_packet if protocol == "v1" else check_v2_packet)(packet)
    except TransportError as exc:
        raise SpoolError(str(exc)) from None
    return SpooledRequest(request_id, protocol, values[1], values[2], values[3], packet, arrived)


def read_request(path: str | Path, *, allowed_uids: frozenset[int]) -> SpooledRequest:
    """Open and check one spool file as untrusted input (raises SpoolError)."""
    name = os.path.basename(path)
    request_id = request_name_id(name)
    if request_id is None:
        raise SpoolError(f"bad file name {name[:80]!r}")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        raise SpoolError(f"cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)  # checks on the open file: no race between check and use
        if not stat.S_ISREG(st.st_mode):
            raise SpoolError("not a regular file")
        if st.st_nlink != 1:
            raise SpoolError(f"has {st.st_nlink} hard links")
        if st.st_uid not in allowed_uids:
            raise SpoolError(f"owned by uid {st.st_uid}, not the web user or root")
        if st.st_size > MAX_REQUEST_BYTES:
            raise SpoolError(f"{st.st_size} bytes exceeds {MAX_REQUEST_BYTES}")
        data = os.read(fd, MAX_REQUEST_BYTES + 1)
        if len(data) > MAX_REQUEST_BYTES:
            raise SpoolError("grew past the size limit while reading")
    finally:
        os.close(fd)
    return parse_request(request_id, data, st.st_ctime)
