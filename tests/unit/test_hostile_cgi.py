"""Hostile HTTP against the CGI: every body, method, header and size gets a short 4xx (or 503),
never a traceback, never a spool write, and the failure is logged with the peer address.

Most cases run the real ``webknock.cgi.main`` in-process (fast); a few run it as the web
server does, in a child process, to see the exact bytes on stdout.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import json
import os
import pwd
import subprocess
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, write_instance
from webknock import cgi, doorbell, spool
from webknock.config import load
from webknock.protocol import messages, transport, v1
from webknock.spooldirs import prepare_spool

WEB = pwd.getpwnam("www-data")
DOCUMENTED = {400, 403, 405, 413, 429}  # what junk may get; 503 only when the disk fails


class Site:
    """One instance config and a way to call the CGI in-process."""

    def __init__(self, config: Path, keys: v1.Keys) -> None:
        self.config, self.keys = config, keys
        self.cfg = load(config)
        self.spooled: list[bytes] = []

    def call(
        self,
        mp: pytest.MonkeyPatch,
        body: bytes = b"",
        *,
        method: str = "POST",
        remote: str = "192.0.2.10",
        length: str | None = None,
        extra: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, str], bytes, str]:
        """Run cgi.main() once; returns status, headers, body and what it logged."""
        env = {
            "REQUEST_METHOD": method,
            "CONTENT_LENGTH": str(len(body)) if length is None else length,
            "REMOTE_ADDR": remote,
            "WEBKNOCK_CONFIG": str(self.config),
            **(extra or {}),
        }
        out, err = io.BytesIO(), io.StringIO()
        with mp.context() as m:
            m.setattr(os, "environ", env)
            m.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO(body)))
            m.setattr(sys, "stdout", types.SimpleNamespace(buffer=out))
            m.setattr(sys, "stderr", err)
            assert cgi.main(detach=False) == 0
        head, _, payload = out.getvalue().partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode("ascii").split("\r\n"))
        return int(headers["Status"].split()[0]), headers, payload, err.getvalue()

    def sealed(self, obj: dict[str, Any], keys: v1.Keys | None = None) -> bytes:
        return b"data=" + self.field(obj, keys).encode()

    def field(self, obj: dict[str, Any], keys: v1.Keys | None = None) -> str:
        obj = {"nonce": os.urandom(8).hex(), **obj}
        return transport.encode_field(v1.encode(keys or self.keys, messages.dumps(obj)))


#: The real one: the `site` fixture replaces it with a tripwire.
WRITE_REQUEST = spool.write_request


@pytest.fixture
def site(tmp_path: Path, vector_keys: v1.Keys, monkeypatch: pytest.MonkeyPatch) -> Site:
    config = write_instance(tmp_path, vector_keys, result_timeout="1", throttle_failures="1000")
    s = Site(config, vector_keys)
    prepare_spool(s.cfg.spool, WEB.pw_gid)

    def no_spool_write(*args: Any, **kw: Any) -> None:
        s.spooled.append(args[2])
        raise AssertionError("hostile input reached the spool")

    monkeypatch.setattr(spool, "write_request", no_spool_write)
    return s


def now() -> int:
    return int(time.time())


def openports(ip: Any = "192.0.2.10", **changes: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "api": "openports",
        "ip": ip,
        "time": 60,
        "ver": 1,
        "ts": now(),
        "ports": [{"proto": "TCP", "num": 22}],
    }
    obj.update(changes)
    return obj


def assert_refused(got: tuple[int, dict[str, str], bytes, str], statuses: set[int]) -> None:
    status, headers, body, log = got
    assert status in statuses, (status, log)
    assert body == b"" and headers["Content-Length"] == "0"
    assert "Traceback" not in log
    assert len(log.splitlines()) == 1 and log.startswith("webknock.cgi: 192.0.2.10: ")


JUNK_REQUESTS: list[tuple[dict[str, Any], set[int]]] = [
    *[({"method": m}, {400}) for m in ("GET", "HEAD", "PUT", "DELETE", "OPTIONS", "post", "")],
    ({"method": "POST\r\nX-Evil: 1"}, {400}),
    *[
        ({"length": n, "body": b"data=x"}, {400})
        for n in ("", "-1", "abc", "\u00b2", "\u0661", "1e3", " 6", "6 ", "0x6")
    ],
    ({"length": "9" * 5000}, {413}),
    ({"length": "99999"}, {413}),
    ({"length": "8193", "body": b"data=" + b"A" * 8188}, {413}),
    ({"body": b""}, {400}),
    ({"body": b"data"}, {400}),
    ({"body": b"&&&&&&"}, {400}),
    ({"body": b"DATA=abc"}, {400}),
    ({"body": b"data="}, {403}),
    ({"body": b"data=%"}, {403}),
    ({"body": b"data=%zz%00"}, {403}),
    ({"body": b"data=\xff\xfe\x00"}, {403}),
    ({"body": b"data=" + b"A" * 683}, {403}),
    ({"body": b"data=" + b"A" * 682 + b"=="}, {403}),
    ({"body": b"data=" + b"A" * 684}, {403}),
    ({"body": b"data=" + b"A" * 2731}, {403}),  # 2048 bytes: right size, not a packet
    ({"body": b"data=" + b"A" * 3414}, {403}),  # 2560 bytes: over MAX_PACKET
    ({"body": b"data=" + b"A" * 8187}, {403}),
    ({"body": b"data=" + b"!" * 683}, {403}),
    ({"body": b"data=" + b"A" * 682 + b"%"}, {403}),
    ({"body": os.urandom(2000)}, {400, 403}),
]


@pytest.mark.parametrize(("kw", "statuses"), JUNK_REQUESTS)
def test_junk_gets_short_4xx(
    site: Site, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], statuses: set[int]
) -> None:
    assert_refused(site.call(monkeypatch, **kw), statuses)
    assert site.spooled == []


def test_wrong_keys_truncated_and_bit_flipped_packets(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = v1.encode(site.keys, messages.getinfo_request(now()))
    assert site.call(monkeypatch, b"data=" + transport.encode_field(good).encode())[0] == 200
    wrong = v1.encode(v1.Keys.generate(), messages.dumps(openports()))
    cases = [wrong, good[:512], good + os.urandom(512), good[512:] + good[:512]]
    for bit in range(0, len(good) * 8 - 256, 97):  # flips outside the unauthenticated tail
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        cases.append(bytes(flipped))
    for packet in cases:
        got = site.call(monkeypatch, b"data=" + transport.encode_field(packet).encode())
        assert_refused(got, {403})
        assert "packet:" in got[3] or "replayed packet" in got[3]  # decodes to the same request
    assert site.spooled == []


@pytest.mark.parametrize(
    "obj",
    [
        {"api": "getinfo", "ver": 1, "ts": "\u00b2"},
        {"api": "getinfo", "ver": 1, "ts": "9" * 1900},
        {"api": "getinfo", "ver": 1, "ts": 1.5},
        {"api": "getinfo", "ver": 1, "ts": None},
        {"api": "getinfo", "ver": 1, "ts": [1]},
        {"api": "getinfo", "ver": "1", "ts": 0},
        {"api": ["getinfo"], "ver": 1, "ts": 0},
        {"api": "shell", "ver": 1, "ts": 0},
        openports(ip=["192.0.2.10"]),
        openports(ip={"a": 1}),
        openports(ip="300.1.1.1"),
        openports(ip="fe80::1%eth0"),
        openports(ip="::1%\n"),
        openports(ip="192.0.2.99"),
        openports(ip=None),
        openports(ports="22"),
        openports(ports=[22]),
        openports(ports=[{"proto": "TCP", "num": "\u00b2"}]),
        openports(ports=[{"proto": "TCP", "num": -1e308}]),
        openports(time="\u00b2"),
        openports(time=[60]),
        {"api": "getinfo", "ver": 1, "ts": [[[[[[[[[[[[[[[[[[[[[[[[]]]]]]]]]]]]]]]]]]]]]]]]},
    ],
)
def test_sealed_but_malformed_requests(
    site: Site, monkeypatch: pytest.MonkeyPatch, obj: dict[str, Any]
) -> None:
    assert_refused(site.call(monkeypatch, site.sealed(obj)), {403, 405})
    assert site.spooled == []


def test_sealed_deep_nesting_and_non_object(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    for data in (b"[" * 1000 + b"]" * 1000, b"[" * 2000, b'"text"', b"null", b"\xff\xfe"):
        packet = v1.encode(site.keys, data)
        got = site.call(monkeypatch, b"data=" + transport.encode_field(packet).encode())
        assert_refused(got, {403, 405})


def test_replays_refused_including_altered_unauthenticated_bytes(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The replay cache keys on the HMAC: every copy that decodes to the same request is one."""
    packet = v1.encode(site.keys, messages.getinfo_request(now()))
    field = transport.encode_field(packet)
    assert site.call(monkeypatch, b"data=" + field.encode())[0] == 200
    copies = [b"data=" + field.encode(), b"x=1&data=" + field.encode() + b"&data=zz"]
    copies.append(b"data=" + field.encode() + b"=" * (-len(field) % 4))  # padded Base64
    copies.append(b"data=%" + f"{ord(field[0]):02X}".encode() + field[1:].encode())
    for i in range(len(packet) - 32, len(packet), 3):  # the tail nobody authenticates
        altered = bytearray(packet)
        altered[i] ^= 0x5A
        if v1.decode(site.keys, bytes(altered)):  # still decodes: the same request
            copies.append(b"data=" + transport.encode_field(bytes(altered)).encode())
    assert len(copies) > 10
    for body in copies:
        got = site.call(monkeypatch, body)
        assert_refused(got, {403})
        assert "replayed packet" in got[3]
    marks = [n for n in os.listdir(site.cfg.spool.seen) if n.startswith("r-")]
    assert len(marks) == 1 and marks[0] == "r-" + v1.decode_with_mac(site.keys, packet)[1].hex()


