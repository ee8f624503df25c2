"""Hostile HTTP against the CGI: every body, method, header and size it can judge without a
key gets a short 4xx, never a traceback, never a spool write, and the failure is logged
with the peer address; whatever has a packet's shape goes to webknockd unchanged (the CGI
holds no key: it judges nothing it cannot check), and only webknockd's answer, or 503/504,
comes back.

Most cases run the real ``webknock.cgi.relay.main`` in-process (fast); a few run it as the web
server does, in a child process, to see the exact bytes on stdout.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import Any

import pytest

import webknock.spool as spool_layout
from tests.cgi_side import WEB, getinfo_packet, openports_packet
from tests.conftest import REPO, write_instance
from tests.unit.test_cgi import PlayDaemon, answers
from webknock import addresses
from webknock.cgi import relay as cgi
from webknock.config import ServerConfig, load
from webknock.protocol import transport, v1
from webknock.spool import doorbell
from webknock.spool import request as spool
from webknock.spool.mount import prepare_spool
from webknock.spool.reader import parse_request

#: What the CGI says of its own to input it can judge without a key.
CHEAP = {400, 403, 413}


class Site:
    """One instance config and a way to call the CGI in-process."""

    def __init__(self, config: Path, keys: v1.Keys) -> None:
        self.config, self.keys = config, keys
        self.cfg: ServerConfig = load(config)
        self.submitted: list[bytes] = []  # frames that reached spool.submit

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
        assert int(headers["Content-Length"]) == len(payload)
        return int(headers["Status"].split()[0]), headers, payload, err.getvalue()

    def play(self, answer: Any = None, **kw: Any) -> PlayDaemon:
        """webknockd's stand-in on this site's spool (default: 403 to everything)."""
        return PlayDaemon(self.cfg.spool, answer or answers(403), **kw)

    def spooled(self) -> list[str]:
        return sorted(os.listdir(self.cfg.spool.requests)) + sorted(
            os.listdir(self.cfg.spool.waits)
        )


#: The real ones: the `site` fixture wraps submit to record every frame.
SUBMIT, WRITE_REQUEST = spool.submit, spool.write_request


@pytest.fixture
def site(tmp_path: Path, vector_keys: v1.Keys, monkeypatch: pytest.MonkeyPatch) -> Site:
    config = write_instance(tmp_path, vector_keys, result_timeout="1")
    s = Site(config, vector_keys)
    prepare_spool(s.cfg.spool, WEB.pw_gid)

    def recording_submit(spool_dir: str, frame: bytes) -> spool.Submitted:
        s.submitted.append(frame)
        return SUBMIT(spool_dir, frame)

    monkeypatch.setattr(spool, "submit", recording_submit)
    return s


def data(packet: bytes) -> bytes:
    return b"data=" + transport.encode_field(packet).encode()


def assert_refused(got: tuple[int, dict[str, str], bytes, str], statuses: set[int]) -> None:
    status, headers, body, log = got
    assert status in statuses, (status, log)
    assert body == b"" and headers["Content-Length"] == "0"
    assert "X-Webknock-Error" not in headers
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
    ({"length": "8192", "body": b"data=x"}, {403}),  # the body is shorter than announced
    ({"length": "5", "body": b"data=" + b"A" * 683}, {403}),  # read no further than announced
    ({"body": b""}, {400}),
    ({"body": b"data"}, {400}),
    ({"body": b"v2"}, {400}),
    ({"body": b"&&&&&&"}, {400}),
    ({"body": b"DATA=abc"}, {400}),
    ({"body": b"V2=abc"}, {400}),
    ({"body": b"d%61ta=abc"}, {400}),  # field names are not unescaped
    ({"body": b"data="}, {403}),
    ({"body": b"v2="}, {403}),
    ({"body": b"data=&v2=" + transport.encode_field(b"WK2Q" + bytes(100)).encode()}, {403}),
    ({"body": b"data=%"}, {403}),
    ({"body": b"data=%zz%00"}, {403}),
    ({"body": b"data=\xff\xfe\x00"}, {403}),
    ({"body": b"data=" + b"A" * 682 + b"=="}, {403}),  # 511 bytes
    ({"body": b"data=" + b"A" * 684}, {403}),  # 513 bytes
    ({"body": b"data=" + b"A" * 3414}, {403}),  # 2560 bytes: over MAX_PACKET
    ({"body": b"data=" + b"A" * 8187}, {403}),
    ({"body": b"data=" + b"!" * 683}, {403}),
    ({"body": b"data=" + b"+" * 683}, {403}),  # '+' is a space in a form
    ({"body": b"data=" + b"/" * 683}, {403}),  # standard Base64, not URL-safe
    ({"body": b"data=" + b"A" * 682 + b"%"}, {403}),
    ({"body": b"v2=" + b"A" * 200}, {403}),  # zero bytes: no magic
    ({"body": b"v2=" + transport.encode_field(b"WK2Q" + bytes(72)).encode()}, {403}),  # no body
    ({"body": b"v2=" + transport.encode_field(b"WK2Q" + bytes(2121)).encode()}, {403}),
    ({"body": b"v2=" + transport.encode_field(b"WK2R" + bytes(100)).encode()}, {403}),  # reply
    ({"body": b"v2=" + b"V0syUQ" * 1300}, {403}),  # longer than any v2 packet
    ({"body": os.urandom(2000)}, {400, 403}),
]


@pytest.mark.parametrize(("kw", "statuses"), JUNK_REQUESTS)
def test_junk_gets_a_short_4xx_and_never_reaches_the_spool(
    site: Site, monkeypatch: pytest.MonkeyPatch, kw: dict[str, Any], statuses: set[int]
) -> None:
    assert_refused(site.call(monkeypatch, **kw), statuses)
    assert site.submitted == [] and site.spooled() == []


def test_anything_of_a_packets_shape_goes_to_webknockd_unchanged(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Wrong keys, truncated or extended by whole blocks, rotated, bit-flipped, zeros: the
    CGI cannot tell, so it relays them byte for byte and returns webknockd's verdict."""
    good = getinfo_packet(site.keys)
    wrong = openports_packet(v1.Keys.generate())
    packets = [wrong, good[:512], good + os.urandom(512), good[512:] + good[:512]]
    packets += [bytes(512), bytes(transport.MAX_PACKET), os.urandom(1024)]
    for bit in range(0, len(good) * 8, 331):
        flipped = bytearray(good)
        flipped[bit // 8] ^= 1 << (bit % 8)
        packets.append(bytes(flipped))
    with site.play(answers(403)) as daemon:
        for packet in packets:
            status, headers, body, log = site.call(monkeypatch, data(packet))
            assert (status, body, log) == (403, b"", ""), log
            assert "X-Webknock-Error" not in headers
    assert [r.packet for r in daemon.requests()] == packets
    assert site.spooled() == []


def test_hostile_headers_are_relayed_harmless(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the headers hold, the frame stays one header per line, bounded, printable."""
    hostile = {
        "HTTP_X_FORWARDED_FOR": "203.0.113.5\nagent=forged\n\nrest" + "," * 5000,
        "HTTP_USER_AGENT": "\r\n".join(["field=v2"] * 100) + "\x00\udcff",
    }
    remote = "192.0.2.10\nforwarded=198.51.100.1"
    with site.play(answers(403)) as daemon:
        got = site.call(monkeypatch, data(getinfo_packet(site.keys)), remote=remote, extra=hostile)
    assert got[0] == 403
    (req,) = daemon.requests()  # webknockd reads the frame as the CGI meant it
    (frame,) = daemon.frames
    lines = frame.split(b"\n", 6)
    assert [line.partition(b"=")[0] for line in lines[1:6]] == [
        *(h.encode() for h in spool_layout.HEADERS),
        b"",
    ]
    assert req.protocol == "v1" and req.remote == "192.0.2.10?forwarded=198.51.100.1"
    assert req.forwarded.startswith("203.0.113.5?agent=forged??rest,,")
    assert len(req.forwarded) == spool_layout.HEADER_LIMITS["forwarded"]
    assert req.agent.startswith("field=v2??field=v2") and len(req.agent) == 200


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
        ("192.0.2.1", "fe80::1%?", "192.0.2.1", 400),  # a newline, as the CGI relays it
        ("192.0.2.1", "203.0.113.5:4711", "192.0.2.1", 400),
        ("x", "", "192.0.2.1", 500),  # the web server's fault
        ("", "", "192.0.2.1", 500),
    ],
)
def test_forwarded_for_only_from_trusted_proxies(
    remote: str, xff: str, trusted: str, expected: str | int
) -> None:
    """What webknockd makes of the addresses the CGI relays (webknock.addresses)."""
    import ipaddress

    nets = (ipaddress.ip_network(trusted, strict=False),)
    if isinstance(expected, int):
        with pytest.raises(addresses.AddressError) as info:
            addresses.client_address(remote, xff, nets)
        assert info.value.status == expected
    else:
        assert str(addresses.client_address(remote, xff, nets)) == expected
        untrusted = addresses.client_address(remote, xff, ())
        assert untrusted == addresses.parse_address(remote)


def test_a_config_the_cgi_cannot_read_is_500_and_spools_nothing(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.config.write_text("[server]\nspool_dir = var/spool\n")
    status, _, body, log = site.call(monkeypatch, data(getinfo_packet(site.keys)))
    assert (status, body) == (500, b"") and "configuration" in log and str(site.config) in log
    assert site.submitted == [] and site.spooled() == []


@pytest.mark.parametrize(
    ("target", "error"),
    [
        ("write_request", OSError(errno.ENOSPC, "No space left on device")),
        ("write_request", OSError(errno.EROFS, "Read-only file system")),
        ("install_bell", OSError(errno.EMFILE, "Too many open files")),
        ("install_bell", OSError(errno.ENOENT, "No such file or directory")),  # no waits/
        ("install_bell", OSError(errno.EEXIST, "File exists")),
    ],
)
def test_spool_failure_is_503_never_success(
    site: Site, monkeypatch: pytest.MonkeyPatch, target: str, error: OSError
) -> None:
    def fail(*args: Any, **kw: Any) -> None:
        raise error

    monkeypatch.setattr(spool, target, fail)
    status, _, body, log = site.call(monkeypatch, data(openports_packet(site.keys)))
    assert status == 503 and body == b"" and str(error.strerror) in log, log
    assert site.spooled() == [], "the doorbell is gone with the request"


def test_the_daemon_answers_and_the_cgi_replies_at_once(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bell is up before the request exists, so a daemon faster than the CGI is never
    missed; the CGI wakes on the answer, not after result_timeout (1 s here)."""
    with site.play(answers(200, body=b"sealed reply")):
        started = time.monotonic()
        status, _, body, log = site.call(monkeypatch, data(openports_packet(site.keys)))
    assert (status, body) == (200, b"sealed reply"), log
    assert time.monotonic() - started < 0.9, "woken by the answer, not by the timeout"
    assert site.spooled() == []


def test_a_daemon_faster_than_the_cgi_is_not_missed(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer arrives while the CGI is still writing the request."""

    def write_request(requests: str, request_id: str, payload: bytes) -> str:
        path = WRITE_REQUEST(requests, request_id, payload)
        os.unlink(path)  # claimed
        bell = os.path.join(site.cfg.spool.waits, request_id)
        assert doorbell.deliver(bell, frozenset({os.getuid()}), doorbell.encode_answer(429))
        return path

    monkeypatch.setattr(spool, "write_request", write_request)
    status, _, body, log = site.call(monkeypatch, data(openports_packet(site.keys)))
    assert (status, body) == (429, b""), log


@pytest.mark.parametrize(
    "written",
    [b"", b"200", b"200 \xff\n", b"200 " + b"x" * (doorbell.MAX_NOTE + 1) + b"\n", b"504 \nx"],
)
def test_a_bad_or_missing_answer_is_failure_never_success(
    site: Site, monkeypatch: pytest.MonkeyPatch, written: bytes
) -> None:
    """A bell closed without an answer, or written by someone else with junk: 500."""
    with site.play(lambda _rid, _frame: written):
        status, headers, body, log = site.call(monkeypatch, data(openports_packet(site.keys)))
    assert (status, body) == (500, b""), log
    assert "X-Webknock-Error" not in headers


def test_a_request_that_cannot_be_withdrawn_is_504_never_success(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No answer, and the request cannot be taken back (say, EACCES): it may still be
    applied, so the client hears 504, and the CGI does not wait on."""
    unlink = os.unlink

    def stuck(path: Any, *args: Any, **kw: Any) -> None:
        if str(path).endswith(spool_layout.REQUEST_SUFFIX):
            raise PermissionError(13, "Permission denied")
        unlink(path, *args, **kw)

    monkeypatch.setattr(os, "unlink", stuck)
    started = time.monotonic()
    status, _, body, log = site.call(monkeypatch, data(openports_packet(site.keys)))
    assert status == 504 and body == b"", log
    assert time.monotonic() - started < site.cfg.result_timeout + 0.8, "one wait, not two"
    assert len(os.listdir(site.cfg.spool.requests)) == 1  # still there for webknockd
    assert os.listdir(site.cfg.spool.waits) == []


def test_a_claimed_request_gets_a_second_wait(site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    """The daemon claimed the request and answers after the first result_timeout: the CGI
    cannot withdraw it any more, so it waits once more and reports the truth."""
    late = site.cfg.result_timeout + 0.3
    with site.play(answers(200, body=b"granted"), delay=late) as daemon:
        status, _, body, log = site.call(monkeypatch, data(openports_packet(site.keys)))
    assert (status, body) == (200, b"granted"), log
    assert daemon.delivered == [True]


def test_many_cgis_at_once_each_get_their_own_answer(site: Site) -> None:
    """Each doorbell carries the answer to its own request, whatever the order."""

    def echo(rid: str, frame: bytes) -> bytes:
        return doorbell.encode_answer(200, body=parse_request(rid, frame).agent.encode())

    bodies = {n: data(getinfo_packet(site.keys)) for n in range(1, 9)}
    got: dict[int, bytes] = {}
    with site.play(echo), contextlib.ExitStack() as stack:  # CGI processes, all at once
        procs = {
            n: stack.enter_context(
                subprocess.Popen(
                    [sys.executable, "-c", "from webknock.cgi.relay import main; main()"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env={
                        "REQUEST_METHOD": "POST",
                        "CONTENT_LENGTH": str(len(body)),
                        "REMOTE_ADDR": f"192.0.2.{n}",
                        "HTTP_USER_AGENT": f"agent-{n}",
                        "WEBKNOCK_CONFIG": str(site.config),
                        "PYTHONPATH": str(REPO),
                    },
                )
            )
            for n, body in bodies.items()
        }
        for n, proc in procs.items():
            out, err = proc.communicate(bodies[n], timeout=30)
            assert proc.returncode == 0 and err == b"", err
            got[n] = out.partition(b"\r\n\r\n")[2]
    assert got == {n: f"agent-{n}".encode() for n in bodies}
    assert site.spooled() == []


def test_log_line_cannot_be_forged(monkeypatch: pytest.MonkeyPatch) -> None:
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("REMOTE_ADDR", "192.0.2.10")
    cgi.warn("bad\nwebknock.cgi: 192.0.2.1: 200: forged" + "x" * 1000)
    line = err.getvalue()
    assert line.count("\n") == 1 and len(line) < 450 and "192.0.2.10" in line


def test_client_gone_is_not_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
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


def test_an_unexpected_error_is_500_without_a_traceback(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kw: Any) -> bytes:
        raise KeyError("surprise")

    monkeypatch.setattr(spool, "encode_request", broken)
    status, _, body, log = site.call(monkeypatch, data(getinfo_packet(site.keys)))
    assert (status, body) == (500, b"") and "internal error: KeyError" in log
    assert "Traceback" not in log and site.spooled() == []


def test_as_the_web_server_runs_it(tmp_path: Path, vector_keys: v1.Keys) -> None:
    """A child process per request, as fcgiwrap runs it: exact bytes, no traceback anywhere."""
    config = write_instance(tmp_path, vector_keys)
    prepare_spool(load(config).spool, WEB.pw_gid)
    bodies = [b"", b"data=" + b"A" * 684, b"\x00" * 100, "data=\u00e9".encode(), b"v2=WK2Q"]
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
            [sys.executable, "-c", "from webknock.cgi.relay import main; main()"],
            input=body,
            capture_output=True,
            env=env,
            timeout=30,
            check=True,
        )
        assert proc.stdout.startswith(b"Status: 4") and proc.stdout.endswith(b"\r\n\r\n")
        assert b"Traceback" not in proc.stderr and proc.stderr.count(b"\n") == 1
        assert proc.stderr.startswith(b"webknock.cgi: 2001:db8::10: 4")
    spool_paths = load(config).spool
    assert os.listdir(spool_paths.requests) == [] and os.listdir(spool_paths.waits) == []
