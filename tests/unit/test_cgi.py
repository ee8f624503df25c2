"""The CGI as the web server runs it: a process with CGI variables and a body on stdin.

It frames and relays: its own statuses are the cheap refusals (400/403/413), a config it
cannot read (500), a spool it cannot use (503) and no answer in time (504); every other
answer is webknockd's, relayed byte for byte. :class:`PlayDaemon` plays webknockd for
these tests (and for test_cgi_imports and test_hostile_cgi): it takes each request the
CGI spools and answers through its doorbell. The last tests run the real daemon.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

import webknock.spool as spool_layout
from tests.cgi_side import WEB, getinfo_packet, openports_packet
from tests.conftest import REPO, write_instance
from tests.fakes import MemoryFirewall, memory_daemon
from webknock.config import SpoolPaths, load
from webknock.protocol import messages, transport, v1
from webknock.spool import doorbell
from webknock.spool.mount import prepare_spool
from webknock.spool.reader import SpooledRequest, parse_request, request_name_id

#: Who may own a doorbell the daemon answers through: the web user, or root (the CGI
#: runs as root in these tests).
BELL_OWNERS = frozenset({0, WEB.pw_uid})

#: What the daemon answers a request: its id and frame in, the doorbell payload out
#: (None: no answer at all).
Answerer = Callable[[str, bytes], bytes | None]


def answers(status: int, note: str = "", body: bytes = b"") -> Answerer:
    """An Answerer that gives every request the same answer."""
    payload = doorbell.encode_answer(status, note, body)
    return lambda _rid, _frame: payload


class PlayDaemon:
    """Plays webknockd from a thread while the CGI runs: claims each request that appears in
    requests/ (from then on the CGI can no longer withdraw it), keeps its frame, and answers
    through its doorbell with what `answer` returns, `delay` seconds later.

    Bounded: the thread gives up after `seconds`. Used as a context manager; on exit the
    thread is stopped and any error it met is raised."""

    def __init__(
        self, paths: SpoolPaths, answer: Answerer, *, delay: float = 0.0, seconds: float = 30.0
    ) -> None:
        self.paths, self.answer, self.delay, self.seconds = paths, answer, delay, seconds
        self.frames: list[bytes] = []
        self.delivered: list[bool] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="play-webknockd", daemon=True)

    def __enter__(self) -> PlayDaemon:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive(), "the daemon's stand-in did not stop"
        if self.errors and exc is None:
            raise self.errors[0]

    def requests(self) -> list[SpooledRequest]:
        """The frames received, parsed as webknockd parses them."""
        return [parse_request("0" * 32, frame) for frame in self.frames]

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + self.seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                for name in sorted(os.listdir(self.paths.requests)):
                    self._take(name)
                self._stop.wait(0.002)
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)

    def _take(self, name: str) -> None:
        rid = request_name_id(name)
        if rid is None:
            return
        claimed = self.paths.claimed / name
        try:
            os.rename(self.paths.requests / name, claimed)
        except FileNotFoundError:  # withdrawn by its CGI
            return
        frame = claimed.read_bytes()
        claimed.unlink()
        self.frames.append(frame)
        payload = self.answer(rid, frame)
        if payload is None:
            return
        if self.delay:
            self._stop.wait(self.delay)
        self.delivered.append(doorbell.deliver(str(self.paths.waits / rid), BELL_OWNERS, payload))


class Cgi:
    """One instance (config and spool) and a way to run the CGI as the web server does."""

    def __init__(self, config: Path, keys: v1.Keys) -> None:
        self.config, self.keys = config, keys
        self.spool = SpoolPaths(Path(load(config).spool_dir))

    def run(
        self,
        body: bytes = b"",
        method: str = "POST",
        remote: str = "192.0.2.10",
        length: str | None = None,
        extra: Mapping[str, str | bytes] | None = None,
    ) -> tuple[int, dict[str, str], bytes, bytes]:
        """Run the CGI once; returns its status, headers, body and stderr."""
        env: dict[str, str | bytes] = {
            "PATH": "/usr/bin:/bin",
            "REQUEST_METHOD": method,
            "CONTENT_LENGTH": str(len(body)) if length is None else length,
            "REMOTE_ADDR": remote,
            "WEBKNOCK_CONFIG": str(self.config),
            "PYTHONPATH": str(REPO),
            **(extra or {}),
        }
        proc = subprocess.run(
            [sys.executable, "-c", "from webknock.cgi.relay import main; main()"],
            input=body,
            capture_output=True,
            env=env,
            timeout=30,
            check=True,
        )
        head, _, payload = proc.stdout.partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n"))
        assert b"Traceback" not in proc.stdout and b"Traceback" not in proc.stderr
        assert int(headers["Content-Length"]) == len(payload)
        return int(headers["Status"].split()[0]), headers, payload, proc.stderr

    def call(self, body: bytes = b"", **kw: Any) -> tuple[int, dict[str, str], bytes]:
        status, headers, payload, _ = self.run(body, **kw)
        return status, headers, payload

    def body(self, obj: dict[str, Any]) -> bytes:
        obj = {**obj, "nonce": os.urandom(8).hex()}  # identical content would be a replay
        return b"data=" + transport.encode_field(v1.encode(self.keys, messages.dumps(obj))).encode()

    def ask(self, obj: dict[str, Any], **kw: Any) -> tuple[int, dict[str, Any] | None]:
        """Send `obj` sealed; the status and, for 200, the opened reply."""
        status, _headers, body = self.call(self.body(obj), **kw)
        return status, json.loads(v1.decode(self.keys, body)) if status == 200 else None

    def spooled(self) -> list[str]:
        """What is left in requests/ and waits/."""
        return sorted(os.listdir(self.spool.requests)) + sorted(os.listdir(self.spool.waits))


def make_cgi(base: Path, keys: v1.Keys, **settings: str) -> Cgi:
    config = write_instance(base, keys, **{"result_timeout": "1", **settings})
    prepare_spool(load(config).spool, WEB.pw_gid)
    return Cgi(config, keys)


@pytest.fixture
def cgi(tmp_path: Path, vector_keys: v1.Keys) -> Cgi:
    return make_cgi(tmp_path, vector_keys)


def v1_body(packet: bytes) -> bytes:
    return b"data=" + transport.encode_field(packet).encode()


def clean(text: str, limit: int) -> bytes:
    """A header value as the frame must hold it: printable ASCII, the rest '?', cut."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit]).encode("ascii")


