"""Fuzz harness (hypothesis) over the field decoders, the v1 codec, request parsing and
verification, the spool frame and the CGI, plus the corpus in tests/fuzz/ replayed as plain
tests.

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
import os
import random
import sys
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import webknock.spool as spool_layout
from tests.conftest import REPO, VECTORS_FILE, write_instance
from webknock import addresses
from webknock.cgi import relay as cgi
from webknock.config import ServerConfig, load
from webknock.protocol import messages, transport, v1
from webknock.server.verify import Refusal, Verified, Verifier
from webknock.spool import request as spool
from webknock.spool.mount import prepare_spool
from webknock.spool.reader import SpooledRequest, SpoolError, parse_request, read_request

CORPUS = REPO / "tests" / "fuzz"
EXAMPLES = int(os.environ.get("WEBKNOCK_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
KEYS = v1.Keys.from_hex(json.loads(VECTORS_FILE.read_text())["keys"])
RID = "0" * 32
PEER = addresses.parse_address("192.0.2.10")
#: What the CGI answers of its own to input it can judge without a key; everything else
#: it relays to webknockd.
CHEAP = {400, 403, 413}
#: What may escape request parsing (webknockd turns each into 403).
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


def check_v2_field(value: bytes) -> None:
    """decode_v2_field: a TransportError or a packet of a v2 request's magic and length."""
    try:
        packet = transport.decode_v2_field(value)
    except transport.TransportError:
        return
    assert packet.startswith(transport.V2_REQUEST_MAGIC)
    assert transport.V2_HEAD < len(packet) <= transport.V2_HEAD + transport.MAX_V2_BODY
    assert transport.decode_v2_field(transport.encode_field(packet).encode()) == packet


def check_packet(packet: bytes) -> None:
    """decode_with_mac on anything: a PacketError or data whose HMAC is the returned MAC."""
    try:
        data, mac = v1.decode_with_mac(KEYS, packet)
    except v1.PacketError:
        return
    assert v1.decode_with_mac(KEYS, v1.encode(KEYS, data))[1] == mac


def check_mutation(data: bytes, packet: bytes) -> None:
    """A changed packet decodes to nothing or to exactly the original request (authenticity):
    webknockd's replay marks, keyed on the MAC, therefore recognise every such copy."""
    original_mac = v1.decode_with_mac(KEYS, v1.encode(KEYS, data))[1]
    try:
        got, mac = v1.decode_with_mac(KEYS, packet)
    except v1.PacketError:
        return
    assert got == data and mac == original_mac


def check_request_json(data: bytes, now: float) -> None:
    """parse_request: only the errors webknockd maps to 403/405; a result is well typed."""
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


def check_sealed(verifier: Verifier, data: bytes) -> None:
    """webknockd's verification of any content sealed with the right keys, as the CGI relays
    it: a Refusal with a status the protocol knows, or a verified request that grants no
    more than the config offers, and openports only for the address it came from."""
    now = time.time()
    data = _ts(data, now)
    frame = spool.encode_request("v1", str(PEER), "", "fuzz", v1.encode(KEYS, data))
    try:
        verified = verifier.verify(parse_request(RID, frame), PEER, now)
    except Refusal as refusal:
        assert refusal.answer.status in (403, 405), refusal.reason
        assert refusal.answer.note.isascii() and refusal.answer.note.isprintable()
        assert not refusal.bad, "sealed with the right keys: never counted as a bad packet"
        return
    assert isinstance(verified, Verified) and verified.peer == PEER
    cfg = verifier.cfg
    if verified.api == "openports":
        request = messages.parse_request(data, now, cfg.ts_window)
        assert isinstance(request, messages.OpenPorts) and request.ip == PEER
        assert set(verified.ports) <= cfg.offered() and 1 <= verified.time <= cfg.max_time
    else:
        assert verified.api == "getinfo" and verified.ports == ()


def check_spool_request(data: bytes) -> None:
    """spool_reader.parse_request (root reading the web user's file): a SpoolError, or a
    request whose every header is printable ASCII within its limit and whose frame is
    exactly what the CGI would have written for it."""
    try:
        req = parse_request(RID, data)
    except SpoolError as exc:
        assert "\n" not in str(exc)
        return
    values = zip(
        spool_layout.HEADERS, (req.protocol, req.remote, req.forwarded, req.agent), strict=True
    )
    for name, value in values:
        assert (
            len(value) <= spool_layout.HEADER_LIMITS[name]
            and value.isascii()
            and value.isprintable()
        )
    assert req.protocol in ("v1", "v2")
    assert (
        spool.encode_request(req.protocol, req.remote, req.forwarded, req.agent, req.packet) == data
    )


