"""The client speaking protocol v2 against a fake poster playing the server with the vector
server key (docs/protocol-v2.md, tests/vectors/v2.json).

Covers the vectors byte for byte, knock/info/keep/exec and the cache, replies that must not
be believed (another key, another request, altered bytes: exit 4), every refusal code mapped
to its exit code and words, the bare 403, and server text with control characters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from webknock.client import cli, net, options, targets
from webknock.client.cache import Cache, ServerInfo
from webknock.client.credentials import V2Keys
from webknock.client.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    ClientError,
    Refused,
    ServerFailed,
    clean,
)
from webknock.client.keeper import Keeper
from webknock.client.knocker import Knocker
from webknock.client.profile import load_profile
from webknock.client.replies import clock_skew
from webknock.protocol import transport, v2
from webknock.protocol.v2 import SigningKey

SEEN = "192.0.2.10"  # the address the fake server sees
LOCAL = "10.0.0.5"  # what the fake transport says our source address is


@dataclass
class Behaviour:
    """What the fake server does; tests change it between requests."""

    ports: list[str] = field(default_factory=lambda: ["tcp/22", "tcp/2222", "udp/51820"])
    maxtime: int = 3600
    name: str = "alice"
    see_ip: str = SEEN
    refuse: str = ""  # a refusal code for...
    refuse_api: str = ""  # ...this api ("" both)
    error: str = "refused by the fake"
    clock_offset: float = 0.0  # the server's clock minus ours
    window: int = 30
    sign_with: SigningKey | None = None  # sign replies with another key
    bind_other: bool = False  # sign replies for another request packet
    status: int = 200  # anything else: a bare status, as Transport reports it
    note: str = ""
    reply: bytes | None = None  # the reply bytes as they are
    body: bytes | None = None  # the signed reply body as it is
    tamper: bool = False  # flip one byte of the reply body after signing


class FakeV2Server:
    """A Poster (what Knocker needs of a Transport) that answers as a v2 server would."""

    def __init__(self, server: SigningKey, clients: list[bytes], family: str = "any") -> None:
        self.server, self.family = server, family
        self.clients = {v2.key_id(pub): pub for pub in clients}
        self.behaviour = Behaviour()
        self.log: list[dict[str, Any]] = []
        self.packets: list[bytes] = []
        self.local: str | None = LOCAL

    def apis(self) -> list[str]:
        return [e["api"] for e in self.log]

    def local_address(self) -> str | None:
        return self.local

    def post(self, packet: bytes, field: str = "data") -> bytes:
        assert field == "v2", "a v2 profile sends the v2 form field"
        b = self.behaviour
        self.packets.append(packet)
        if b.status != 200:
            raise net.status_error(b.status, b.note, "v2")
        try:
            kid, _sig, body = v2.split_request(packet)
            v2.verify_request(self.clients[kid], self.server.kid, packet)
            req = v2.parse_body(body)
        except (KeyError, v2.V2Error):
            raise net.status_error(403, "", "v2") from None
        self.log.append({"api": req.api, "request": json.loads(body)})
        if b.reply is not None:
            return b.reply
        now = time.time() + b.clock_offset
        reply: dict[str, Any]
        if b.refuse and b.refuse_api in ("", req.api):
            reply = {"success": False, "code": b.refuse, "error": b.error}
        elif abs(req.ts - now) > b.window:
            reply = {"success": False, "code": "clock", "error": "ts outside the window"}
        elif req.api == "getinfo":
            reply = {
                "success": True,
                "client": b.name,
                "ip": b.see_ip,
                "ports": b.ports,
                "maxtime": b.maxtime,
            }
        elif str(req.ip) != b.see_ip:
            reply = {"success": False, "code": "ip_mismatch", "error": "ip is not the source"}
        else:
            granted = [v2.port_text(p) for p in req.ports if v2.port_text(p) in b.ports]
            if not granted:
                reply = {"success": False, "code": "ports", "error": "none of these"}
            else:
                seconds = min(req.time or b.maxtime, b.maxtime)
                reply = {
                    "success": True,
                    "client": b.name,
                    "ip": b.see_ip,
                    "ports": granted,
                    "expires": int(now) + seconds,
                }
        reply["time"] = int(now)
        signed = b.body if b.body is not None else v2.dumps(reply)
        bound = packet[:-1] + bytes([packet[-1] ^ 1]) if b.bind_other else packet
        out = v2.encode_reply(b.sign_with or self.server, bound, signed)
        if b.tamper:
            out = out[:-2] + bytes([out[-2] ^ 0x20]) + out[-1:]
        return out


@pytest.fixture
def server_key(v2_vectors: dict[str, Any]) -> SigningKey:
    key = SigningKey.from_seed(bytes.fromhex(v2_vectors["server"]["seed_hex"]))
    assert key.public_text() == v2_vectors["server"]["public"]
    return key


@pytest.fixture
def client_key(v2_vectors: dict[str, Any]) -> SigningKey:
    return SigningKey.from_seed(bytes.fromhex(v2_vectors["client"]["seed_hex"]))


@pytest.fixture
def server(
    server_key: SigningKey, client_key: SigningKey, monkeypatch: pytest.MonkeyPatch
) -> FakeV2Server:
    """The fake server, installed as the Transport every knocker of cli.main gets."""
    fake = FakeV2Server(server_key, [client_key.public])

    def transport(url: str, family: str, verify: bool | str, timeout: float) -> FakeV2Server:
        fake.family = family
        return fake

    monkeypatch.setattr(targets, "Transport", transport)
    return fake


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_profile(
    tmp: Path, client: SigningKey, server_public: str, extra: str = "ports = tcp/22, udp/51820\n"
) -> Path:
    key = tmp / "p.key"
    key.write_text(client.to_pem())
    os.chmod(key, 0o600)
    path = tmp / "p.ini"
    path.write_text(
        "[client]\nurl = https://knock.example.org/webknock\n"
        f"server_key = {server_public} office-server\nkey_file = p.key\ntimeout = 2\n{extra}"
    )
    return path


@pytest.fixture
def profile(tmp_path: Path, client_key: SigningKey, v2_vectors: dict[str, Any]) -> Path:
    return make_profile(tmp_path, client_key, v2_vectors["server"]["public"])


def main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def knock(capsys: pytest.CaptureFixture[str], profile: Path, *args: str) -> tuple[int, str, str]:
    return main(capsys, "--config", str(profile), *args, "knock")


# -- the vectors, byte for byte ------------------------------------------------------------


def test_client_packets_and_vector_replies(
    tmp_path: Path,
    profile: Path,
    v2_vectors: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With the vectors' clock and nonces the client sends exactly their packets and
    believes exactly their replies."""
    cases = {c["name"]: c for c in v2_vectors["cases"]}
    nonces = iter(["AAECAwQFBgcICQoLDA0ODw", "EBESExQVFhcYGRobHB0eHw"])
    monkeypatch.setattr(v2, "new_nonce", lambda: next(nonces))
    replies = {
        bytes.fromhex(c["packet_hex"]): bytes.fromhex(c["reply_hex"]) for c in cases.values()
    }
    sent: list[tuple[bytes, str]] = []

    class VectorPoster:
        family = "any"

        def post(self, packet: bytes, field: str = "data") -> bytes:
            sent.append((packet, field))
            return replies[packet]

        def local_address(self) -> str | None:
            return None

    p = dataclasses.replace(load_profile(profile), time=600)
    creds = p.credentials()
    assert isinstance(creds, V2Keys)
    knocker = Knocker(p, creds, VectorPoster(), None, clock=lambda: 1764057600.4)
    info = knocker.info()
    assert info == ServerInfo(tcp=(22,), udp=(), maxtime=3600, ip="192.0.2.10", client="alice")
    assert sent[0] == (bytes.fromhex(cases["getinfo"]["packet_hex"]), "v2")
    assert "v2=" + transport.encode_field(sent[0][0]) == cases["getinfo"]["form"]

    caplog.set_level(logging.WARNING)
    grant = knocker.open(ServerInfo(tcp=(22,), udp=(51820,), maxtime=3600, ip="192.0.2.10"))
    assert sent[1][0] == bytes.fromhex(cases["openports"]["packet_hex"])
    assert grant.ports == (("tcp", 22),) and grant.ip == "192.0.2.10"
    assert (grant.expires, grant.seconds) == (1764058201, 600), "lifetime by the server's clock"
    assert "the server opened tcp/22 but not udp/51820" in caplog.text