# -- the CGI's own statuses -------------------------------------------------------------------

V2_JUNK = b"v2=" + transport.encode_field(b"WK2X" + bytes(100)).encode()  # wrong magic


@pytest.mark.parametrize(
    ("kw", "status"),
    [
        ({"method": "GET"}, 400),
        ({"length": ""}, 400),
        ({"length": "99999"}, 413),
        ({"body": b"nodata=1"}, 400),
        ({"body": b"data="}, 403),
        ({"body": b"v2="}, 403),
        ({"body": b"data=" + b"A" * 684}, 403),  # 513 bytes: not a whole number of blocks
        ({"body": b"data=!!!"}, 403),
        ({"body": V2_JUNK}, 403),
    ],
)
def test_cheap_refusals_get_a_bare_status_and_spool_nothing(
    cgi: Cgi, kw: dict[str, Any], status: int
) -> None:
    got, headers, body, log = cgi.run(**kw)
    assert got == status and body == b"" and headers["Content-Length"] == "0"
    assert "X-Webknock-Error" not in headers
    assert log.startswith(b"webknock.cgi: 192.0.2.10: ") and log.count(b"\n") == 1
    assert cgi.spooled() == []


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"spool_dir": "spool"}, b"not an absolute path"),
        ({"result_timeout": "soon"}, b"not a number of seconds"),
        ({"result_timeout": "0"}, b"not a number of seconds"),
    ],
)
def test_a_config_the_cgi_cannot_read_is_500(
    tmp_path: Path, vector_keys: v1.Keys, settings: dict[str, str], why: bytes
) -> None:
    c = make_cgi(tmp_path, vector_keys)
    write_instance(tmp_path, vector_keys, **settings)  # the spool stays where it was
    status, headers, body, log = c.run(v1_body(getinfo_packet(vector_keys)))
    assert status == 500 and body == b"" and "X-Webknock-Error" not in headers
    assert str(c.config).encode() in log and why in log  # the admin learns which and why
    assert c.spooled() == []


def test_a_missing_config_or_section_is_500(cgi: Cgi, tmp_path: Path) -> None:
    packet = v1_body(getinfo_packet(cgi.keys))
    missing = {"WEBKNOCK_CONFIG": str(tmp_path / "nowhere.ini")}
    assert cgi.call(packet, extra=missing)[0] == 500
    other = tmp_path / "other.ini"
    other.write_text("[client]\nspool_dir = /tmp\n")
    assert cgi.call(packet, extra={"WEBKNOCK_CONFIG": str(other)})[0] == 500
    assert cgi.spooled() == []