def check_frame(protocol: str, remote: str, forwarded: str, agent: str, packet: bytes) -> None:
    """Whatever the CGI frames, root reads back what it meant: the headers as cleaned by
    header_value, the packet unchanged; refused only for a packet of the wrong shape."""
    frame = spool.encode_request(protocol, remote, forwarded, agent, packet)
    assert (
        len(frame) <= spool_layout.MAX_REQUEST_BYTES or len(packet) > spool_layout.MAX_PACKET_BYTES
    )
    try:
        req = parse_request(RID, frame)
    except SpoolError:  # only for the packet's shape
        shape = transport.check_v1_packet if protocol == "v1" else transport.check_v2_packet
        with pytest.raises(transport.TransportError):
            shape(packet)
        return
    limits = spool_layout.HEADER_LIMITS
    assert req.protocol == protocol and req.packet == packet
    assert req.remote.encode() == spool.header_value(remote, limits["remote"])
    assert req.forwarded.encode() == spool.header_value(forwarded, limits["forwarded"])
    assert req.agent.encode() == spool.header_value(agent, limits["agent"])


def check_forwarded(remote: str, forwarded: str) -> None:
    """client_address: AddressError 400/500, or an address without a scope, counted under
    a bounded prefix."""
    try:
        addr = addresses.client_address(remote, forwarded, (ipaddress.ip_network("192.0.2.0/24"),))
    except addresses.AddressError as exc:
        assert exc.status in (400, 500) and "\n" not in exc.reason
        return
    assert "%" not in str(addr)
    prefix = addresses.prefix_of(addr)
    assert len(prefix) <= 43 and set(prefix) <= set("0123456789abcdef.:/")


class Spooled(Exception):
    """The CGI handed a frame to spool.submit (the harness spools nothing)."""

    def __init__(self, frame: bytes) -> None:
        super().__init__("spooled")
        self.frame = frame


class Site:
    """A real instance config for in-process CGI calls; spools nothing."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg

    def call(
        self, method: str, length: str, body: bytes, remote: str = "192.0.2.10"
    ) -> int | bytes:
        """The CGI's own status, or the frame it would spool."""
        env = {
            "REQUEST_METHOD": method,
            "CONTENT_LENGTH": length,
            "REMOTE_ADDR": remote,
            "WEBKNOCK_CONFIG": str(self.cfg.source),
        }
        stdin = sys.stdin
        sys.stdin = types.SimpleNamespace(buffer=io.BytesIO(body))
        try:
            cgi.handle(env)
        except cgi.Reply as reply:
            return reply.status
        except Spooled as spooled:
            return spooled.frame
        finally:
            sys.stdin = stdin
        raise AssertionError("the CGI answered without webknockd")


def check_cgi(site: Site, method: str, length: str, body: bytes) -> None:
    """The CGI on any method, length and body: one of its cheap refusals, or a frame that
    webknockd reads back, holding the packet of the body's first packet field as sent."""
    got = site.call(method, length, body)
    if isinstance(got, int):
        assert got in CHEAP
        return
    assert method == "POST" and length.isascii() and length.isdigit()
    assert int(length) <= cgi.MAX_BODY
    req = parse_request(RID, got)
    found = cgi.packet_field(body[: int(length)])
    assert found is not None and spool_layout.FIELDS[found[0]] == req.protocol
    decode = transport.decode_field if req.protocol == "v1" else transport.decode_v2_field
    assert decode(found[1]) == req.packet
    assert req.remote == "192.0.2.10" and req.forwarded == "" and req.agent == ""


def _ts(data: bytes, now: float) -> bytes:
    return data.replace(b'"@NOW@"', str(int(now)).encode())


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    cfg = load(write_instance(tmp_path, KEYS, result_timeout="1"))
    prepare_spool(cfg.spool, 0)

    def refuse(spool_dir: str, frame: bytes) -> None:
        raise Spooled(frame)

    monkeypatch.setattr(spool, "submit", refuse)
    yield Site(cfg)


@pytest.fixture
def verifier(tmp_path: Path) -> Verifier:
    return Verifier(load(write_instance(tmp_path, KEYS)))


# -- hypothesis ---------------------------------------------------------------------------

