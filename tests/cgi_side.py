"""The CGI's part of the spool, for tests that play it: the doorbell first (owned by the web
user, as the CGI's is), then the request frame; the daemon's answer read from the bell."""

from __future__ import annotations

import os
import pwd
import time
from dataclasses import dataclass, field

from webknock.config import ServerConfig
from webknock.fsutil import write_atomic
from webknock.protocol import messages, v1
from webknock.spool import REQUEST_SUFFIX, doorbell
from webknock.spool import request as spool

WEB = pwd.getpwnam("www-data")

#: Bells of the running test, closed and removed after it (tests/conftest.py).
OPEN: list[Waiting] = []


@dataclass
class Waiting:
    """A request id with its doorbell open, as a CGI waits on it."""

    rid: str
    bell: str
    fd: int
    answer: tuple[int, str, bytes] | None = field(default=None, init=False)

    def result(self, seconds: float = 0.001) -> tuple[int, str, bytes] | None:
        """The daemon's answer (status, note, body), kept once read; None when none came
        within `seconds`."""
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


def openports_packet(
    keys: v1.Keys,
    ip: str = "192.0.2.10",
    ports: list[tuple[str, int]] | None = None,
    time_: int = 60,
    ts: float | None = None,
) -> bytes:
    """A v1 openports packet sealed with `keys`, as a client sends it."""
    data = messages.openports_request(
        ip, ports or [("tcp", 22)], time_, int(time.time() if ts is None else ts)
    )
    return v1.encode(keys, data)


def getinfo_packet(keys: v1.Keys, ts: float | None = None) -> bytes:
    return v1.encode(keys, messages.getinfo_request(int(time.time() if ts is None else ts)))


def frame(
    packet: bytes,
    remote: str = "192.0.2.10",
    *,
    protocol: str = "v1",
    forwarded: str = "",
    agent: str = "test-agent",
) -> bytes:
    """The spool frame a CGI writes for `packet` received from `remote`."""
    return spool.encode_request(protocol, remote, forwarded, agent, packet)


def submit(
    cfg: ServerConfig,
    keys: v1.Keys | None = None,
    ip: str = "192.0.2.10",
    ports: list[tuple[str, int]] | None = None,
    time_: int = 60,
    *,
    remote: str | None = None,
    payload: bytes | None = None,
) -> Waiting:
    """Spool a request as the CGI does: its bell, then the file (owned by the web user before
    it appears, as a running daemon may claim it at once). Without `payload`, an openports
    for `ip` sealed with `keys`, relayed from `remote` (default: `ip`)."""
    waiting = open_bell(cfg)
    if payload is None:
        if keys is None:
            raise ValueError("submit needs keys or a payload")
        payload = frame(openports_packet(keys, ip, ports, time_), remote or ip)
    path = cfg.spool.requests / f"{waiting.rid}{REQUEST_SUFFIX}"
    write_atomic(path, payload, 0o640, uid=WEB.pw_uid, gid=WEB.pw_gid, fsync=False)
    return waiting


def reply(keys: v1.Keys, answer: tuple[int, str, bytes] | None) -> dict[str, object]:
    """The JSON reply inside a 200 answer, opened with `keys`."""
    assert answer is not None, "no answer"
    status, note, body = answer
    assert status == 200, f"status {status} {note!r}"
    import json

    obj: dict[str, object] = json.loads(v1.decode(keys, body))
    return obj


def close_all() -> None:
    while OPEN:
        OPEN.pop().close()
