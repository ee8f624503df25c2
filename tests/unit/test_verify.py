"""webknock.server.verify: what webknockd believes of a spooled request (packet sealed with the
keys, fresh, for the address it came from) and the replies it seals."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cgi_side import getinfo_packet, openports_packet
from tests.conftest import v1_keys_file, write_instance
from webknock.addresses import Address
from webknock.config import ServerConfig, load
from webknock.keys import format_keys
from webknock.protocol import messages, v1
from webknock.protocol.v1 import Keys
from webknock.server.verify import Answer, Refusal, V1Replies, Verified, Verifier
from webknock.spool.reader import SpooledRequest

PEER = ipaddress.ip_address("192.0.2.10")


@pytest.fixture
def cfg(tmp_path: Path, vector_keys: Keys) -> ServerConfig:
    return load(write_instance(tmp_path, vector_keys))


def spooled(packet: bytes, protocol: str = "v1", agent: str = "agent/1") -> SpooledRequest:
    return SpooledRequest("a" * 32, protocol, str(PEER), "", agent, packet, time.time())


def verify(cfg: ServerConfig, packet: bytes, peer: Address = PEER, **kw: str) -> Verified:
    return Verifier(cfg).verify(spooled(packet, **kw), peer, time.time())


def refusal(cfg: ServerConfig, packet: bytes, peer: Address = PEER) -> Refusal:
    with pytest.raises(Refusal) as info:
        verify(cfg, packet, peer)
    return info.value


def opened(keys: Keys, answer: Answer) -> dict[str, object]:
    assert answer.status == 200 and answer.note == ""
    obj: dict[str, object] = json.loads(v1.decode(keys, answer.body))
    return obj


def test_an_openports_packet_verifies(cfg: ServerConfig, vector_keys: Keys) -> None:
    packet = openports_packet(vector_keys, str(PEER), [("tcp", 22), ("udp", 51820)], 120)
    v = verify(cfg, packet)
    assert (v.id, v.peer, v.api, v.ports, v.time) == (
        "a" * 32,
        PEER,
        "openports",
        (("tcp", 22), ("udp", 51820)),
        120,
    )
    assert v.user_agent == "agent/1" and v.client is None
    assert v.max_time == 3600 and ("tcp", 2222) in v.allowed
    assert v.mark == b"v1:" + v1.decode_with_mac(vector_keys, packet)[1]


@pytest.mark.parametrize(
    ("asked", "granted"), [(60, 60), (0, 3600), (-5, 3600), (10**9, 3600), (1, 1)]
)
def test_time_is_capped_to_max_time(
    cfg: ServerConfig, vector_keys: Keys, asked: int, granted: int
) -> None:
    """0 (and a negative time from a buggy client) asks for the longest."""
    assert verify(cfg, openports_packet(vector_keys, time_=asked)).time == granted


def test_only_offered_ports_are_kept(cfg: ServerConfig, vector_keys: Keys) -> None:
    mixed = openports_packet(vector_keys, ports=[("tcp", 23), ("tcp", 2222), ("udp", 22)])
    assert verify(cfg, mixed).ports == (("tcp", 2222),)
    assert verify(cfg, openports_packet(vector_keys, ports=[("tcp", 23)])).ports == ()


def test_getinfo_needs_no_address_and_tells_the_peer_its_own(
    cfg: ServerConfig, vector_keys: Keys
) -> None:
    other = ipaddress.ip_address("2001:db8::7")
    v = verify(cfg, getinfo_packet(vector_keys), other)
    assert v.api == "getinfo" and v.ports == ()
    assert opened(vector_keys, v.replies.info(v.peer, v.allowed, v.max_time, time.time())) == {
        "success": True,
        "tcp": [22, 2222],
        "udp": [51820],
        "maxtime": 3600,
        "ip": "2001:db8::7",
    }


def test_the_packet_must_name_the_client_address(cfg: ServerConfig, vector_keys: Keys) -> None:
    r = refusal(cfg, openports_packet(vector_keys, "192.0.2.99"))
    assert r.answer == Answer(403, "address mismatch: the server sees another address")
    assert not r.bad, "the client holds the keys: told why, not counted"
    mapped = openports_packet(vector_keys, "::ffff:192.0.2.10")
    assert verify(cfg, mapped).peer == PEER, "an IPv4-mapped address is the IPv4 address"


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(lambda k: v1.encode(Keys.generate(), b'{"api":"getinfo"}'), id="other keys"),
        pytest.param(lambda k: os.urandom(512), id="random"),
        pytest.param(lambda k: bytes(16) + openports_packet(k)[16:], id="altered"),
    ],
)
def test_a_packet_that_does_not_verify_is_bad(
    cfg: ServerConfig, vector_keys: Keys, packet: Callable[[Keys], bytes]
) -> None:
    r = refusal(cfg, packet(vector_keys))
    assert r.answer == Answer(403) and r.bad and r.reason.startswith("packet: ")


def test_v2_is_refused_while_it_is_not_enabled(cfg: ServerConfig, vector_keys: Keys) -> None:
    with pytest.raises(Refusal) as info:
        verify(cfg, openports_packet(vector_keys), protocol="v2")
    assert info.value.answer == Answer(403) and info.value.bad


@pytest.mark.parametrize(
    ("data", "status", "note"),
    [
        (b'{"api":"getinfo","ver":2,"ts":%d}', 405, ""),
        (b'{"api":"shell","ver":1,"ts":%d}', 405, ""),
        (b"[" * 1005 + b"]" * 1005, 403, ""),  # RecursionError in json
        (b"[%d]", 403, ""),
        (b'{"api":"openports","ver":1,"ts":%d}', 403, ""),
        (b'{"api":"openports","ver":1,"ts":%d,"ip":"x","ports":[]}', 403, ""),
        (b'{"api":"getinfo","ver":1,"ts":1}', 403, "clock skew: request time is"),
    ],
)
def test_a_sealed_request_we_refuse_says_why_and_is_not_bad(
    cfg: ServerConfig, vector_keys: Keys, data: bytes, status: int, note: str
) -> None:
    if b"%d" in data:
        data = data.replace(b"%d", str(int(time.time())).encode())
    r = refusal(cfg, v1.encode(vector_keys, data))
    assert r.answer.status == status and r.answer.note.startswith(note) and not r.bad


def test_keys_are_read_again_when_the_file_changes(cfg: ServerConfig, vector_keys: Keys) -> None:
    verifier = Verifier(cfg)
    old = openports_packet(vector_keys)
    assert verifier.verify(spooled(old), PEER, time.time()).api == "openports"
    new_keys = Keys.generate()
    v1_keys_file(cfg).write_text(format_keys(new_keys) + "# rotated\n")
    with pytest.raises(Refusal):
        verifier.verify(spooled(openports_packet(vector_keys)), PEER, time.time())
    assert verifier.verify(spooled(openports_packet(new_keys)), PEER, time.time())


def test_unusable_keys_are_500_logged_once_per_problem(
    cfg: ServerConfig, vector_keys: Keys, caplog: pytest.LogCaptureFixture
) -> None:
    verifier = Verifier(cfg)
    packet = openports_packet(vector_keys)

    def answer() -> tuple[Answer, bool]:
        with pytest.raises(Refusal) as info:
            verifier.verify(spooled(packet), PEER, time.time())
        return info.value.answer, info.value.bad

    text = v1_keys_file(cfg).read_text()
    with caplog.at_level(logging.ERROR):
        os.chmod(v1_keys_file(cfg), 0o604)
        assert answer() == (Answer(500), False), "not the client's fault: not counted"
        assert answer() == (Answer(500), False)
        v1_keys_file(cfg).unlink()
        assert answer() == (Answer(500), False)
        assert answer() == (Answer(500), False)
    errors = [r.getMessage() for r in caplog.records]
    assert len(errors) == 2, errors
    assert "readable by everyone" in errors[0] and "cannot read" in errors[1]
    v1_keys_file(cfg).write_text(text)
    os.chmod(v1_keys_file(cfg), 0o600)
    assert verifier.verify(spooled(packet), PEER, time.time()).api == "openports"


def test_v1_replies(vector_keys: Keys) -> None:
    replies = V1Replies(vector_keys)
    assert opened(vector_keys, replies.granted(PEER, (("tcp", 22),), 1234, 0.0)) == {
        "success": True,
        "expires": 1234,
    }
    assert replies.refused("REPLAY", "replayed", 0.0) == Answer(403), "nothing to read"
    for code in ("NOPORTS", "LIMIT", "FIREWALL", "STATE"):
        assert opened(vector_keys, replies.refused(code, "why", 0.0)) == {
            "success": False,
            "error": "why",
            "errorcode": code,
        }


def test_the_mark_names_the_content_not_the_bytes(cfg: ServerConfig, vector_keys: Keys) -> None:
    data = messages.openports_request(str(PEER), [("tcp", 22)], 60, int(time.time()))
    one, two = v1.encode(vector_keys, data), v1.encode(vector_keys, data)
    assert one != two, "random padding"
    assert verify(cfg, one).mark == verify(cfg, two).mark
    other = messages.openports_request(str(PEER), [("tcp", 22)], 60, int(time.time()))
    assert verify(cfg, v1.encode(vector_keys, other)).mark != verify(cfg, one).mark, "nonce"
