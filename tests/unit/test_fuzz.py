"""Fuzz harness (hypothesis) over the codec, request parsing and spool validation, plus the
corpus in tests/fuzz/ replayed as plain tests.

Each target is a `check_*` function that states what must hold for *any* input; hypothesis
feeds it generated inputs, the corpus feeds it the inputs worth keeping (found bugs, edge
cases). Bounded: WEBKNOCK_FUZZ_EXAMPLES examples per target (default 150, about 10 s for all
targets on one core); CI may raise it for a longer run. No example database is written.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import math
import os
import pwd
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, VECTORS_FILE, write_instance
from webknock import cgi, spool
from webknock.config import ServerConfig, load
from webknock.protocol import messages, transport, v1
from webknock.spool_reader import SpoolError, parse_request, read_request
from webknock.spooldirs import prepare_spool

CORPUS = REPO / "tests" / "fuzz"
EXAMPLES = int(os.environ.get("WEBKNOCK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KEYS = v1.Keys.from_hex(json.loads(VECTORS_FILE.read_text())["keys"])
OFFERED = frozenset({("tcp", 22), ("tcp", 2222), ("udp", 51820)})
WEB = pwd.getpwnam("www-data")
#: What the CGI may answer input that is not a valid, fresh, first-use request.
REFUSED = {400, 403, 405, 413, 429}
#: What may escape request parsing (the CGI turns each into 403/405).
PARSE_ERRORS = (ValueError, ArithmeticError, RecursionError)


# -- targets -------------------------------------------------------------------------------


def check_data_field(value: bytes) -> None:
    """decode_field: a TransportError or a whole packet; Base64 round trip."""
    try:
        packet = transport.decode_field(value)
    except transport.TransportError:
        return
    assert packet and len(packet) % transport.BLOCK == 0 and len(packet) <= transport.MAX_PACKET
    assert transport.decode_field(transport.encode_field(packet).encode()) == packet


def check_packet(packet: bytes) -> None:
    """decode_with_mac on anything: a PacketError or data whose HMAC is the returned MAC."""
    try:
        data, mac = v1.decode_with_mac(KEYS, packet)
    except v1.PacketError:
        return
    assert v1.decode_with_mac(KEYS, v1.encode(KEYS, data))[1] == mac


def check_mutation(data: bytes, packet: bytes) -> None:
    """A changed packet decodes to nothing or to exactly the original request (authenticity):
    the replay cache, keyed on the MAC, therefore recognises every such copy."""
    original_mac = v1.decode_with_mac(KEYS, v1.encode(KEYS, data))[1]
    try:
        got, mac = v1.decode_with_mac(KEYS, packet)
    except v1.PacketError:
        return
    assert got == data and mac == original_mac


def check_request_json(data: bytes, now: float) -> None:
    """parse_request: only the errors the CGI maps to 403/405; a result is well typed."""
    data = _ts(data, now)
    try:
        req = messages.parse_request(data, now, 15)
    except messages.RequestError as exc:
        assert exc.status in (403, 405) and exc.header.isprintable()
        return
    except PARSE_ERRORS:
        return
    assert abs(req.ts - now) <= 15
    if isinstance(req, messages.OpenPorts):
        assert req.ip is not None
        for proto, port in req.ports:
            assert proto in ("tcp", "udp") and 1 <= port <= 65535
        assert len(set(req.ports)) == len(req.ports) <= messages.MAX_PORTS
        assert isinstance(req.time, int)


def check_spool_request(data: bytes) -> None:
    """spool_reader.parse_request (root reading the web user's file): SpoolError or a valid grant."""
    try:
        req = parse_request("0" * 32, data, offered=OFFERED, max_time=3600)
    except SpoolError as exc:
        assert "\n" not in str(exc)
        return
    assert set(req.ports) <= OFFERED and 1 <= req.time <= 3600
    assert math.isfinite(req.received) and len(req.user_agent) <= 200
    assert "%" not in str(req.ip) and not req.ip.is_multicast and not req.ip.is_unspecified


def check_forwarded(remote: str, forwarded: str) -> None:
    """client_address: Reply 400/500, or an address without a scope."""
    env = {"REMOTE_ADDR": remote, "HTTP_X_FORWARDED_FOR": forwarded}
    try:
        addr = cgi.client_address(env, (ipaddress.ip_network("192.0.2.0/24"),))
    except cgi.Reply as reply:
        assert reply.status in (400, 500)
        return
    assert "%" not in str(addr)
    name = spool._fail_name(addr)
    assert len(name) <= 41 and set(name[2:]) <= set("0123456789abcdef._")


class Site:
    """A real instance config for in-process CGI calls; refuses to spool anything."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    def call(self, method: str, length: str, body: bytes, remote: str = "192.0.2.10") -> int:
        env = {
            "REQUEST_METHOD": method,
            "CONTENT_LENGTH": length,
            "REMOTE_ADDR": remote,
            "WEBKNOCK_CONFIG": str(self.cfg.source),
        }
        try:
            cgi.handle(env, io.BytesIO(body), time.time())
        except cgi.Reply as reply:
            return reply.status
        return 200


def check_cgi(site: Site, method: str, length: str, body: bytes) -> None:
    """The CGI on any method, length and body: a documented refusal, never a spool write.
    (200 only for a getinfo sealed with the right keys, which random input never is.)"""
    assert site.call(method, length, body) in REFUSED


def check_cgi_sealed(site: Site, data: bytes) -> None:
    """The CGI on any content sealed with the right keys: a refusal, a getinfo answer, or an
    openports answer that spooled nothing (the spool refuses in this harness)."""
    data = _ts(data, time.time())
    body = b"data=" + transport.encode_field(v1.encode(KEYS, data)).encode()
    try:
        status = site.call("POST", str(len(body)), body)
    except SpoolWrite:
        status = 200  # a valid openports for this peer: allowed, and it reached the spool
        request = messages.parse_request(data, time.time(), 15)
        assert isinstance(request, messages.OpenPorts) and str(request.ip) == "192.0.2.10"
    assert status in REFUSED | {200}


class SpoolWrite(Exception):
    pass


def _ts(data: bytes, now: float) -> bytes:
    return data.replace(b'"@NOW@"', str(int(now)).encode())


# -- hypothesis ---------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    cfg = load(write_instance(tmp_path, KEYS, throttle_failures="1000000", result_timeout="1"))
    prepare_spool(cfg.spool, WEB.pw_gid)

    def refuse(*args: Any, **kw: Any) -> None:
        raise SpoolWrite

    monkeypatch.setattr(spool, "submit", refuse)
    yield Site(cfg)


b64_chars = st.sampled_from(
    list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/%")
)
b64ish = st.lists(b64_chars, min_size=0, max_size=3000).map(bytes)


@FUZZ
@given(st.one_of(st.binary(max_size=3000), b64ish))
def test_fuzz_data_field(value: bytes) -> None:
    check_data_field(value)


@FUZZ
@given(st.integers(0, 5).flatmap(lambda n: st.binary(min_size=512 * n, max_size=512 * n + 3)))
def test_fuzz_packet(packet: bytes) -> None:
    check_packet(packet)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["²", "9" * 400, "fe80::1%eth0", "::1%\n", "192.0.2.10", "NaN"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
request_keys = st.sampled_from(["api", "ver", "ts", "ip", "ports", "time", "proto", "num", "nonce"])
#: Mostly valid requests with a few fields replaced: they get past the timestamp check
#: ("@NOW@" becomes the current time when sealed) and deep into parsing.
request_objects = st.dictionaries(request_keys, json_values, max_size=8).map(
    lambda d: {
        "api": "openports",
        "ver": 1,
        "ts": "@NOW@",
        "ip": "192.0.2.10",
        "ports": [{"proto": "TCP", "num": 22}],
        "time": 60,
        **d,
    }
)


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, allow_nan=True).encode()[: v1.MAX_DATA - 8]  # room for @NOW@


@FUZZ
@given(st.integers(0, 2000), st.binary(max_size=v1.MAX_DATA))
def test_fuzz_mutated_packets(seed: int, noise: bytes) -> None:
    data = messages.openports_request("192.0.2.10", [("tcp", 22)], 60, 1_800_000_000)
    packet = bytearray(v1.encode(KEYS, data))
    rnd = __import__("random").Random(seed)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(5)
        i = rnd.randrange(len(packet))
        if op == 0:
            packet[i] ^= 1 << rnd.randrange(8)
        elif op == 1:
            packet[i] = noise[i % len(noise)] if noise else 0
        elif op == 2:
            packet = packet[: rnd.choice([512, len(packet) - 512 or 512])]
        elif op == 3:
            packet += bytes(noise[:512].ljust(512, b"\0"))
        else:
            packet = packet[512:] + packet[:512]
    check_mutation(data, bytes(packet))


@FUZZ
@given(st.one_of(request_objects.map(_dump), json_values.map(_dump), st.binary(max_size=300)))
def test_fuzz_request_json(data: bytes) -> None:
    check_request_json(data, 1_800_000_000.0)


spool_objects = st.dictionaries(
    st.sampled_from(["v", "ip", "ports", "time", "received", "ua", "x"]), json_values, max_size=7
).map(
    lambda d: {"v": 1, "ip": "192.0.2.10", "ports": [["tcp", 22]], "time": 60, "received": 1, **d}
)


@FUZZ
@given(st.one_of(spool_objects.map(_dump), st.binary(max_size=400), st.just(b"[" * 5000)))
def test_fuzz_spool_request(data: bytes) -> None:
    check_spool_request(data)


@FUZZ
@given(
    st.sampled_from(["192.0.2.1", "192.0.2.77", "198.51.100.1", "::1", "x"]), st.text(max_size=80)
)
def test_fuzz_forwarded_for(remote: str, forwarded: str) -> None:
    check_forwarded(remote, forwarded)


@FUZZ
@given(
    st.sampled_from(["POST", "GET", "post", "", "PUT", "POST "]),
    st.one_of(st.none(), st.text(max_size=12)),
    st.one_of(st.binary(max_size=1200), b64ish.map(lambda b: b"data=" + b)),
)
def test_fuzz_cgi_http(site: Site, method: str, length: str | None, body: bytes) -> None:
    check_cgi(site, method, str(len(body)) if length is None else length, body)


@FUZZ
@given(st.one_of(request_objects.map(_dump), json_values.map(_dump), st.binary(max_size=300)))
def test_fuzz_cgi_sealed(site: Site, data: bytes) -> None:
    check_cgi_sealed(site, data)


# -- corpus --------------------------------------------------------------------------------


def corpus(target: str) -> list[Any]:
    """Entries of tests/fuzz/<target>.jsonl (one JSON object per line; `b64` holds bytes)."""
    path = CORPUS / f"{target}.jsonl"
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip() and not line.startswith("#"):
            entry = json.loads(line)
            entry["bytes"] = base64.b64decode(entry.get("b64", ""))
            entries.append(pytest.param(entry, id=f"{target}:{n}:{entry['why'][:40]}"))
    assert entries, f"{path} is empty"
    return entries


@pytest.mark.parametrize("entry", corpus("data_field"))
def test_corpus_data_field(entry: dict[str, Any]) -> None:
    check_data_field(entry["bytes"])


@pytest.mark.parametrize("entry", corpus("packet"))
def test_corpus_packet(entry: dict[str, Any]) -> None:
    check_packet(entry["bytes"])
    if "same_as" in entry:
        check_mutation(entry["same_as"].encode(), entry["bytes"])


@pytest.mark.parametrize("entry", corpus("request_json"))
def test_corpus_request_json(entry: dict[str, Any], site: Site) -> None:
    check_request_json(entry["bytes"], time.time())
    check_cgi_sealed(site, entry["bytes"])


@pytest.mark.parametrize("entry", corpus("spool_request"))
def test_corpus_spool_request(entry: dict[str, Any], tmp_path: Path) -> None:
    check_spool_request(entry["bytes"])
    path = tmp_path / f"{'0' * 32}.req"
    path.write_bytes(entry["bytes"])
    with pytest.raises(SpoolError) if entry.get("refused", True) else _nothing():
        read_request(path, allowed_uids=frozenset({0}), offered=OFFERED, max_time=3600)


@pytest.mark.parametrize("entry", corpus("cgi_http"))
def test_corpus_cgi_http(entry: dict[str, Any], site: Site) -> None:
    length = entry.get("length", str(len(entry["bytes"])))
    status = site.call(entry.get("method", "POST"), length, entry["bytes"])
    assert status == entry["status"]


@pytest.mark.parametrize("entry", corpus("forwarded"))
def test_corpus_forwarded(entry: dict[str, Any]) -> None:
    check_forwarded(entry["remote"], entry["forwarded"])


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