def test_vector_reply_to_another_request_is_not_believed(
    profile: Path, v2_vectors: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """must_refuse.reply_to_other_request: the getinfo reply offered for openports."""
    getinfo = next(c for c in v2_vectors["cases"] if c["name"] == "getinfo")
    monkeypatch.setattr(v2, "new_nonce", lambda: "EBESExQVFhcYGRobHB0eHw")

    class Replayer:
        family = "any"

        def post(self, packet: bytes, field: str = "data") -> bytes:
            return bytes.fromhex(getinfo["reply_hex"])

        def local_address(self) -> str | None:
            return None

    p = load_profile(profile)
    creds = p.credentials()
    knocker = Knocker(p, creds, Replayer(), None, clock=lambda: 1764057600.0)
    with pytest.raises(ServerFailed, match="not signed by the server this profile pins") as info:
        knocker.open(ServerInfo(tcp=(22,), udp=(51820,), maxtime=3600, ip="192.0.2.10"))
    assert info.value.code == EXIT_SERVER


# -- knock, info, cache, keep, exec ----------------------------------------------------------


def test_knock_then_cached_knock(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = knock(capsys, profile)
    assert rc == EXIT_OK, err
    assert out.startswith(f"opened tcp/22, udp/51820 for {SEEN} until ") and "(3600 s)" in out
    assert server.apis() == ["getinfo", "openports"]
    req = server.log[1]["request"]
    assert req["ip"] == SEEN and req["ports"] == ["tcp/22", "udp/51820"] and req["time"] == 3600
    assert abs(req["ts"] - time.time()) < 5 and v2.NONCE.fullmatch(req["nonce"])
    assert server.log[0]["request"]["nonce"] != req["nonce"], "a new nonce per request"

    rc, out, _ = main(capsys, "--config", str(profile), "--time", "60", "knock", "--json")
    assert rc == EXIT_OK
    result = json.loads(out)
    (grant,) = result["grants"]
    assert grant["requests"] == 1, "getinfo came from the cache"
    assert grant["ports"] == ["tcp/22", "udp/51820"] and 59 <= grant["seconds"] <= 60
    assert server.apis() == ["getinfo", "openports", "openports"]


def test_info_names_the_client(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = main(capsys, "--config", str(profile), "info")
    assert rc == EXIT_OK
    assert (
        "offers tcp/22, tcp/2222, udp/51820 for up to 3600 s; "
        f"sees this host as {SEEN} (client alice)" in out
    )
    rc, out, _ = main(capsys, "--config", str(profile), "info", "--json")
    (found,) = json.loads(out)["servers"]
    assert found["client"] == "alice" and found["ip"] == SEEN and found["maxtime"] == 3600


def test_cache_is_per_key_pair(
    tmp_path: Path,
    profile: Path,
    server: FakeV2Server,
    client_key: SigningKey,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A getinfo learnt with one key pair is not used with another at the same URL."""
    assert knock(capsys, profile)[0] == EXIT_OK
    other = SigningKey.generate()
    server.clients[other.kid] = other.public
    (tmp_path / "p.key").unlink()
    make_profile(tmp_path, other, server.server.public_text())
    assert knock(capsys, profile)[0] == EXIT_OK
    assert server.apis()[2:] == ["getinfo", "openports"]


def test_stale_cache_falls_back_to_getinfo_once(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    assert knock(capsys, profile)[0] == EXIT_OK
    server.behaviour.see_ip = "198.51.100.7"  # our public address moved, the cache is old
    rc, out, err = knock(capsys, profile)
    assert rc == EXIT_OK, err
    assert server.apis()[2:] == ["openports", "getinfo", "openports"]
    assert "for 198.51.100.7" in out

    enrolled = dict(server.clients)
    server.clients.clear()  # un-enrolled: bare 403, no second try
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED and "not enrolled there, or disabled" in err
    assert len(server.log) == 5 and len(server.packets) == 6
    server.clients.update(enrolled)

    server.behaviour.ports = ["tcp/2222"]  # no longer offered what the cache says
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED
    assert server.apis()[5:] == ["openports", "getinfo"], "ports refusal: getinfo again, once"
    assert "(it offers tcp/2222)" in err


def test_keep_renews_with_v2(tmp_path: Path, profile: Path, server: FakeV2Server) -> None:
    server.behaviour.maxtime = 30
    p = load_profile(profile)
    knocker = Knocker(p, p.credentials(), server, Cache(tmp_path / "c.json"))
    now = [1000.0]
    keeper = Keeper([knocker], threading.Event(), poll=5.0, clock=lambda: now[0])
    keeper.step()
    assert server.apis() == ["getinfo", "openports"]
    now[0] += 10
    keeper.step()
    assert server.apis()[2:] == ["openports"], "renewed at a third, from the cache"
    server.local = "10.0.0.6"
    keeper.step()
    assert server.apis()[3:] == ["getinfo", "openports"], "address moved: knock again"


def test_exec_with_v2(
    tmp_path: Path, profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "ran"
    rc, _, _ = main(capsys, "--config", str(profile), "exec", "--", "touch", str(marker))
    assert rc == EXIT_OK and marker.exists()
    marker.unlink()
    server.behaviour.refuse = "source"
    rc, _, err = main(
        capsys, "--config", str(profile), "--no-cache", "exec", "--", "touch", str(marker)
    )
    assert rc == EXIT_REFUSED and not marker.exists(), "no command without a grant"
    assert "from this network" in err


# -- replies that are not believed -----------------------------------------------------------


@pytest.mark.parametrize("how", ["other key", "other request", "tampered", "truncated", "garbage"])
@pytest.mark.parametrize("api", ["getinfo", "openports"])
def test_unverified_reply_exit_4(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str], how: str, api: str
) -> None:
    b = server.behaviour
    if api == "openports":
        assert knock(capsys, profile)[0] == EXIT_OK  # getinfo now cached
    # even a refusal with text in it: nothing of an unverified reply is shown
    b.refuse, b.error = "limit", "FORGED-TEXT"
    if how == "other key":
        b.sign_with = SigningKey.generate()
    elif how == "other request":
        b.bind_other = True
    elif how == "tampered":
        b.tamper = True
    elif how == "truncated":
        b.reply = v2.encode_reply(server.server, b"x", b"{}")[:60]
    else:
        b.reply = b"WK2R" + os.urandom(100)
    rc, out, err = knock(capsys, profile)
    assert rc == EXIT_SERVER, err
    assert "the reply is not signed by the server this profile pins" in err
    assert f"server_key in {profile}" in err and "not believed" in err
    assert "FORGED" not in err and out == "" and err.count("\n") == 1
    assert server.apis()[-1] == api


def test_signed_but_unexpected_bodies_exit_4(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    b = server.behaviour
    for body, words in [
        (b"not json", "the signed body is not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"success":true,"ip":"192.0.2.10","ports":["tcp/22"]}', "bad or missing maxtime"),
        (b'{"success":true,"maxtime":60,"ip":"nope","ports":[]}', "bad or missing ip"),
        (b'{"success":true,"maxtime":60,"ip":"192.0.2.1","ports":[22]}', "bad or missing ports"),
        (b'{"success":true,"maxtime":true,"ip":"192.0.2.1","ports":[]}', "bad or missing maxtime"),
    ]:
        b.body = body
        rc, _, err = knock(capsys, profile)
        assert rc == EXIT_SERVER and words in err, (body, err)
    b.body = None
    assert knock(capsys, profile)[0] == EXIT_OK
    for body, words in [
        (b'{"success":true,"ip":"192.0.2.10","ports":["tcp/22"]}', "bad or missing expires"),
        (b'{"success":true,"expires":9,"ip":"192.0.2.10","ports":[]}', "bad or missing ports"),
        (b'{"success":true,"expires":9,"ports":["tcp/22"]}', "bad or missing ip"),
    ]:
        b.body = body
        rc, _, err = knock(capsys, profile)
        assert rc == EXIT_SERVER and words in err, (body, err)


# -- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "api", "exit_code", "words"),
    [
        ("bad_request", "getinfo", EXIT_REFUSED, "the server found the request malformed"),
        ("expired", "getinfo", EXIT_REFUSED, "this client's key has expired on the server"),
        ("source", "getinfo", EXIT_REFUSED, "does not accept knocks for this client from this"),
        ("replay", "openports", EXIT_REFUSED, "had already seen this request"),
        ("ip_mismatch", "openports", EXIT_REFUSED, "sees this host at another address"),
        ("ports", "openports", EXIT_REFUSED, "does not let this client open any of the ports"),
        ("limit", "openports", EXIT_REFUSED, "limit of open grants is reached"),
        ("firewall", "openports", EXIT_SERVER, "firewall failed to open the ports"),
        ("clock", "getinfo", EXIT_REFUSED, "this host's clock "),
        ("new_in_v3", "openports", EXIT_REFUSED, "the server refused openports"),
    ],
)
def test_refusal_codes(
    profile: Path,
    server: FakeV2Server,
    capsys: pytest.CaptureFixture[str],
    code: str,
    api: str,
    exit_code: int,
    words: str,
) -> None:
    server.behaviour.refuse, server.behaviour.refuse_api = code, api
    server.behaviour.error = "the reason"
    rc, out, err = knock(capsys, profile, "--no-cache")
    assert rc == exit_code, err
    assert words in err and f"(server: {code}: the reason)" in err
    assert out == "" and err.count("\n") == 1, err
    assert server.apis()[-1] == api
    if code in ("ip_mismatch", "ports"):
        assert server.apis() == ["getinfo", "openports"], "not from the cache: no second try"


@pytest.mark.parametrize(
    ("offset", "words"),
    [
        (95, r"this host's clock is (94|95|96) s behind the server's"),
        (-3725, r"this host's clock is 372[456] s \(62 min\) ahead of the server's"),
        (10000, r"this host's clock is (9999|10000|10001) s \(2 h 46 min\) behind the server's"),
    ],
)
def test_clock_refusal_says_by_how_much(
    profile: Path,
    server: FakeV2Server,
    capsys: pytest.CaptureFixture[str],
    offset: int,
    words: str,
) -> None:
    server.behaviour.clock_offset = offset
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED
    assert re.search(words, err) and "set the clock right (NTP)" in err
    assert "(server: clock: ts outside the window)" in err
    assert server.apis() == ["getinfo"]


def test_clock_skew_words() -> None:
    assert clock_skew(1000, 1000.4) == (
        "this host's clock agrees with the server's within a second (yet the server refused it)"
    )
    assert clock_skew(1000, 998.5) == "this host's clock is 2 s behind the server's"
    assert clock_skew(1000, 1003.5) == "this host's clock is 3 s ahead of the server's"
    assert clock_skew(200000, 0.0).endswith("(2 days) behind the server's")
    assert "does not say by how much" in clock_skew(None, 1.0)
    assert "does not say" in clock_skew(True, 1.0)


def test_refusal_without_code_or_text(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.body = b'{"success":false}'
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED and "the server refused getinfo: (server: no reason given)" in err


@pytest.mark.parametrize(
    ("status", "note", "exit_code", "words"),
    [
        (403, "", EXIT_REFUSED, "refused this client's key (403 Forbidden): it is not enrolled"),
        (403, "x", EXIT_REFUSED, "or the server does not speak v2): x"),
        (400, "", EXIT_REFUSED, "malformed (400 Bad Request)"),
        (413, "", EXIT_REFUSED, "too large (413"),
        (504, "", EXIT_SERVER, "webknockd did not answer in time (504"),
        (503, "", EXIT_SERVER, "nothing was opened"),
    ],
)
def test_bare_statuses(
    profile: Path,
    server: FakeV2Server,
    capsys: pytest.CaptureFixture[str],
    status: int,
    note: str,
    exit_code: int,
    words: str,
) -> None:
    server.behaviour.status, server.behaviour.note = status, note
    rc, _, err = knock(capsys, profile)
    assert rc == exit_code and words in err and err.count("\n") == 1, err


def test_unknown_key_is_a_bare_403(
    tmp_path: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = make_profile(tmp_path, SigningKey.generate(), server.server.public_text())
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED
    assert "not enrolled there, or disabled, or the request did not verify" in err


def test_pinned_to_another_server_is_a_bare_403(
    tmp_path: Path, server: FakeV2Server, client_key: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    """The request is signed for the pinned server's kid: this server cannot verify it."""
    profile = make_profile(tmp_path, client_key, SigningKey.generate().public_text())
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED and "server_key in the profile not this server's" in err
    assert server.log == [] and len(server.packets) == 1


def test_profile_errors_exit_2(
    tmp_path: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str], client_key: SigningKey
) -> None:
    profile = make_profile(tmp_path, client_key, server.server.public_text())
    os.chmod(tmp_path / "p.key", 0o644)
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_CONFIG and "key_file: " in err and "readable by everyone" in err
    (tmp_path / "p.key").unlink()
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_CONFIG and f"make it with: webknock --config {profile} keygen" in err
    assert server.log == []


# -- server text is neutralised --------------------------------------------------------------

HOSTILE = "\x1b]0;owned\x07\x1b[2J\x1b[31mred\u202eevil\r\nwebknock: fake line\x00" + "A" * 600


def assert_neutral(err: str) -> None:
    assert not any(c in err for c in "\x1b\x07\u202e\r\x00"), repr(err)
    assert err.count("\n") == 1, "one line: the server cannot start one of its own"
    assert "\\x1b]0;owned\\x07" in err
    assert len(err) < 600


def test_v2_refusal_text_is_neutralised(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.refuse, server.behaviour.error = "limit", HOSTILE
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED
    assert_neutral(err)
    server.behaviour.refuse = HOSTILE  # the code too
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED
    assert_neutral(err)


def test_v2_client_name_and_note_are_neutralised(
    profile: Path, server: FakeV2Server, capsys: pytest.CaptureFixture[str]
) -> None:
    server.behaviour.name = HOSTILE
    rc, out, _ = main(capsys, "--config", str(profile), "info")
    assert rc == EXIT_OK and "\x1b" not in out and out.count("\n") == 1 and len(out) < 300
    server.behaviour.status, server.behaviour.note = 403, HOSTILE
    rc, _, err = knock(capsys, profile)
    assert rc == EXIT_REFUSED
    assert_neutral(err)


def test_clean() -> None:
    assert clean("plain text, accents: é ü 日本") == "plain text, accents: é ü 日本"
    assert clean("a\x1bb\tc\u200bd\u2028e\ud800") == "a\\x1bb\\tc\\u200bd\\u2028e\\ud800"
    assert clean("x" * 300) == "x" * 197 + "..."
    assert len(clean("\x1b" * 300)) == 200
    assert clean(ValueError("bad\x1b")) == "bad\\x1b"
    assert clean("x" * 300, None) == "x" * 300


def test_log_lines_are_neutralised(capsys: pytest.CaptureFixture[str]) -> None:
    """Whatever reaches the log handler the CLI installs is made safe there too."""
    cli._setup_logging(options.build_parser().parse_args(["info"]))
    logging.getLogger("webknock.client").error("%s", "x\x1b[31my")
    assert capsys.readouterr().err == "webknock: x\\x1b[31my\n"


# -- the real Transport: form field, reply checks ---------------------------------------------


class HttpV2:
    """An HTTP server on 127.0.0.1 handing each POST to a FakeV2Server (or a fixed answer)."""

    def __init__(self, fake: FakeV2Server) -> None:
        self.fake = fake
        self.fields: list[list[str]] = []
        self.answer: tuple[int, bytes, dict[str, str]] | None = None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, fmt: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                form = parse_qs(self.rfile.read(int(self.headers["Content-Length"])).decode())
                outer.fields.append(sorted(form))
                status, body, headers = outer.answer or (200, b"", {})
                if outer.answer is None:
                    try:
                        body = outer.fake.post(
                            transport.decode_v2_field(form["v2"][0].encode()), "v2"
                        )
                    except ClientError:
                        status = 403
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/webknock"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def http(server_key: SigningKey, client_key: SigningKey) -> Iterator[HttpV2]:
    h = HttpV2(FakeV2Server(server_key, [client_key.public]))
    h.fake.behaviour.see_ip = "127.0.0.1"
    yield h
    h.close()


def test_over_http(
    tmp_path: Path, http: HttpV2, client_key: SigningKey, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = make_profile(tmp_path, client_key, http.fake.server.public_text())
    profile.write_text(profile.read_text().replace("https://knock.example.org/webknock", http.url))
    rc, out, err = knock(capsys, profile, "--family", "ipv4")
    assert rc == EXIT_OK, err
    assert out.startswith("opened tcp/22, udp/51820 for 127.0.0.1 until ")
    assert http.fields == [["v2"], ["v2"]], "one form field, named v2"

    http.answer = (200, b"<html>hello</html>", {})
    rc, _, err = knock(capsys, profile, "--no-cache")
    assert rc == EXIT_SERVER and "18 bytes is not a v2 reply (is the URL the webknock CGI?)" in err
    http.answer = (200, b"WK2R" + b"x" * (net.MAX_V2_REPLY + 10), {})
    assert knock(capsys, profile, "--no-cache")[0] == EXIT_SERVER

    http.answer = None
    http.fake.clients.clear()
    rc, _, err = knock(capsys, profile, "--no-cache")
    assert rc == EXIT_REFUSED and "not enrolled there, or disabled" in err

    http.answer = (403, b"", {"X-Webknock-Error": "bad\x1b[31m key"})
    rc, _, err = knock(capsys, profile, "--no-cache")
    assert rc == EXIT_REFUSED and "\x1b" not in err and "bad\\x1b[31m key" in err
    http.answer = (302, b"", {"Location": "http://x/\x1b[2J"})
    rc, _, err = knock(capsys, profile, "--no-cache")
    assert rc == EXIT_SERVER and "\x1b" not in err and "redirects (302)" in err


def test_v1_text_is_neutralised_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The v1 fake of test_client_http: refusal text, getinfo error, bad values."""
    from tests.unit.test_client_http import FakeServer
    from tests.unit.test_client_http import make_profile as v1_profile
    from webknock.protocol import v1

    keys = v1.Keys.generate()
    s = FakeServer(keys)
    try:
        profile = v1_profile(tmp_path, keys, s.url())
        s.behaviour.refuse = HOSTILE
        rc, _, err = knock(capsys, profile)
        assert rc == EXIT_REFUSED and "did not open the ports: " in err
        assert_neutral(err)
        s.behaviour.body = v1.encode(
            keys, json.dumps({"success": False, "error": HOSTILE}).encode()
        )
        rc, _, err = knock(capsys, profile, "--no-cache")
        assert rc == EXIT_REFUSED and "the server refused getinfo: " in err
        assert_neutral(err)
        bad = {"success": True, "tcp": [22], "udp": [], "maxtime": HOSTILE, "ip": "1.2.3.4"}
        s.behaviour.body = v1.encode(keys, json.dumps(bad).encode())
        rc, _, err = knock(capsys, profile, "--no-cache")
        assert rc == EXIT_SERVER and "unexpected getinfo reply" in err and "\x1b" not in err
        s.behaviour.body = None
        s.behaviour.status, s.behaviour.note = 403, "x\x7fy"
        rc, _, err = knock(capsys, profile, "--no-cache")
        assert rc == EXIT_REFUSED and "x\\x7fy" in err
    finally:
        s.close()


def test_status_error_cleans_the_note() -> None:
    err = net.status_error(500, "\x1b[2J" + "n" * 400)
    assert isinstance(err, ServerFailed) and "\x1b" not in err.message
    assert len(err.message) < 300
    v2_403 = net.status_error(403, "", "v2")
    assert isinstance(v2_403, Refused) and v2_403.status == 403 and "not enrolled" in v2_403.message
    assert "wrong keys" in net.status_error(403).message, "v1 words unchanged"
