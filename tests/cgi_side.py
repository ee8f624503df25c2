"""The CGI's part of the spool, for tests that play it: the doorbell first (owned by the web
user, as the CGI's is), then the request; the daemon's answer read from the bell."""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field
from typing import Any

from webknock import doorbell, spool
from webknock.addresses import parse_address
from webknock.config import ServerConfig
from webknock.fsutil import write_atomic

WEB = pwd.getpwnam("www-data")

#: Bells of the running test, closed and removed after it (tests/conftest.py).
OPEN: list[Waiting] = []


@dataclass
class Waiting:
    """A request id with its doorbell open, as a CGI waits on it."""

    rid: str
    bell: str
    fd: int
    answer: dict[str, Any] | None = field(default=None, init=False)

    def result(self, seconds: float = 0.001) -> dict[str, Any] | None:
        """The daemon's answer (kept once read), None when none came within `seconds`."""
        if self.answer is None:
            self.answer = doorbell.wait_bell(self.fd, seconds)
        return self.answer

    def close(self) -> None:
        if self.fd >= 0:
            spool.remove_bell(self.bell, self.fd)
            self.fd = -1


def open_bell(cfg: ServerConfig, rid: str | None = None) -> Waiting:
    """The CGI's doorbell for `rid` (a new id by default), owned by the web user."""
    rid = rid or spool.new_request_id()
    path = str(cfg.spool.waits / rid)
    fd = spool.install_bell(path)
    os.chown(path, WEB.pw_uid, WEB.pw_gid)
    waiting = Waiting(rid, path, fd)
    OPEN.append(waiting)
    return waiting


def submit(
    cfg: ServerConfig,
    ip: str = "192.0.2.10",
    ports: list[tuple[str, int]] | None = None,
    time_: int = 60,
    received: float | None = None,
    *,
    payload: bytes | None = None,
) -> Waiting:
    """Spool a request as the CGI does: its bell, then the file (owned by the web user before
    it appears, as a running daemon may claim it at once)."""
    waiting = open_bell(cfg)
    if payload is None:
        payload = spool.encode_request(
            parse_address(ip), ports or [("tcp", 22)], time_, received or time.time()
        )
    path = cfg.spool.requests / f"{waiting.rid}{spool.REQUEST_SUFFIX}"
    write_atomic(path, payload, 0o640, uid=WEB.pw_uid, gid=WEB.pw_gid, fsync=False)
    return waiting


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()