def test_the_cgi_reads_only_its_two_settings(tmp_path: Path, vector_keys: v1.Keys) -> None:
    """A setting only webknockd reads cannot fail the CGI: the daemon judges it."""
    c = make_cgi(tmp_path, vector_keys)
    write_instance(tmp_path, vector_keys, result_timeout="1", max_time="forever", keys_file="x")
    with PlayDaemon(c.spool, answers(200, body=b"sealed")):
        assert c.call(v1_body(getinfo_packet(vector_keys)))[0] == 200


def test_a_spool_that_cannot_be_used_is_503(tmp_path: Path, vector_keys: v1.Keys) -> None:
    c = make_cgi(tmp_path, vector_keys)
    write_instance(tmp_path, vector_keys, result_timeout="1", spool_dir=str(tmp_path / "gone"))
    status, _, body, log = c.run(v1_body(getinfo_packet(vector_keys)))
    assert status == 503 and body == b"" and b"spool unavailable" in log
    assert not (tmp_path / "gone").exists()


def test_no_answer_is_504_and_the_request_is_withdrawn(cgi: Cgi) -> None:
    started = time.monotonic()
    status, _, body, log = cgi.run(v1_body(openports_packet(cgi.keys)))
    assert status == 504 and body == b"" and b"did not answer" in log
    assert time.monotonic() - started < 1 + 1.5, "one wait: the request was withdrawn"
    assert cgi.spooled() == [], "nothing left that webknockd could apply later"


def test_a_claimed_request_without_an_answer_is_504(cgi: Cgi) -> None:
    """Claimed, it cannot be withdrawn: the CGI waits once more, then says 504, never 200."""
    with PlayDaemon(cgi.spool, lambda _rid, _frame: None) as daemon:
        status, _, body = cgi.call(v1_body(openports_packet(cgi.keys)))
    assert status == 504 and body == b"" and len(daemon.frames) == 1
    assert cgi.spooled() == []


# -- relaying -------------------------------------------------------------------------------

BIGGEST = doorbell.MAX_ANSWER_BYTES - len(b"200 \n")


@pytest.mark.parametrize(
    ("status", "note", "body"),
    [
        (200, "", bytes(range(256)) * 2),
        (200, "", b"\r\n\r\nStatus: 500\r\n"),  # a body is a body
        (200, "", (bytes(range(256)) * 16)[:BIGGEST]),  # the most one doorbell write holds
        (200, "", b""),
        (200, "advice: renew", b"x"),
        *[(s, "", b"") for s in sorted(doorbell.STATUSES) if s != 200],
        (403, "clock skew: request time is +99s off; fix the client's clock", b""),
        (405, "x" * doorbell.MAX_NOTE, b""),
        (429, "a;b=c, d: e", b""),
    ],
)
def test_the_daemons_answer_is_relayed_exactly(
    cgi: Cgi, status: int, note: str, body: bytes
) -> None:
    with PlayDaemon(cgi.spool, answers(status, note, body)) as daemon:
        got, headers, payload, log = cgi.run(v1_body(getinfo_packet(cgi.keys)))
    assert daemon.delivered == [True]
    assert headers["Status"] == doorbell.STATUSES[status]
    assert got == status and payload == body and headers["Content-Length"] == str(len(body))
    assert headers.get("X-Webknock-Error") == (note or None)
    assert headers["Content-Type"] == (
        "application/octet-stream" if status == 200 else "text/plain"
    )
    assert headers["Cache-Control"] == "no-store"
    assert log == b"", "the daemon's answers are not the CGI's to log"
    assert cgi.spooled() == [], "the doorbell is gone with the answer"


@pytest.mark.parametrize(
    ("written", "why"),
    [
        (b"", "opened and closed with nothing written"),
        (b"200 ok", "no end of the status line"),
        (b"302 \n", "not a status the CGI may say"),
        (b"403 \n" + b"body", "a body on a refusal"),
        (b"403 line\rX-Injected: 1\n", "a note that would break the header"),
    ],
)
def test_an_unreadable_answer_is_500_never_success(cgi: Cgi, written: bytes, why: str) -> None:
    with PlayDaemon(cgi.spool, lambda _rid, _frame: written):
        status, headers, body = cgi.call(v1_body(openports_packet(cgi.keys)))
    assert (status, body) == (500, b""), why
    assert "X-Injected" not in headers and "X-Webknock-Error" not in headers


V2_CASES = {c["name"]: c for c in json.loads((REPO / "tests/vectors/v2.json").read_text())["cases"]}


def v2_form(name: str) -> tuple[bytes, bytes]:
    """The form body and raw packet of a v2 vector case."""
    case = V2_CASES[name]
    return case["form"].encode(), bytes.fromhex(case["packet_hex"])