b64_chars = st.sampled_from(
    list(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=+/%")
)
b64ish = st.lists(b64_chars, min_size=0, max_size=3000).map(bytes)
v1_shaped = st.integers(1, 4).flatmap(lambda n: st.binary(min_size=512 * n, max_size=512 * n))
v2_shaped = st.binary(min_size=transport.V2_HEAD - 3, max_size=transport.V2_HEAD + 300).map(
    lambda b: transport.V2_REQUEST_MAGIC + b
)
packets = st.one_of(v1_shaped, v2_shaped, st.binary(max_size=2200))


@FUZZ
@given(st.one_of(st.binary(max_size=3000), b64ish, v1_shaped.map(transport.encode_field)))
def test_fuzz_data_field(value: bytes | str) -> None:
    check_data_field(value.encode() if isinstance(value, str) else value)


@FUZZ
@given(st.one_of(st.binary(max_size=3000), b64ish, v2_shaped.map(transport.encode_field)))
def test_fuzz_v2_field(value: bytes | str) -> None:
    check_v2_field(value.encode() if isinstance(value, str) else value)


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
    rnd = random.Random(seed)
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


@FUZZ
@given(st.one_of(request_objects.map(_dump), json_values.map(_dump), st.binary(max_size=300)))
def test_fuzz_sealed(verifier: Verifier, data: bytes) -> None:
    check_sealed(verifier, data)


header_text = st.one_of(
    st.text(max_size=80),
    st.text(max_size=1500),
    st.sampled_from(["192.0.2.10", "2001:db8::10", "", "\n", "a\r\nfield=v2", "\udcff" * 70]),
)


@FUZZ
@given(st.sampled_from(["v1", "v2"]), header_text, header_text, header_text, packets)
def test_fuzz_frame(protocol: str, remote: str, forwarded: str, agent: str, packet: bytes) -> None:
    check_frame(protocol, remote, forwarded, agent, packet)


def _mutate(seed: int, frame: bytes) -> bytes:
    """A frame with a few bytes flipped, cut, doubled or inserted (mostly in its head)."""
    rnd = random.Random(seed)
    data = bytearray(frame)
    for _ in range(rnd.randint(1, 3)):
        i = rnd.randrange(min(len(data), 120)) if data else 0
        op = rnd.randrange(4)
        if op == 0 and data:
            data[i] = rnd.choice(b"\n\r= \x00\x7fvV12x")
        elif op == 1:
            del data[i : i + rnd.randint(1, 8)]
        elif op == 2:
            data[i:i] = data[i : i + rnd.randint(1, 20)]
        else:
            data[i:i] = rnd.choice([b"\n", b"agent=x\n", b"field=v2\n", b"\r"])
    return bytes(data)


frames = st.builds(
    spool.encode_request,
    st.sampled_from(["v1", "v2", "v3", ""]),
    header_text,
    header_text,
    header_text,
    packets,
)


@FUZZ
@given(
    st.one_of(
        frames,
        st.tuples(st.integers(0, 10_000), frames).map(lambda t: _mutate(*t)),
        st.binary(max_size=400),
        st.just(b"[" * 5000),
    )
)
def test_fuzz_spool_request(data: bytes) -> None:
    check_spool_request(data)


@FUZZ
@given(
    st.sampled_from(["192.0.2.1", "192.0.2.77", "198.51.100.1", "::1", "x", ""]),
    st.text(max_size=80),
)
def test_fuzz_forwarded_for(remote: str, forwarded: str) -> None:
    check_forwarded(remote, forwarded)


http_bodies = st.one_of(
    st.binary(max_size=1200),
    b64ish.map(lambda b: b"data=" + b),
    b64ish.map(lambda b: b"v2=" + b),
    v1_shaped.map(lambda p: b"data=" + transport.encode_field(p).encode()),
    v2_shaped.map(lambda p: b"v2=" + transport.encode_field(p).encode()),
    st.tuples(st.binary(max_size=20), v1_shaped, v2_shaped).map(
        lambda t: (
            t[0]
            + b"&data="
            + transport.encode_field(t[1]).encode()
            + b"&v2="
            + transport.encode_field(t[2]).encode()
        )
    ),
)


@FUZZ
@given(
    st.sampled_from(["POST", "GET", "post", "", "PUT", "POST "]),
    st.one_of(st.none(), st.text(max_size=12)),
    http_bodies,
)
def test_fuzz_cgi_http(site: Site, method: str, length: str | None, body: bytes) -> None:
    check_cgi(site, method, str(len(body)) if length is None else length, body)


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
    check_v2_field(entry["bytes"])


@pytest.mark.parametrize("entry", corpus("packet"))
def test_corpus_packet(entry: dict[str, Any]) -> None:
    check_packet(entry["bytes"])
    if "same_as" in entry:
        check_mutation(entry["same_as"].encode(), entry["bytes"])


@pytest.mark.parametrize("entry", corpus("request_json"))
def test_corpus_request_json(entry: dict[str, Any], verifier: Verifier) -> None:
    check_request_json(entry["bytes"], time.time())
    check_sealed(verifier, entry["bytes"])


@pytest.mark.parametrize("entry", corpus("spool_request"))
def test_corpus_spool_request(entry: dict[str, Any], tmp_path: Path) -> None:
    check_spool_request(entry["bytes"])
    path = tmp_path / f"{RID}.req"
    path.write_bytes(entry["bytes"])
    if entry.get("refused", True):
        with pytest.raises(SpoolError):
            read_request(path, allowed_uids=frozenset({0}))
    else:
        assert isinstance(read_request(path, allowed_uids=frozenset({0})), SpooledRequest)


@pytest.mark.parametrize("entry", corpus("cgi_http"))
def test_corpus_cgi_http(entry: dict[str, Any], site: Site) -> None:
    method, length = entry.get("method", "POST"), entry.get("length", str(len(entry["bytes"])))
    check_cgi(site, method, length, entry["bytes"])
    got = site.call(method, length, entry["bytes"])
    if "spooled" in entry:
        assert isinstance(got, bytes) and parse_request(RID, got).protocol == entry["spooled"]
    else:
        assert got == entry["status"]


@pytest.mark.parametrize("entry", corpus("forwarded"))
def test_corpus_forwarded(entry: dict[str, Any]) -> None:
    check_forwarded(entry["remote"], entry["forwarded"])
