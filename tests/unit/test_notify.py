"""Mail and webhook notifications through the real engine: real SMTP (aiosmtpd) and HTTP
servers on 127.0.0.1, dead servers, retries, batching, settings validation."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import http.server
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from tests.conftest import write_instance
from tests.fakes import MemoryFirewall
from webknock import config
from webknock.addresses import Address
from webknock.config import ConfigError
from webknock.protocol.v1 import Keys
from webknock.server.engine import GrantEngine
from webknock.server.events import Event, EventBus, Sink
from webknock.server.grants import GrantRequest
from webknock.server.notify import load_notify, mail_sender, sinks_for, webhook_sender
from webknock.server.notify.settings import NotifySettings, read_credentials
from webknock.server.notify.worker import BackgroundSender
from webknock.server.state import StateStore

A = ipaddress.ip_address("192.0.2.10")
NOW = time.time()
FAST = 0.05  # emit must return well within this (a bound, not a benchmark)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def req(
    ip: Address = A,
    ports: tuple[tuple[str, int], ...] = (("tcp", 22),),
    rid: str = "a" * 32,
    ua: str = "webknock-client/1.0 (test)",
) -> GrantRequest:
    return GrantRequest(rid, ip, ports, 600, "knock", user_agent=ua)


class Inbox:
    """aiosmtpd handler that keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []
        self.envelopes: list[Any] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.envelopes.append(envelope)
        msg = email.message_from_bytes(envelope.content, policy=email.policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append(msg)
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Inbox, int]]:
    inbox, port = Inbox(), free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port)
    ctl.start()
    try:
        yield inbox, port
    finally:
        ctl.stop()


def settings(tmp_path: Path, **kw: Any) -> NotifySettings:
    base = NotifySettings(
        source=tmp_path / "webknock.ini",
        instance="lab",
        email_to=("admin@example.org",),
        email_from="webknock@example.org",
        smtp_host="127.0.0.1",
        smtp_timeout=2.0,
        batch_window=0.3,
        retries=2,
        retry_delay=FAST,
    )
    return replace(base, **kw)


def engine_with(tmp_path: Path, *sinks: Sink) -> GrantEngine:
    return GrantEngine("lab", StateStore(tmp_path / "s.db"), MemoryFirewall(), EventBus(*sinks))