def test_the_frame_holds_the_request_as_received(cgi: Cgi) -> None:
    """REMOTE_ADDR, X-Forwarded-For and User-Agent as the web server gave them, cleaned to
    printable ASCII and cut to their limits; the packet byte for byte."""
    packet = openports_packet(cgi.keys)
    remote = "2001:db8:0:0:0:0:0:10%eth0" + "0" * 60
    forwarded = "203.0.113.5,\x01 198.51.100.7\r\nX-Evil: 1, \x7f" + "9" * 2000
    agent = b"curl/8 \xff\xfe \x1b[31m" + "\u00e9\u2028".encode() + b"\t" + b"a" * 300
    extra = {"HTTP_X_FORWARDED_FOR": forwarded, "HTTP_USER_AGENT": agent}  # agent: not UTF-8
    with PlayDaemon(cgi.spool, answers(200, body=b"sealed")) as daemon:
        assert cgi.call(v1_body(packet), remote=remote, extra=extra)[0] == 200
    limits = spool_layout.HEADER_LIMITS
    want = (
        b"webknock-spool 2\n"
        b"field=v1\n"
        b"remote=" + clean(remote, limits["remote"]) + b"\n"
        b"forwarded=" + clean(forwarded, limits["forwarded"]) + b"\n"
        b"agent=" + clean(os.fsdecode(agent), limits["agent"]) + b"\n"
        b"\n" + packet
    )
    assert daemon.frames == [want]
    (req,) = daemon.requests()
    assert len(req.remote) == 64 and len(req.forwarded) == 1024 and len(req.agent) == 200
    assert req.agent.startswith("curl/8 ?? ?[31m???a")
    assert req.forwarded.startswith("203.0.113.5,? 198.51.100.7??X-Evil: 1, ?99")


def test_missing_headers_are_relayed_empty(cgi: Cgi) -> None:
    """No REMOTE_ADDR (a broken web server) is for webknockd to refuse, with 500."""
    packet = getinfo_packet(cgi.keys)
    env = {"REMOTE_ADDR": ""}
    with PlayDaemon(cgi.spool, answers(500)) as daemon:
        assert cgi.call(v1_body(packet), extra=env)[0] == 500
    assert daemon.frames == [
        spool_layout.MAGIC + b"field=v1\nremote=\nforwarded=\nagent=\n\n" + packet
    ]


def form(kind: str, v1_packet: bytes, v2_body: bytes) -> bytes:
    data = transport.encode_field(v1_packet).encode()
    return {
        "data": b"data=" + data,
        "v2": v2_body,
        "v2 first": b"x=1&" + v2_body + b"&data=" + data,
        "data first": b"data=" + data + b"&" + v2_body,
        "percent-encoded": b"data=%" + f"{data[0]:02X}".encode() + data[1:],
        "padded": b"data=" + data + b"==",
    }[kind]


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        ("data", "v1"),
        ("v2", "v2"),
        ("v2 first", "v2"),
        ("data first", "v1"),
        ("percent-encoded", "v1"),  # as a form library may send it
        ("padded", "v1"),
    ],
)
def test_v1_and_v2_fields_are_relayed_with_their_field(cgi: Cgi, kind: str, field: str) -> None:
    v1_packet = getinfo_packet(cgi.keys)
    v2_body, v2_packet = v2_form("getinfo")
    with PlayDaemon(cgi.spool, answers(200, body=b"sealed")) as daemon:
        status, _, body = cgi.call(form(kind, v1_packet, v2_body))
    assert (status, body) == (200, b"sealed")
    (req,) = daemon.requests()
    assert req.protocol == field
    assert req.packet == (v1_packet if field == "v1" else v2_packet)


def test_every_v2_vector_is_relayed(cgi: Cgi) -> None:
    with PlayDaemon(cgi.spool, answers(403)) as daemon:
        for name in V2_CASES:
            form, _ = v2_form(name)
            assert cgi.call(form)[0] == 403
    assert [r.packet.hex() for r in daemon.requests()] == [
        c["packet_hex"] for c in V2_CASES.values()
    ]


# -- with the real webknockd ------------------------------------------------------------------


@pytest.fixture
def daemon(cgi: Cgi) -> Iterator[MemoryFirewall]:
    d, fw = memory_daemon(load(cgi.config))
    thread = threading.Thread(target=d.run)
    thread.start()
    yield fw
    d.stopping = True
    thread.join(5)
    assert not thread.is_alive()


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


