"""The client against a fake v1 server on 127.0.0.1 (http.server in a thread, real codec, real keys).

Covers the request count (first knock 2 requests, cached knock 1), the 403 fallback to getinfo,
every HTTP status mapped to an exit code and a message, undecodable replies, timeouts,
refused connections, TLS failures and the address-family pin.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from webknock.client import cli, net
from webknock.client.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_UNREACHABLE,
)
from webknock.keys import format_keys
from webknock.protocol import messages, transport, v1

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Behaviour:
    """What the fake server does; tests change it between requests."""

    tcp: list[int] = field(default_factory=lambda: [22, 2222])
    udp: list[int] = field(default_factory=lambda: [51820])
    maxtime: int = 3600
    status: int = 200  # anything else: a bare status
    note: str = ""  # X-Webknock-Error
    body: bytes | None = None  # replaces the reply packet
    delay: float = 0.0
    refuse: str = ""  # openports answers success:false with this error
    see_ip: str | None = None  # the address getinfo reports (default: the real peer)


class FakeServer:
    """The parts of the webknock CGI a client can observe, on 127.0.0.1 or ::1."""

    def __init__(self, keys: v1.Keys, host: str = "127.0.0.1") -> None:
        self.keys = keys
        self.behaviour = Behaviour()
        self.log: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                outer.handle(self)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family})
        self.httpd: ThreadingHTTPServer = server_cls((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, host: str = "127.0.0.1", scheme: str = "http") -> str:
        return f"{scheme}://{host}:{self.port}/webknock"

    def apis(self) -> list[str]:
        with self.lock:
            return [r["api"] for r in self.log]

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        b = self.behaviour
        body = h.rfile.read(int(h.headers.get("Content-Length", "0")))
        peer = h.client_address[0]
        entry: dict[str, Any] = {
            "api": "?",
            "peer": peer,
            "host": h.headers.get("Host"),
            "ua": h.headers.get("User-Agent"),
        }
        with self.lock:
            self.log.append(entry)
        if b.delay:
            time.sleep(b.delay)
        try:
            field_value = parse_qs(body.decode())["data"][0].encode()
            data = v1.decode(self.keys, transport.decode_field(field_value))
            req = messages.parse_request(data, time.time(), 15)
        except (KeyError, ValueError):
            return self.send(h, 403, b"")
        entry["api"] = "getinfo" if isinstance(req, messages.GetInfo) else "openports"
        entry["request"] = json.loads(data)
        if b.status != 200:
            return self.send(h, b.status, b"", b.note)
        if b.body is not None:
            return self.send(h, 200, b.body)
        if isinstance(req, messages.GetInfo):
            reply: dict[str, Any] = {
                "success": True,
                "tcp": b.tcp,
                "udp": b.udp,
                "maxtime": b.maxtime,
                "ip": b.see_ip or peer,
            }
        elif str(req.ip) != peer:
            return self.send(h, 403, b"", "address mismatch: the server sees another address")
        elif b.refuse:
            reply = {"success": False, "error": b.refuse, "errorcode": "FIREWALL"}
        elif not [
            (proto, num) for proto, num in req.ports if num in (b.tcp if proto == "tcp" else b.udp)
        ]:
            reply = {"success": False, "error": "none offered", "errorcode": "NOPORTS"}
        else:
            seconds = min(req.time, b.maxtime) if req.time > 0 else b.maxtime
            reply = {"success": True, "expires": int(time.time()) + seconds}
        self.send(h, 200, v1.encode(self.keys, messages.dumps(reply)))

    @staticmethod
    def send(h: BaseHTTPRequestHandler, status: int, body: bytes, note: str = "") -> None:
        h.send_response(status)
        h.send_header("Content-Length", str(len(body)))
        if note:
            h.send_header("X-Webknock-Error", note)
        h.end_headers()
        h.wfile.write(body)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def keys() -> v1.Keys:
    return v1.Keys.generate()


@pytest.fixture
def server(keys: v1.Keys) -> Iterator[FakeServer]:
    s = FakeServer(keys)
    yield s
    s.close()


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    logger = logging.getLogger("webknock")  # cli.main() sets these up for its own stderr
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


def make_profile(tmp: Path, keys: v1.Keys, url: str, extra: str = "") -> Path:
    keys_file = tmp / "p.keys"
    keys_file.write_text(format_keys(keys))
    os.chmod(keys_file, 0o600)
    path = tmp / "p.ini"
    path.write_text(
        f"[client]\nurl = {url}\nkeys_file = p.keys\nports = tcp/22, udp/51820\n"
        f"timeout = 2\n{extra}"
    )
    return path


def knock(profile: Path, *args: str) -> int:
    return cli.main(["--config", str(profile), *args, "knock"])


def test_first_knock_two_requests_then_cached_one(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = make_profile(tmp_path, keys, server.url())
    assert knock(profile) == EXIT_OK
    assert server.apis() == ["getinfo", "openports"]
    out = capsys.readouterr().out
    assert out.startswith("opened tcp/22, udp/51820 for 127.0.0.1 until ") and "(3600 s)" in out
    req = server.log[1]["request"]
    assert req["ip"] == "127.0.0.1" and req["time"] == 3600
    assert req["ports"] == [{"proto": "TCP", "num": 22}, {"proto": "UDP", "num": 51820}]
    assert server.log[0]["ua"] == net.USER_AGENT

    assert knock(profile) == EXIT_OK
    assert server.apis() == ["getinfo", "openports", "openports"], "cached: one request"
    assert knock(profile, "--no-cache") == EXIT_OK
    assert server.apis()[3:] == ["getinfo", "openports"]


def test_json_output_and_time_cap(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.maxtime = 60
    profile = make_profile(tmp_path, keys, server.url(), "time = 600\n")
    assert cli.main(["--config", str(profile), "knock", "--json"]) == EXIT_OK
    result = json.loads(capsys.readouterr().out)
    assert result["ok"] is True and result["errors"] == []
    (grant,) = result["grants"]
    assert grant["ports"] == ["tcp/22", "udp/51820"] and grant["requests"] == 2
    assert 58 <= grant["seconds"] <= 60 and grant["ip"] == "127.0.0.1"
    assert server.log[1]["request"]["time"] == 60, "time capped by the server's maxtime"


def test_cached_address_refused_falls_back_to_getinfo_once(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, cache_home: Path
) -> None:
    profile = make_profile(tmp_path, keys, server.url())
    assert knock(profile) == EXIT_OK
    (entry,) = (cache_home / "webknock").iterdir()
    cached = json.loads(entry.read_text())
    entry.write_text(json.dumps({**cached, "ip": "192.0.2.99"}))  # our public address moved
    assert knock(profile) == EXIT_OK
    assert server.apis()[2:] == ["openports", "getinfo", "openports"]
    assert server.log[2]["request"]["ip"] == "192.0.2.99"
    assert json.loads(entry.read_text())["ip"] == "127.0.0.1", "cache refreshed"

    entry.write_text(json.dumps({**cached, "ip": "192.0.2.99"}))
    server.behaviour.see_ip = "198.51.100.7"  # getinfo and openports disagree (broken proxy)
    assert knock(profile) == EXIT_REFUSED
    assert server.apis()[5:] == ["openports", "getinfo", "openports"], "falls back only once"


def test_ports_not_offered(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.udp = []
    profile = make_profile(tmp_path, keys, server.url())
    assert knock(profile) == EXIT_OK
    captured = capsys.readouterr()
    assert "does not offer udp/51820" in captured.err and "opened tcp/22 for" in captured.out
    assert knock(profile, "--ports", "tcp/2223") == EXIT_REFUSED
    assert "none of the ports asked for (tcp/2223) is offered" in capsys.readouterr().err
    assert server.apis()[-1] != "openports" or len(server.apis()) == 2


def test_offer_changed_since_cached(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = make_profile(tmp_path, keys, server.url())
    assert knock(profile) == EXIT_OK
    server.behaviour.tcp, server.behaviour.udp = [2222], []
    assert knock(profile) == EXIT_REFUSED
    assert server.apis()[2:] == ["openports", "getinfo"], "NOPORTS: getinfo again, once"
    assert "(it offers tcp/2222)" in capsys.readouterr().err


def test_empty_ports_means_all_offered(tmp_path: Path, keys: v1.Keys, server: FakeServer) -> None:
    profile = make_profile(tmp_path, keys, server.url())
    profile.write_text(profile.read_text().replace("ports = tcp/22, udp/51820\n", ""))
    assert knock(profile) == EXIT_OK
    assert [p["num"] for p in server.log[1]["request"]["ports"]] == [22, 2222, 51820]


@pytest.mark.parametrize(
    ("status", "note", "code", "words"),
    [
        (400, "", EXIT_REFUSED, "malformed (400 Bad Request)"),
        (403, "", EXIT_REFUSED, "wrong keys, a clock"),
        (403, "clock skew: request time is +40s off", EXIT_REFUSED, "(403): clock skew: request"),
        (404, "", EXIT_REFUSED, "no webknock at this URL (404"),
        (405, "", EXIT_REFUSED, "(405 Method Not Allowed)"),
        (413, "", EXIT_REFUSED, "too large (413"),
        (429, "", EXIT_REFUSED, "throttles this address"),
        (500, "", EXIT_SERVER, "misconfigured (500"),
        (503, "", EXIT_SERVER, "nothing was opened"),
        (504, "", EXIT_SERVER, "webknockd did not answer in time (504"),
        (418, "", EXIT_SERVER, "answered HTTP 418"),
    ],
)
def test_http_status_to_exit_code(
    tmp_path: Path,
    keys: v1.Keys,
    server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    status: int,
    note: str,
    code: int,
    words: str,
) -> None:
    server.behaviour.status, server.behaviour.note = status, note
    assert knock(make_profile(tmp_path, keys, server.url())) == code
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1, err
    assert server.apis() == ["getinfo"]


def test_refusal_reply(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.refuse = "iptables: no chain"
    assert knock(make_profile(tmp_path, keys, server.url())) == EXIT_REFUSED
    assert "did not open the ports: iptables: no chain (FIREWALL)" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (b"<html>hello</html>", "undecodable reply from 127.0.0.1: 18 bytes is not a v1 packet"),
        (b"", "0 bytes is not a v1 packet"),
        (os.urandom(512), "undecodable reply (not sealed with our keys): "),
        (b"x" * 5000, "is not a v1 packet"),
    ],
)
def test_undecodable_reply(
    tmp_path: Path,
    keys: v1.Keys,
    server: FakeServer,
    capsys: pytest.CaptureFixture[str],
    body: bytes,
    words: str,
) -> None:
    server.behaviour.body = body
    assert knock(make_profile(tmp_path, keys, server.url())) == EXIT_SERVER
    assert words in capsys.readouterr().err


def test_sealed_reply_that_is_not_json(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.body = v1.encode(keys, b"not json")
    assert knock(make_profile(tmp_path, keys, server.url())) == EXIT_SERVER
    assert "sealed content is not JSON" in capsys.readouterr().err
    server.behaviour.body = v1.encode(keys, b'{"success": true, "tcp": "22"}')
    assert knock(make_profile(tmp_path, keys, server.url())) == EXIT_SERVER
    assert "unexpected getinfo reply" in capsys.readouterr().err


def test_wrong_keys_are_refused(
    tmp_path: Path, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert knock(make_profile(tmp_path, v1.Keys.generate(), server.url())) == EXIT_REFUSED
    assert "403 Forbidden" in capsys.readouterr().err


def test_timeout(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.delay = 1.5
    start = time.monotonic()
    assert knock(make_profile(tmp_path, keys, server.url()), "--timeout", "0.3") == EXIT_UNREACHABLE
    assert time.monotonic() - start < 1.4
    assert "accepted the connection but did not answer within 0.3s" in capsys.readouterr().err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_connection_refused(
    tmp_path: Path, keys: v1.Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}/webknock"
    assert knock(make_profile(tmp_path, keys, url)) == EXIT_UNREACHABLE
    assert "cannot connect to 127.0.0.1: Connection refused" in capsys.readouterr().err
    assert knock(make_profile(tmp_path, keys, url), "--family", "ipv4") == EXIT_UNREACHABLE
    assert "cannot connect to 127.0.0.1 (127.0.0.1): Connection refused" in capsys.readouterr().err


def test_unresolvable_host(
    tmp_path: Path, keys: v1.Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    url = "http://no-such-host.invalid/webknock"
    assert knock(make_profile(tmp_path, keys, url), "--family", "ipv4") == EXIT_UNREACHABLE
    assert "cannot resolve no-such-host.invalid (IPv4)" in capsys.readouterr().err
    assert knock(make_profile(tmp_path, keys, url)) == EXIT_UNREACHABLE
    assert "no-such-host.invalid" in capsys.readouterr().err


def test_bad_config_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.ini"
    bad.write_text("[client]\nurl = gopher://x/\nkeys_file = k\n")
    assert knock(bad) == EXIT_CONFIG
    assert f"{bad}: [client] url:" in capsys.readouterr().err
    assert knock(tmp_path / "missing.ini") == EXIT_CONFIG
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--family", "inet", "knock"])
    assert exit_info.value.code == EXIT_CONFIG


def test_redirect_is_reported(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.status, server.behaviour.note = 301, ""
    assert knock(make_profile(tmp_path, keys, server.url())) == EXIT_SERVER
    assert "redirects (301)" in capsys.readouterr().err


def test_family_pin_keeps_host_header(tmp_path: Path, keys: v1.Keys, server: FakeServer) -> None:
    """--family ipv4 connects to the resolved address and still sends Host: localhost:PORT."""
    profile = make_profile(tmp_path, keys, server.url("localhost"))
    assert knock(profile, "--family", "ipv4") == EXIT_OK
    assert [(e["peer"], e["host"]) for e in server.log] == [
        ("127.0.0.1", f"localhost:{server.port}")
    ] * 2


def test_family_ipv6_pin(tmp_path: Path, keys: v1.Keys, monkeypatch: pytest.MonkeyPatch) -> None:
    """A name with v4 and v6 addresses: ipv6 reaches the v6 listener, both knocks twice."""
    v6 = FakeServer(keys, "::1")
    try:
        real = socket.getaddrinfo

        def fake(host: Any, port: Any, family: int = 0, *args: Any) -> Any:
            if host == "dual.test":
                out = []
                if family in (socket.AF_UNSPEC, socket.AF_INET6):
                    out += real("::1", port, socket.AF_INET6, *args)
                if family in (socket.AF_UNSPEC, socket.AF_INET):
                    out += real("127.0.0.1", port, socket.AF_INET, *args)
                return out
            return real(host, port, family, *args)

        monkeypatch.setattr(socket, "getaddrinfo", fake)
        profile = make_profile(tmp_path, keys, v6.url("dual.test"))
        assert knock(profile, "--family", "ipv6") == EXIT_OK
        assert {e["peer"] for e in v6.log} == {"::1"}
        assert {e["host"] for e in v6.log} == {f"dual.test:{v6.port}"}
        # both: the v4 knock finds nothing listening on 127.0.0.1:PORT -> cannot reach
        assert knock(profile, "--family", "both") == EXIT_UNREACHABLE
        assert v6.apis()[-1:] == ["openports"]
    finally:
        v6.close()


def make_cert(tmp: Path) -> tuple[Path, Path]:
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def test_tls_verify_and_pin(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """HTTPS with the pin: SNI and the certificate check use the host name, not the address."""
    cert, key = make_cert(tmp_path)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.httpd.socket = ctx.wrap_socket(server.httpd.socket, server_side=True)
    url = server.url("localhost", "https")
    for family in ("any", "ipv4"):
        profile = make_profile(tmp_path, keys, url, f"verify = {cert}\n")
        assert knock(profile, "--family", family, "--no-cache") == EXIT_OK, capsys.readouterr()
    profile = make_profile(tmp_path, keys, url)  # verify = yes: the system CAs do not know it
    assert knock(profile, "--family", "ipv4") == EXIT_UNREACHABLE
    assert "TLS failure with localhost (127.0.0.1): " in capsys.readouterr().err
    profile = make_profile(tmp_path, keys, server.url("127.0.0.1", "https"), f"verify = {cert}\n")
    assert knock(profile) == EXIT_UNREACHABLE, "the certificate is for localhost only"
    assert "TLS failure" in capsys.readouterr().err
    profile = make_profile(tmp_path, keys, url, "verify = no\n")
    assert knock(profile, "--family", "ipv4") == EXIT_OK


def test_plain_http_server_with_https_url(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    assert knock(make_profile(tmp_path, keys, server.url(scheme="https"))) == EXIT_UNREACHABLE
    assert "TLS failure with 127.0.0.1" in capsys.readouterr().err


def test_info(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = make_profile(tmp_path, keys, server.url())
    assert cli.main(["--config", str(profile), "info"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "offers tcp/22, tcp/2222, udp/51820 for up to 3600 s; sees this host as 127.0.0.1" in out
    assert cli.main(["info", "--json", "--config", str(profile)]) == EXIT_OK
    (found,) = json.loads(capsys.readouterr().out)["servers"]
    assert found["ip"] == "127.0.0.1" and found["maxtime"] == 3600
    assert server.apis() == ["getinfo", "getinfo"]


def test_exec_returns_command_status_and_renews(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.maxtime = 3  # renewal every second
    profile = make_profile(tmp_path, keys, server.url())
    rc = cli.main(["--config", str(profile), "exec", "--", "sh", "-c", "sleep 2.5; exit 7"])
    assert rc == 7
    assert "stopped" not in capsys.readouterr().err, "the command's end says it, not us"
    assert server.apis()[:2] == ["getinfo", "openports"]
    assert server.apis().count("openports") >= 3, "renewed while the command ran"
    assert cli.main(["--config", str(profile), "exec", "--", "/nonexistent/cmd"]) == 127
    server.behaviour.status = 403
    marker = tmp_path / "ran"
    rc = cli.main(["--config", str(profile), "--no-cache", "exec", "--", "touch", str(marker)])
    assert rc == EXIT_REFUSED and not marker.exists(), "no command without a grant"


def test_keep_renews_and_stops_on_sigterm(
    tmp_path: Path, keys: v1.Keys, server: FakeServer, cache_home: Path
) -> None:
    server.behaviour.maxtime = 3
    profile = make_profile(tmp_path, keys, server.url())
    env = {**os.environ, "PYTHONPATH": str(REPO), "XDG_CACHE_HOME": str(cache_home)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "webknock.client",
            "--config",
            str(profile),
            "keep",
            "--poll",
            "0.2",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 15
        while server.apis().count("openports") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        server.behaviour.status = 504
        time.sleep(1.5)
        server.behaviour.status = 200
        time.sleep(2.5)
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert server.apis().count("openports") >= 4
    assert "knock failed (1 in a row): the server's webknockd did not answer" in err
    assert "knock works again after" in err
    assert "SIGTERM received: stopping" in err and err.rstrip().endswith("stopped")


@pytest.mark.parametrize("command", [[], ["knock"], ["keep"], ["exec"], ["info"]])
def test_help_documents_exit_codes(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "exit codes:" in out and "3  cannot reach the server" in out


def test_exec_without_command(tmp_path: Path, keys: v1.Keys, server: FakeServer) -> None:
    profile = make_profile(tmp_path, keys, server.url())
    assert cli.main(["--config", str(profile), "exec", "--"]) == EXIT_CONFIG
    assert server.apis() == []


def test_local_address_polls_reuse_name_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real = net.resolve

    def counting(host: str, port: int, family: str) -> list[str]:
        calls.append(host)
        return real(host, port, family)

    monkeypatch.setattr(net, "resolve", counting)
    t = net.Transport("http://localhost:8/webknock", "ipv4", True, 1.0)
    assert [t.local_address() for _ in range(3)] == ["127.0.0.1"] * 3
    assert calls == ["localhost"], "one resolution for three polls"
    monkeypatch.setattr(net, "RESOLVE_TTL", 0.0)
    t.local_address()
    assert len(calls) == 2
    assert net.Transport("http://no-such-host.invalid/", "ipv4", True, 1).local_address() is None