class Timed:
    """Wraps a sink and records how long each call took (the engine waits that long)."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.durations: list[float] = []

    def __call__(self, event: Event) -> None:
        started = time.monotonic()
        self.sink(event)
        self.durations.append(time.monotonic() - started)


def timed_open(engine: GrantEngine, requests: Sequence[GrantRequest], now: float) -> float:
    """Open through the engine; return the longest time one sink call took."""
    (timed,) = [s for s in engine.events.sinks if isinstance(s, Timed)]
    timed.durations.clear()
    out = engine.open(requests, now)
    assert all(o.ok for o in out.values()) and timed.durations
    return max(timed.durations)


# -- mail ------------------------------------------------------------------------------------


def test_new_grant_sends_one_mail_with_address_ports_and_agent(
    tmp_path: Path, smtp: tuple[Inbox, int]
) -> None:
    inbox, port = smtp
    sender = mail_sender(settings(tmp_path, smtp_port=port))
    engine = engine_with(tmp_path, sender)
    engine.open([req(ports=(("tcp", 22), ("udp", 51820)))], NOW)
    assert wait_for(lambda: len(inbox.messages) == 1)
    sender.close()
    (msg,) = inbox.messages
    assert msg["To"] == "admin@example.org" and msg["From"] == "webknock@example.org"
    assert msg["Subject"] == "webknock lab: 192.0.2.10 opened tcp/22, udp/51820"
    body = msg.get_content()
    assert "192.0.2.10" in body and "tcp/22" in body and "udp/51820" in body
    assert "webknock-client/1.0 (test)" in body
    assert inbox.envelopes[0].rcpt_tos == ["admin@example.org"]
    assert sender.sent == 1 and sender.failed == 0


def test_control_characters_of_the_agent_never_reach_the_mail(
    tmp_path: Path, smtp: tuple[Inbox, int]
) -> None:
    inbox, port = smtp
    sender = mail_sender(settings(tmp_path, smtp_port=port, batch_window=0))
    engine_with(tmp_path, sender).open([req(ua="evil\x1b[2J\rBcc: x@example.org")], NOW)
    assert wait_for(lambda: len(inbox.messages) == 1)
    sender.close()
    (msg,) = inbox.messages
    assert "user agent: evil?[2J?Bcc: x@example.org" in msg.get_content()
    assert msg["Bcc"] is None and inbox.envelopes[0].rcpt_tos == ["admin@example.org"]


def test_renewals_send_no_mail(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    sender = mail_sender(settings(tmp_path, smtp_port=port, batch_window=0.05))
    engine = engine_with(tmp_path, sender)
    engine.open([req()], NOW)
    assert wait_for(lambda: len(inbox.messages) == 1)
    for i in range(1, 4):
        engine.open([req()], NOW + i)  # renewals of a live grant
    sender.close()
    assert len(inbox.messages) == 1 and sender.sent == 1


def test_burst_of_opens_is_one_mail(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    sender = mail_sender(settings(tmp_path, smtp_port=port, batch_window=5.0))
    engine = engine_with(tmp_path, sender)
    for i in range(20):  # twenty drains, as twenty separate knocks would be
        engine.open([req(ip=ipaddress.ip_address(f"198.51.100.{i + 1}"), rid=f"{i:032x}")], NOW)
    assert wait_for(lambda: sender.sent == 1, timeout=20)
    sender.close()
    (msg,) = inbox.messages
    assert msg["Subject"] == "webknock lab: 20 grant(s) for 20 addresses"
    lines = msg.get_content().splitlines()
    assert all(f"198.51.100.{i + 1}" in lines for i in range(20))


def test_mail_is_sent_at_close_without_waiting_for_the_window(
    tmp_path: Path, smtp: tuple[Inbox, int]
) -> None:
    inbox, port = smtp
    sender = mail_sender(settings(tmp_path, smtp_port=port, batch_window=600))
    engine_with(tmp_path, sender).open([req()], NOW)
    started = time.monotonic()
    sender.close(timeout=10)
    assert time.monotonic() - started < 5
    assert len(inbox.messages) == 1


def test_closed_smtp_port_delays_nothing_and_is_retried_then_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="webknock.server.notify")
    sender = mail_sender(settings(tmp_path, smtp_port=free_port(), batch_window=0))
    engine = engine_with(tmp_path, Timed(sender))
    assert timed_open(engine, [req()], NOW) < FAST
    assert wait_for(lambda: sender.failed == 1)
    sender.close()
    attempts = [r for r in caplog.records if "failed" in r.getMessage()]
    assert [r.levelno for r in attempts] == [logging.WARNING, logging.WARNING]
    (gave_up,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert "gave up after 3 attempt(s)" in gave_up.getMessage()
    assert "open 192.0.2.10 tcp/22" in gave_up.getMessage()


def test_silent_smtp_server_delays_nothing_and_is_retried_a_bounded_number_of_times(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A server that accepts the connection but never says a word."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        port = listener.getsockname()[1]
        sender = mail_sender(
            settings(tmp_path, smtp_port=port, smtp_timeout=0.3, retries=1, batch_window=0.5)
        )
        engine = engine_with(tmp_path, Timed(sender))
        assert timed_open(engine, [req()], NOW) < FAST
        assert timed_open(engine, [req(ip=ipaddress.ip_address("192.0.2.11"))], NOW) < FAST
        assert wait_for(lambda: sender.failed == 1, timeout=15)
        sender.close()
        assert len(accepted) == 2  # 1 + retries, both opens in one batch
        assert sender.sent == 0
        (gave_up,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert "gave up after 2 attempt(s)" in gave_up and "192.0.2.11" in gave_up
    finally:
        stop.set()
        thread.join()
        for conn in accepted:
            conn.close()
        listener.close()


def make_cert(tmp_path: Path) -> tuple[Path, Path]:
    crypto = pytest.importorskip("cryptography", reason="cryptography makes the test cert")
    del crypto
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_tls(tmp_path: Path, security: str) -> None:
    """STARTTLS with a login (AUTH only after TLS), and TLS from the first byte (aiosmtpd
    offers no AUTH there, so without a login)."""
    cert_file, key_file = make_cert(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    logins: list[tuple[bytes, bytes]] = []

    def authenticator(
        server: Any, session: Any, envelope: Any, mechanism: str, data: Any
    ) -> AuthResult:
        assert isinstance(data, LoginPassword)
        logins.append((data.login, data.password))
        return AuthResult(success=data.password == b"s3cret pass")

    creds = tmp_path / "smtp.credentials"
    creds.write_text("[smtp]\nuser = knock@example.org\npassword = s3cret pass\n")
    os.chmod(creds, 0o600)
    inbox, port = Inbox(), free_port()
    login = security == "starttls"
    server_args: dict[str, Any] = (
        {
            "tls_context": tls,
            "require_starttls": True,
            "auth_required": True,
            "authenticator": authenticator,
        }
        if login
        else {"ssl_context": tls}
    )
    ctl = Controller(inbox, hostname="127.0.0.1", port=port, **server_args)
    ctl.start()
    try:
        sender = mail_sender(
            settings(
                tmp_path,
                smtp_port=port,
                smtp_security=security,
                smtp_cafile=cert_file,
                smtp_credentials=creds if login else None,
                batch_window=0,
            )
        )
        engine_with(tmp_path, sender).open([req()], NOW)
        assert wait_for(lambda: sender.sent + sender.failed == 1)
        sender.close()
    finally:
        ctl.stop()
    assert sender.sent == 1 and len(inbox.messages) == 1
    assert logins == ([(b"knock@example.org", b"s3cret pass")] if login else [])


def test_starttls_refuses_an_untrusted_certificate(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert_file, key_file = make_cert(tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(cert_file, key_file)
    inbox, port = Inbox(), free_port()
    ctl = Controller(inbox, hostname="127.0.0.1", port=port, tls_context=tls)
    ctl.start()
    try:
        sender = mail_sender(
            settings(tmp_path, smtp_port=port, smtp_security="starttls", retries=0, batch_window=0)
        )
        engine_with(tmp_path, sender).open([req()], NOW)
        assert wait_for(lambda: sender.failed == 1)
        sender.close()
    finally:
        ctl.stop()
    assert inbox.messages == []
    assert any("CERTIFICATE_VERIFY_FAILED" in r.getMessage() for r in caplog.records)


def test_sendmail_transport(tmp_path: Path) -> None:
    out = tmp_path / "sent.eml"
    script = tmp_path / "sendmail"
    script.write_text(f'#!/bin/sh\necho "$@" > {out}.args\ncat > {out}\n')
    script.chmod(0o755)
    sender = mail_sender(
        settings(tmp_path, mail_transport="sendmail", sendmail=script, batch_window=0)
    )
    engine_with(tmp_path, sender).open([req()], NOW)
    assert wait_for(lambda: sender.sent == 1)
    sender.close()
    assert Path(f"{out}.args").read_text().split() == ["-t", "-oi"]
    msg = email.message_from_bytes(out.read_bytes(), policy=email.policy.default)
    assert msg["To"] == "admin@example.org" and "192.0.2.10" in msg["Subject"]


def test_failing_sendmail_is_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    script = tmp_path / "sendmail"
    script.write_text("#!/bin/sh\necho 'queue unavailable' >&2\nexit 75\n")
    script.chmod(0o755)
    sender = mail_sender(
        settings(tmp_path, mail_transport="sendmail", sendmail=script, batch_window=0)
    )
    engine_with(tmp_path, sender).open([req()], NOW)
    assert wait_for(lambda: sender.failed == 1)
    sender.close()
    (err,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "exited 75: queue unavailable" in err and "3 attempt(s)" in err


# -- the worker --------------------------------------------------------------------------------


def test_full_queue_drops_and_logs_but_never_blocks(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    delivered: list[int] = []

    def slow(events: Sequence[Event]) -> None:
        release.wait(10)
        delivered.append(len(events))

    sender = BackgroundSender("slow", slow, accept=lambda e: True, max_queue=2, max_batch=1)
    ev = Event("open", NOW, "lab", "192.0.2.1", "tcp", 22, NOW + 60)
    started = time.monotonic()
    for _ in range(10):
        sender(ev)
    assert time.monotonic() - started < FAST
    assert sender.dropped >= 7
    assert any("queue full" in r.getMessage() for r in caplog.records)
    release.set()
    sender.close()
    assert sum(delivered) == 10 - sender.dropped


def test_close_is_bounded_when_a_delivery_hangs(caplog: pytest.LogCaptureFixture) -> None:
    release = threading.Event()
    started = threading.Event()

    def hang(events: Sequence[Event]) -> None:
        started.set()
        release.wait(10)

    sender = BackgroundSender("hung", hang, accept=lambda e: True)
    sender(Event("open", NOW, "lab", "192.0.2.1", "tcp", 22, NOW + 60))
    assert started.wait(5)
    sender(Event("open", NOW, "lab", "192.0.2.2", "tcp", 22, NOW + 60))
    began = time.monotonic()
    sender.close(timeout=0.3)
    assert time.monotonic() - began < 2
    (msg,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert msg == "hung: still delivering after 0.3 s at exit; 1 more event(s) not sent"
    release.set()
    assert sender.thread is not None
    sender.thread.join(5)


# -- webhook ---------------------------------------------------------------------------------


class Hook(http.server.BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]]
    headers_seen: list[str]
    fail_first: list[int]

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.fail_first:
            self.fail_first.pop()
            self.send_response(503)
        else:
            self.bodies.append(json.loads(body))
            self.headers_seen.append(self.headers["Content-Type"])
            self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[tuple[type[Hook], str]]:
    handler = type("H", (Hook,), {"bodies": [], "headers_seen": [], "fail_first": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield handler, f"http://127.0.0.1:{server.server_address[1]}/hook"
    finally:
        server.shutdown()
        thread.join()
        server.server_close()


def test_webhook_gets_open_and_revoke_not_renew(
    tmp_path: Path, hook: tuple[type[Hook], str]
) -> None:
    handler, url = hook
    sender = webhook_sender(settings(tmp_path, email_to=(), webhook_url=url))
    engine = engine_with(tmp_path, Timed(sender))
    assert timed_open(engine, [req()], NOW) < FAST
    engine.open([req()], NOW + 5)  # renewal
    engine.revoke(A, None, None, NOW + 10)
    assert wait_for(lambda: len(handler.bodies) == 2)
    sender.close()
    opened, revoked = handler.bodies
    assert opened["event"] == "open" and opened["ip"] == "192.0.2.10"
    assert opened["proto"] == "tcp" and opened["port"] == 22
    assert opened["expires"] == int(NOW + 600) and opened["instance"] == "lab"
    assert opened["user_agent"] == "webknock-client/1.0 (test)" and opened["source"] == "knock"
    assert opened["date"].endswith("Z") and opened["time"] == round(NOW, 3)
    assert revoked["event"] == "revoke" and revoked["reason"] == "revoked by admin"
    assert handler.headers_seen == ["application/json"] * 2


def test_webhook_failure_is_retried_then_delivered_once(
    tmp_path: Path, hook: tuple[type[Hook], str], caplog: pytest.LogCaptureFixture
) -> None:
    handler, url = hook
    handler.fail_first.extend([1, 1])
    sender = webhook_sender(settings(tmp_path, email_to=(), webhook_url=url))
    engine_with(tmp_path, sender).open([req()], NOW)
    assert wait_for(lambda: sender.sent == 1)
    sender.close()
    assert [b["event"] for b in handler.bodies] == ["open"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all("answered 503" in w for w in warnings)


def test_dead_webhook_delays_nothing_and_gives_up(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"http://127.0.0.1:{free_port()}/hook"
    sender = webhook_sender(settings(tmp_path, email_to=(), webhook_url=url, retries=1))
    engine = engine_with(tmp_path, Timed(sender))
    assert timed_open(engine, [req()], NOW) < FAST
    assert wait_for(lambda: sender.failed == 1)
    sender.close()
    assert any("gave up after 2 attempt(s)" in r.getMessage() for r in caplog.records)


# -- settings ------------------------------------------------------------------------------


def load_with(tmp_path: Path, keys: Keys, notify: str) -> config.ServerConfig:
    path = write_instance(tmp_path, keys)
    with open(path, "a") as fh:
        fh.write("[notify]\n" + notify)
    return config.load(path)


def test_settings_from_file(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = load_with(
        tmp_path,
        vector_keys,
        "email_to = a@example.org, b@example.org\nsmtp_host = mail.example.org\n"
        "smtp_security = starttls\nbatch_window = 2.5\nwebhook_url = https://h.example/x\n"
        "webhook_events = open, expire\n",
    )
    s = load_notify(cfg)
    assert s.email_to == ("a@example.org", "b@example.org")
    assert s.smtp_port == 587 and s.batch_window == 2.5 and s.retries == 3
    assert s.webhook_events == frozenset({"open", "expire"})
    assert [type(k).__name__ for k in sinks_for(cfg)] == [
        "AuditSink",
        "BackgroundSender",
        "BackgroundSender",
    ]


def test_enabled_no_turns_everything_off(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = load_with(
        tmp_path, vector_keys, "enabled = no\nemail_to = a@example.org\nwebhook_url = http://x/\n"
    )
    assert [type(k).__name__ for k in sinks_for(cfg)] == ["AuditSink"]


def test_no_notify_section_is_only_the_audit_sink(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = config.load(write_instance(tmp_path, vector_keys))
    assert not load_notify(cfg).mail and not load_notify(cfg).webhook
    assert [type(k).__name__ for k in sinks_for(cfg)] == ["AuditSink"]


@pytest.mark.parametrize(
    ("text", "key", "why"),
    [
        ("email_to = nobody\n", "email_to", "'nobody' is not a mail address"),
        ("email_to = a@b.org\nsmtp_port = 0\n", "smtp_port", "must be a port from 1 to 65535"),
        ("email_to = a@b.org\nsmtp_security = ssl\n", "smtp_security", "must be one of"),
        ("batch_window = -1\n", "batch_window", "must be a number of seconds from 0"),
        ("retries = many\n", "retries", "must be a whole number from 0 to 20"),
        ("webhook_url = ftp://x/y\n", "webhook_url", "must be an http:// or https:// URL"),
        ("webhook_events = open, bogus\n", "webhook_events", "must be a comma list"),
        ("emial_to = a@b.org\n", "emial_to", "unknown setting (typo?)"),
        ("smtp_credentials = relative\n", "smtp_credentials", "must be an absolute path"),
        (
            "email_to = a@b.org\nsmtp_host = mail.example.org\nsmtp_credentials = /etc/c\n",
            "smtp_credentials",
            "needs smtp_security = starttls or tls",
        ),
    ],
)
def test_bad_settings_name_file_section_and_key(
    tmp_path: Path, vector_keys: Keys, text: str, key: str, why: str
) -> None:
    cfg = load_with(tmp_path, vector_keys, text)
    with pytest.raises(ConfigError) as err:
        load_notify(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{cfg.source}: [notify] {key}: ") and why in msg
    assert "\n" not in msg
    with pytest.raises(ConfigError):
        sinks_for(cfg)  # the daemon refuses to start with it


def test_credentials_file(tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.write_text("[smtp]\nuser = u\npassword = p w\n")
    cred = read_credentials(good)
    assert (cred.user, cred.password) == ("u", "p w") and "p w" not in repr(cred)
    bad = tmp_path / "bad"
    bad.write_text("[smtp]\nuser = u\n")
    with pytest.raises(ConfigError, match=f"^{bad}: .*need \\[smtp\\] user and password"):
        read_credentials(bad)


def test_example_config_notify_section_is_valid(tmp_path: Path) -> None:
    """Every commented setting of the shipped example's [notify] loads when enabled."""
    example = (Path(__file__).parents[2] / "etc/webknock/webknock.ini.example").read_text()
    head, notify = example.split("#[notify]\n")
    enabled = "\n".join(
        line[1:] if re.fullmatch(r"#[a-z_]+ = .*", line) else line for line in notify.splitlines()
    )
    path = tmp_path / "webknock.ini"
    path.write_text(f"{head}[notify]\n{enabled}\n")
    s = load_notify(config.load(path))
    assert s.email_to == ("admin@example.org", "oncall@example.org")
    assert s.webhook_url == "https://hooks.example.org/webknock"
    assert (s.batch_window, s.retries, s.smtp_port) == (10.0, 3, 25)


def test_mail_names_the_enrolled_client(tmp_path: Path, smtp: tuple[Inbox, int]) -> None:
    inbox, port = smtp
    sender = mail_sender(settings(tmp_path, smtp_port=port, batch_window=0))
    engine_with(tmp_path, sender).open([replace(req(), client="alice")], NOW)
    assert wait_for(lambda: len(inbox.messages) == 1)
    sender.close()
    (msg,) = inbox.messages
    assert "(client alice)" in msg["Subject"]
    assert "enrolled client: alice" in msg.get_content()


def test_mail_of_a_network_grant_names_the_network_and_who_knocked(tmp_path: Path) -> None:
    from webknock.server.notify.mail import compose

    events: list[Event] = []
    engine = engine_with(tmp_path, events.append)
    request = GrantRequest(
        "n" * 32,
        ipaddress.ip_address("198.51.100.7"),
        (("tcp", 22),),
        60,
        client="alice",
        prefixlen=24,
    )
    engine.open([request], NOW)
    msg = compose(settings(tmp_path), events)
    assert msg["Subject"] == "webknock lab: 198.51.100.0/24 (client alice) opened tcp/22"
    body = msg.get_content()
    assert "knocked from: 198.51.100.7 (the network 198.51.100.0/24 is open)" in body