def test_clock_skew_gets_a_clear_ascii_error(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    for skew in (-100, 16, 3600):
        status, headers, _, _ = site.call(
            monkeypatch, site.sealed({"api": "getinfo", "ver": 1, "ts": now() + skew})
        )
        note = headers["X-Webknock-Error"]
        assert status == 403 and note.isascii()
        assert f"{skew:+d}s off" in note and "+/-15s" in note and "fix the client's clock" in note
    # without the keys nobody learns the server's time
    _, headers, _, _ = site.call(
        monkeypatch, site.sealed({"api": "getinfo", "ver": 1, "ts": 0}, v1.Keys.generate())
    )
    assert "X-Webknock-Error" not in headers


def test_throttle_counts_bad_packets_and_replays_per_address(
    tmp_path: Path, vector_keys: v1.Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_instance(tmp_path, vector_keys, throttle_failures="3", throttle_window="2")
    s = Site(config, vector_keys)
    prepare_spool(s.cfg.spool, WEB.pw_gid)
    bad = s.sealed({"api": "getinfo", "ver": 1, "ts": now()}, v1.Keys.generate())
    assert [s.call(monkeypatch, bad)[0] for _ in range(4)] == [403, 403, 403, 429]
    other = s.sealed({"api": "getinfo", "ver": 1, "ts": now()})
    assert s.call(monkeypatch, other, remote="192.0.2.11")[0] == 200
    assert s.call(monkeypatch, other, remote="192.0.2.12")[0] == 403  # replay from elsewhere
    assert s.call(monkeypatch, other, remote="192.0.2.12")[0] == 403
    assert s.call(monkeypatch, other, remote="192.0.2.12")[0] == 403
    assert s.call(monkeypatch, other, remote="192.0.2.12")[0] == 429
    counters = sorted(n for n in os.listdir(s.cfg.spool.seen) if n.startswith("f-"))
    assert counters == ["f-192.0.2.10", "f-192.0.2.12"]
    st = os.stat(s.cfg.spool.seen / "f-192.0.2.10")
    assert st.st_size == 3 and st.st_blocks == 0, "the counter is a sparse file: no disk blocks"
    time.sleep(2.1)
    fresh = s.sealed({"api": "getinfo", "ver": 1, "ts": now()})
    assert s.call(monkeypatch, fresh)[0] == 200, "the block ends with the window"


@pytest.mark.parametrize(
    "addr",
    [
        "192.0.2.10",
        "2001:db8::10",
        "fe80::1%eth0",
        "fe80::1%\n",
        "::ffff:192.0.2.1",
    ],
)
def test_throttle_file_names_are_bounded_and_safe(addr: str) -> None:
    try:
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.ip_address(addr)
    except ValueError:
        pytest.skip("not an address Python accepts")
    name = spool._fail_name(ip)
    assert name.startswith("f-") and len(name) <= 2 + 39
    assert set(name[2:]) <= set("0123456789abcdef._")


def test_throttle_ignores_planted_files(tmp_path: Path) -> None:
    """The web user owns seen/: a FIFO, directory or symlink there never blocks or hangs."""
    seen = tmp_path
    os.mkfifo(seen / "f-192.0.2.1")
    (seen / "f-192.0.2.2").mkdir()
    os.symlink("/etc/passwd", seen / "f-192.0.2.3")
    guard = spool.Throttle(seen, 1, 60)
    size = os.path.getsize("/etc/passwd")
    for last in (1, 2, 3):
        addr = ipaddress.IPv4Address(f"192.0.2.{last}")
        guard.failed(addr, time.time())
        assert not guard.blocked(addr, time.time())
    assert os.path.getsize("/etc/passwd") == size


@pytest.mark.parametrize(
    ("remote", "xff", "trusted", "expected"),
    [
        ("192.0.2.9", "203.0.113.5", "192.0.2.1", "192.0.2.9"),  # untrusted peer: ignored
        ("192.0.2.1", "203.0.113.5", "192.0.2.1", "203.0.113.5"),
        ("192.0.2.1", "", "192.0.2.1", "192.0.2.1"),  # proxy sent none: the proxy itself
        ("192.0.2.1", "198.51.100.7, 203.0.113.5, 192.0.2.2", "192.0.2.0/29", "203.0.113.5"),
        ("192.0.2.1", "203.0.113.5, 192.0.2.2", "192.0.2.1", "192.0.2.2"),  # 2nd hop untrusted
        ("2001:db8::1", "2001:db8:ffff::9", "2001:db8::/64", "2001:db8:ffff::9"),
        ("192.0.2.1", "::ffff:203.0.113.5", "192.0.2.1", "203.0.113.5"),
        ("192.0.2.1", "not-an-ip", "192.0.2.1", 400),
        ("192.0.2.1", "fe80::1%eth0", "192.0.2.1", 400),
        ("192.0.2.1", "203.0.113.5:4711", "192.0.2.1", 400),
    ],
)
def test_forwarded_for_only_from_trusted_proxies(
    remote: str, xff: str, trusted: str, expected: str | int
) -> None:
    nets = (ipaddress.ip_network(trusted, strict=False),)
    env = {"REMOTE_ADDR": remote, "HTTP_X_FORWARDED_FOR": xff}
    if isinstance(expected, int):
        with pytest.raises(cgi.Reply) as info:
            cgi.client_address(env, nets)
        assert info.value.status == expected
    else:
        assert str(cgi.client_address(env, nets)) == expected
        assert str(cgi.client_address(env, ())) == str(ipaddress.ip_address(remote))


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("write_request", OSError(errno.ENOSPC, "No space left on device")),
        ("write_request", OSError(errno.EROFS, "Read-only file system")),
        ("doorbell", OSError(errno.EMFILE, "Too many open files")),
        ("doorbell", OSError(errno.ENOENT, "No such file or directory")),  # no waits/
    ],
)
def test_spool_failure_is_503_never_success(
    site: Site, monkeypatch: pytest.MonkeyPatch, target: str, error: OSError
) -> None:
    def fail(*args: Any, **kw: Any) -> None:
        raise error

    if target == "doorbell":  # installed before the request is written: nothing spooled
        monkeypatch.setattr(spool, "write_request", WRITE_REQUEST)
        monkeypatch.setattr(spool, "install_bell", fail)
    else:
        monkeypatch.setattr(spool, target, fail)
    status, _, body, log = site.call(monkeypatch, site.sealed(openports()))
    assert status == 503 and body == b"" and str(error.strerror) in log, log
    assert os.listdir(site.cfg.spool.requests) == []
    assert os.listdir(site.cfg.spool.waits) == [], "the doorbell is gone with the request"


