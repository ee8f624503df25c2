"""How webknockd reads a request file of the spool: as untrusted input.

The web user writes these files, root reads them. :func:`read_request` checks the
file itself on the open descriptor (regular, not a link, one link, owner, size)
before :func:`parse_request` checks its content (schema, address, ports, time).
The format is in :mod:`webknock.spool`.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from webknock.addresses import Address, grantable, parse_address
from webknock.spool import MAX_REQUEST_BYTES, MAX_UA, REQUEST_SUFFIX

REQUEST_ID = re.compile(r"[0-9a-f]{32}")


class SpoolError(ValueError):
    """A spool file is not a valid request; the message says why."""


@dataclass(frozen=True)
class GrantRequest:
    """A validated request from the CGI."""

    id: str
    ip: Address
    ports: tuple[tuple[str, int], ...]
    time: int
    received: float
    user_agent: str = ""


def parse_request(
    request_id: str, data: bytes, *, offered: frozenset[tuple[str, int]], max_time: int
) -> GrantRequest:
    """Validate the content of a request file (schema, address, ports, time)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):  # "[[[[..." nests too deep
        raise SpoolError("not JSON") from None
    if not isinstance(obj, dict) or obj.get("v") != 1:
        raise SpoolError("not a version-1 request object")
    expected = {"v", "ip", "ports", "time", "received", "ua"}
    if set(obj) - expected or not {"v", "ip", "ports", "time", "received"} <= set(obj):
        raise SpoolError(f"unexpected or missing fields: {sorted(set(obj) ^ expected)}")
    if not isinstance(obj["ip"], str) or "%" in obj["ip"]:
        raise SpoolError("ip is not a string without a scope")
    try:
        ip = parse_address(obj["ip"])
    except ValueError:
        raise SpoolError(f"ip {obj['ip'][:64]!r} is not an address") from None
    why = grantable(ip)
    if why:
        raise SpoolError(f"ip {ip}: {why}")
    raw_ports = obj["ports"]
    if not isinstance(raw_ports, list) or not 1 <= len(raw_ports) <= 256:
        raise SpoolError("ports is not a list of 1 to 256 entries")
    ports: list[tuple[str, int]] = []
    for item in raw_ports:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], int)
            or isinstance(item[1], bool)
        ):
            raise SpoolError(f"port entry {item!r:.40} is not [proto, number]")
        pair = (item[0], item[1])
        if pair not in offered:
            raise SpoolError(f"port {pair[0]!r:.12}/{pair[1]} is not offered")
        if pair not in ports:
            ports.append(pair)
    time = obj["time"]
    if not isinstance(time, int) or isinstance(time, bool) or not 1 <= time <= max_time:
        raise SpoolError(f"time {time!r:.20} is not 1..{max_time}")
    received = obj["received"]
    if (
        not isinstance(received, int | float)
        or isinstance(received, bool)
        or not math.isfinite(received)
    ):
        raise SpoolError("received is not a finite number")
    ua = obj.get("ua", "")
    if not isinstance(ua, str):
        raise SpoolError("ua is not a string")
    return GrantRequest(request_id, ip, tuple(ports), time, float(received), ua[:MAX_UA])


def read_request(
    path: str | Path,
    *,
    allowed_uids: frozenset[int],
    offered: frozenset[tuple[str, int]],
    max_time: int,
) -> GrantRequest:
    """Open and validate one spool file as untrusted input (raises SpoolError)."""
    name = os.path.basename(path)
    if not name.endswith(REQUEST_SUFFIX) or not REQUEST_ID.fullmatch(name[: -len(REQUEST_SUFFIX)]):
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
    return parse_request(name[: -len(REQUEST_SUFFIX)], data, offered=offered, max_time=max_time)