def test_vector_packets_reach_the_timestamp_check(
    cgi: Cgi, daemon: MemoryFirewall, vectors: dict[str, Any]
) -> None:
    """The original client's packets verify; their 2025 timestamp is refused as stale, and
    the daemon's note reaches the client."""
    for case in vectors["cases"]:
        if '"api"' not in case["plaintext"]:
            continue
        status, headers, _ = cgi.call(b"data=" + case["post_data"].encode())
        assert status == 403
        assert "clock skew" in headers["X-Webknock-Error"]


def test_getinfo_answers_from_config(cgi: Cgi, daemon: MemoryFirewall) -> None:
    status, reply = cgi.ask({"api": "getinfo", "ver": 1, "ts": now()}, remote="::ffff:192.0.2.10")
    assert status == 200
    assert reply == {
        "success": True,
        "tcp": [22, 2222],
        "udp": [51820],
        "maxtime": 3600,
        "ip": "192.0.2.10",
    }


def test_wrong_version_and_api(cgi: Cgi, daemon: MemoryFirewall) -> None:
    assert cgi.ask({"api": "getinfo", "ver": 2, "ts": now()})[0] == 405
    assert cgi.ask({"api": "shell", "ver": 1, "ts": now()})[0] == 405


def test_replay_refused_even_with_altered_padding(cgi: Cgi, daemon: MemoryFirewall) -> None:
    body = cgi.body({"api": "getinfo", "ver": 1, "ts": now()})
    assert cgi.call(body)[0] == 200
    assert cgi.call(body)[0] == 403
    packet = bytearray(transport.decode_field(body[5:]))
    packet[-1] ^= 0xFF  # unauthenticated tail: decodes to the same request
    assert cgi.call(v1_body(bytes(packet)))[0] == 403


def test_openports_ip_mismatch(cgi: Cgi, daemon: MemoryFirewall) -> None:
    status, headers, _ = cgi.call(cgi.body(openports(ip="192.0.2.99")))
    assert status == 403 and "address mismatch" in headers["X-Webknock-Error"]
    assert daemon.held == {}


def test_openports_through_daemon(cgi: Cgi, daemon: MemoryFirewall) -> None:
    req = openports(ports=[("tcp", 22), ("tcp", 23), ("udp", 51820)], time=99999)
    status, reply = cgi.ask(req)
    assert status == 200 and reply is not None and reply["success"] is True
    assert abs(reply["expires"] - (now() + 3600)) <= 2  # capped at max_time
    assert sorted((k.proto, k.port) for k in daemon.held) == [("tcp", 22), ("udp", 51820)]


def test_openports_nothing_offered(cgi: Cgi, daemon: MemoryFirewall) -> None:
    status, reply = cgi.ask(openports(ports=[("tcp", 23)]))
    assert status == 200 and reply == {
        "success": False,
        "error": "none of the requested ports is offered",
        "errorcode": "NOPORTS",
    }


def test_daemon_failure_is_not_success(cgi: Cgi, daemon: MemoryFirewall) -> None:
    daemon.fail_apply = daemon.fail_sync = True
    status, reply = cgi.ask(openports())
    assert status == 200 and reply is not None
    assert reply["success"] is False and reply["errorcode"] == "FIREWALL"


def test_throttle_after_repeated_bad_packets(tmp_path: Path, vector_keys: v1.Keys) -> None:
    c = make_cgi(tmp_path, vector_keys, throttle_failures="3")
    wrong = Cgi(c.config, v1.Keys.generate())
    d, _ = memory_daemon(load(c.config))
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        bad = wrong.body({"api": "getinfo", "ver": 1, "ts": now()})
        assert [c.call(bad)[0] for _ in range(4)] == [403, 403, 403, 429]
        assert c.ask({"api": "getinfo", "ver": 1, "ts": now()}, remote="192.0.2.11")[0] == 200
    finally:
        d.stopping = True
        thread.join(5)


def test_trusted_proxy_forwarded_for(tmp_path: Path, vector_keys: v1.Keys) -> None:
    c = make_cgi(tmp_path, vector_keys, trusted_proxies="192.0.2.1")
    d, _ = memory_daemon(load(c.config))
    thread = threading.Thread(target=d.run)
    thread.start()
    try:
        xff = {"HTTP_X_FORWARDED_FOR": "203.0.113.5, 2001:db8::77"}
        info = {"api": "getinfo", "ver": 1, "ts": now()}
        _, reply = c.ask(info, remote="192.0.2.1", extra=xff)
        assert reply is not None and reply["ip"] == "2001:db8::77"
        _, reply = c.ask(info, remote="192.0.2.9", extra=xff)
        assert reply is not None and reply["ip"] == "192.0.2.9"  # untrusted peer: header ignored
    finally:
        d.stopping = True
        thread.join(5)