def answering(site: Site, write: Any) -> Any:
    """A write_request that spools the request and then plays the daemon with `write`."""

    def write_request(requests: Path, request_id: str, payload: bytes) -> str:
        path = WRITE_REQUEST(requests, request_id, payload)
        os.unlink(path)  # claimed
        write(request_id)
        return path

    return write_request


def answer(site: Site, request_id: str, payload: bytes) -> None:
    """Answer as webknockd does (the CGI runs as root here: its bell is root's)."""
    bell = str(site.cfg.spool.waits / request_id)
    assert doorbell.deliver(bell, frozenset({os.getuid()}), payload)


def test_the_daemon_answers_and_the_cgi_replies_at_once(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bell is up before the request exists, so a daemon faster than the CGI is never
    missed; the CGI wakes on the answer, not after result_timeout (1 s here)."""

    def daemon(request_id: str) -> None:
        answer(site, request_id, doorbell.result_payload(True, expires=now() + 60))

    monkeypatch.setattr(spool, "write_request", answering(site, daemon))
    started = time.monotonic()
    status, _, body, log = site.call(monkeypatch, site.sealed(openports()))
    assert status == 200, log
    assert time.monotonic() - started < 0.9, "woken by the answer, not by the timeout"
    reply = json.loads(v1.decode(site.keys, body))
    assert reply["success"] is True and reply["expires"] > now()
    assert os.listdir(site.cfg.spool.waits) == []


def test_a_bell_closed_without_an_answer_is_failure_never_success(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    def daemon(request_id: str) -> None:
        os.close(os.open(site.cfg.spool.waits / request_id, os.O_WRONLY | os.O_NONBLOCK))

    monkeypatch.setattr(spool, "write_request", answering(site, daemon))
    status, _, body, log = site.call(monkeypatch, site.sealed(openports()))
    assert status == 200, log
    reply = json.loads(v1.decode(site.keys, body))
    assert reply == {"success": False, "error": "result missing", "errorcode": "INTERNAL"}


def test_a_request_that_cannot_be_withdrawn_is_504_never_success(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer, and the request cannot be taken back (say, EACCES): it may still be
    applied, so the client hears 504, and the CGI does not wait on."""
    unlink = os.unlink

    def stuck(path: Any, *args: Any, **kw: Any) -> None:
        if str(path).endswith(spool.REQUEST_SUFFIX):
            raise PermissionError(13, "Permission denied")
        unlink(path, *args, **kw)

    monkeypatch.setattr(spool, "write_request", WRITE_REQUEST)
    monkeypatch.setattr(os, "unlink", stuck)
    started = time.monotonic()
    status, _, body, log = site.call(monkeypatch, site.sealed(openports()))
    assert status == 504 and body == b"", log
    assert time.monotonic() - started < site.cfg.result_timeout + 0.8, "one wait, not two"
    assert len(os.listdir(site.cfg.spool.requests)) == 1  # still there for webknockd
    assert os.listdir(site.cfg.spool.waits) == []


def test_a_claimed_request_gets_a_second_wait(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon claimed the request and answers after the first result_timeout: the CGI
    cannot withdraw it any more, so it waits once more and reports the truth."""

    def daemon(request_id: str) -> None:
        late = threading.Timer(
            site.cfg.result_timeout + 0.3,
            answer,
            (site, request_id, doorbell.result_payload(True, expires=now() + 60)),
        )
        late.start()
        threads.append(late)

    threads: list[threading.Timer] = []
    monkeypatch.setattr(spool, "write_request", answering(site, daemon))
    status, _, body, log = site.call(monkeypatch, site.sealed(openports()))
    for t in threads:
        t.join(5)
    assert status == 200, log
    assert json.loads(v1.decode(site.keys, body))["success"] is True


def test_replay_cache_unwritable_is_503(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any, **kw: Any) -> bool:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool, "first_use", full)
    status, _, _, log = site.call(monkeypatch, site.sealed({"api": "getinfo", "ver": 1, "ts": 0}))
    assert status == 403, "stale first: nothing to record"
    status, _, _, log = site.call(
        monkeypatch, site.sealed({"api": "getinfo", "ver": 1, "ts": now()})
    )
    assert status == 503 and "replay cache" in log


def test_log_line_cannot_be_forged(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("REMOTE_ADDR", "192.0.2.10")
    cgi.warn("bad\nwebknock.cgi: 192.0.2.1: 200: forged" + "x" * 1000)
    line = err.getvalue()
    assert line.count("\n") == 1 and len(line) < 450 and "192.0.2.10" in line


def test_client_gone_is_not_a_traceback(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    class Gone:
        def write(self, data: bytes) -> None:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe")

        def flush(self) -> None:
            pass

    err = io.StringIO()
    env = {"REQUEST_METHOD": "GET", "REMOTE_ADDR": "192.0.2.10"}
    with monkeypatch.context() as m:
        m.setattr(os, "environ", env)
        m.setattr(sys, "stdin", types.SimpleNamespace(buffer=io.BytesIO()))
        m.setattr(sys, "stdout", types.SimpleNamespace(buffer=Gone()))
        m.setattr(sys, "stderr", err)
        assert cgi.main(detach=False) == 0
    assert "not delivered" in err.getvalue() and "Traceback" not in err.getvalue()


def test_as_the_web_server_runs_it(tmp_path: Path, vector_keys: v1.Keys) -> None:
    """A child process per request, as fcgiwrap runs it: exact bytes, no traceback anywhere."""
    config = write_instance(tmp_path, vector_keys)
    prepare_spool(load(config).spool, WEB.pw_gid)
    bodies = [b"", b"data=" + b"A" * 683, b"\x00" * 100, "data=\u00e9".encode()]
    for body, method in [(b, "POST") for b in bodies] + [(b"", "TRACE")]:
        env = {
            "PATH": "/usr/bin:/bin",
            "REQUEST_METHOD": method,
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "2001:db8::10",
            "WEBKNOCK_CONFIG": str(config),
            "PYTHONPATH": str(REPO),
        }
        proc = subprocess.run(
            [sys.executable, "-c", "from webknock.cgi import main; main()"],
            input=body,
            capture_output=True,
            env=env,
            timeout=30,
            check=True,
        )
        assert proc.stdout.startswith(b"Status: 4") and proc.stdout.endswith(b"\r\n\r\n")
        assert b"Traceback" not in proc.stderr and proc.stderr.count(b"\n") == 1
        assert proc.stderr.startswith(b"webknock.cgi: 2001:db8::10: 4")
    assert json.dumps(os.listdir(load(config).spool.requests)) == "[]"
