"""The CGI as the web server runs it: a process with CGI variables and a body on stdin."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, write_instance
from tests.fakes import MemoryFirewall
from webknock.config import load
from webknock.daemon import Daemon
from webknock.engine import GrantEngine
from webknock.events import EventBus
from webknock.protocol import messages, transport, v1
from webknock.spooldirs import WebIdentity, prepare_spool
from webknock.state import StateStore

WEB = pwd.getpwnam("www-data")


class Cgi:
    def __init__(self, config: Path, keys: v1.Keys) -> None:
        self.config, self.keys = config, keys

    def call(
        self,
        body: bytes = b"",
        method: str = "POST",
        remote: str = "192.0.2.10",
        length: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes]:
        env = {
            "PATH": "/usr/bin:/bin",
            "REQUEST_METHOD": method,
            "CONTENT_LENGTH": str(len(body)) if length is None else length,
            "REMOTE_ADDR": remote,
            "WEBKNOCK_CONFIG": str(self.config),
            "PYTHONPATH": str(REPO),
            **(extra or {}),
        }
        proc = subprocess.run(
            [sys.executable, "-c", "from webknock.cgi import main; main()"],
            input=body,
            capture_output=True,
            env=env,
            timeout=30,
            check=True,
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        assert b"Traceback" not in proc.stdout
        return int(headers["Status"].split()[0]), headers, payload

    def packet(self, obj: dict[str, Any]) -> bytes:
        obj = {**obj, "nonce": os.urandom(8).hex()}  # identical content would be a replay
        return b"data=" + transport.encode_field(v1.encode(self.keys, messages.dumps(obj))).encode()

    def ask(self, obj: dict[str, Any], **kw: Any) -> tuple[int, dict[str, Any] | None]:
        status, _headers, body = self.call(self.packet(obj), **kw)
        return status, json.loads(v1.decode(self.keys, body)) if status == 200 else None


@pytest.fixture
def cgi(tmp_path: Path, vector_keys: v1.Keys) -> Cgi:
    config = write_instance(tmp_path, vector_keys, result_timeout="1")
    prepare_spool(load(config).spool, WEB.pw_gid)
    return Cgi(config, vector_keys)


@pytest.fixture
def daemon(cgi: Cgi) -> Iterator[MemoryFirewall]:
    cfg = load(cgi.config)
    fw = MemoryFirewall()
    d = Daemon(
        cfg,
        GrantEngine(cfg.instance, StateStore(cfg.state_file), fw, EventBus()),
        WebIdentity("www-data", WEB.pw_uid, WEB.pw_gid),
    )
    thread = threading.Thread(target=d.run)
    thread.start()
    yield fw
    d.stopping = True
    thread.join(5)


def now() -> int:
    return int(time.time())


def openports(
    ip: str = "192.0.2.10", ports: list[tuple[str, int]] | None = None, time: int = 60
) -> dict[str, Any]:
    """An openports request as the original client builds it."""
    wanted = ports or [("tcp", 22)]
    return {
        "api": "openports",
        "ip": ip,
        "time": time,
        "ver": 1,
        "ts": now(),
        "ports": [{"proto": p.upper(), "num": n} for p, n in wanted],
    }


def test_vector_packets_reach_the_timestamp_check(cgi: Cgi, vectors: dict[str, Any]) -> None:
    """The original client's packets decode; their 2025 timestamp is refused as stale."""
    for case in vectors["cases"]:
        if '"api"' not in case["plaintext"]:
            continue
        status, headers, _ = cgi.call(b"data=" + case["post_data"].encode())
        assert status == 403
        assert "clock skew" in headers["X-Webknock-Error"]


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({"method": "GET"}, 400),
        ({"length": ""}, 400),
        ({"length": "99999"}, 413),
        ({"body": b"nodata=1"}, 400),
        ({"body": b"data="}, 403),
        ({"body": b"data=" + b"A" * 683}, 403),  # right length, not a valid packet
        ({"body": b"data=!!!"}, 403),
    ],
)
def test_junk_gets_bare_status(cgi: Cgi, kw: dict[str, Any], status: int) -> None:
    got, headers, body = cgi.call(**kw)
    assert got == status and body == b"" and headers["Content-Length"] == "0"


def test_getinfo_answers_from_config(cgi: Cgi) -> None:
    status, reply = cgi.ask({"api": "getinfo", "ver": 1, "ts": now()}, remote="::ffff:192.0.2.10")
    assert status == 200
    assert reply == {
        "success": True,
        "tcp": [22, 2222],
        "udp": [51820],
        "maxtime": 3600,
        "ip": "192.0.2.10",
    }


def test_wrong_version_and_api(cgi: Cgi) -> None:
    assert cgi.ask({"api": "getinfo", "ver": 2, "ts": now()})[0] == 405
    assert cgi.ask({"api": "shell", "ver": 1, "ts": now()})[0] == 405


def test_replay_refused_even_with_altered_padding(cgi: Cgi) -> None:
    body = cgi.packet({"api": "getinfo", "ver": 1, "ts": now()})
    assert cgi.call(body)[0] == 200
    assert cgi.call(body)[0] == 403
    packet = bytearray(transport.decode_field(body[5:]))
    packet[-1] ^= 0xFF  # unauthenticated tail: decodes to the same request
    assert cgi.call(b"data=" + transport.encode_field(bytes(packet)).encode())[0] == 403


def test_openports_ip_mismatch(cgi: Cgi) -> None:
    req = openports(ip="192.0.2.99")
    status, headers, _ = cgi.call(cgi.packet(req))
    assert status == 403 and "address mismatch" in headers["X-Webknock-Error"]


def test_openports_without_daemon_is_504_and_withdrawn(cgi: Cgi) -> None:
    req = openports()
    assert cgi.ask(req)[0] == 504
    assert os.listdir(load(cgi.config).spool.requests) == []  # nothing left to apply later


def test_openports_through_daemon(cgi: Cgi, daemon: MemoryFirewall) -> None:
    req = openports(ports=[("tcp", 22), ("tcp", 23), ("udp", 51820)], time=99999)
    status, reply = cgi.ask(req)
    assert status == 200 and reply is not None and reply["success"] is True
    assert abs(reply["expires"] - (now() + 3600)) <= 2  # capped at max_time
    assert sorted((k.proto, k.port) for k in daemon.held) == [("tcp", 22), ("udp", 51820)]


def test_openports_nothing_offered(cgi: Cgi) -> None:
    req = openports(ports=[("tcp", 23)])
    status, reply = cgi.ask(req)
    assert status == 200 and reply == {
        "success": False,
        "error": "none of the requested ports is offered",
        "errorcode": "NOPORTS",
    }


def test_daemon_failure_is_not_success(cgi: Cgi, daemon: MemoryFirewall) -> None:
    daemon.fail_apply = daemon.fail_sync = True
    req = openports()
    status, reply = cgi.ask(req)
    assert status == 200 and reply is not None
    assert reply["success"] is False and reply["errorcode"] == "FIREWALL"


def test_bad_config_is_500_without_detail(tmp_path: Path, vector_keys: v1.Keys) -> None:
    config = write_instance(tmp_path, vector_keys, max_time="forever")
    c = Cgi(config, vector_keys)
    status, _, body = c.call(c.packet({"api": "getinfo", "ver": 1, "ts": now()}))
    assert status == 500 and body == b""


def test_throttle_after_repeated_bad_packets(tmp_path: Path, vector_keys: v1.Keys) -> None:
    config = write_instance(tmp_path, vector_keys, throttle_failures="3")
    prepare_spool(load(config).spool, WEB.pw_gid)
    c = Cgi(config, vector_keys)
    wrong = Cgi(config, v1.Keys.generate())
    bad = wrong.packet({"api": "getinfo", "ver": 1, "ts": now()})
    assert [c.call(bad)[0] for _ in range(4)] == [403, 403, 403, 429]
    assert c.ask({"api": "getinfo", "ver": 1, "ts": now()}, remote="192.0.2.11")[0] == 200


def test_trusted_proxy_forwarded_for(tmp_path: Path, vector_keys: v1.Keys) -> None:
    config = write_instance(tmp_path, vector_keys, trusted_proxies="192.0.2.1")
    prepare_spool(load(config).spool, WEB.pw_gid)
    c = Cgi(config, vector_keys)
    xff = {"HTTP_X_FORWARDED_FOR": "203.0.113.5, 2001:db8::77"}
    _, reply = c.ask({"api": "getinfo", "ver": 1, "ts": now()}, remote="192.0.2.1", extra=xff)
    assert reply is not None and reply["ip"] == "2001:db8::77"
    _, reply = c.ask({"api": "getinfo", "ver": 1, "ts": now()}, remote="192.0.2.9", extra=xff)
    assert reply is not None and reply["ip"] == "192.0.2.9"  # untrusted peer: header ignored
