"""webknock.protocol.transport: the CGI's cheap, keyless checks of the packet fields, ``data``
(v1) and ``v2``, and the same shape checks webknockd's spool reader makes again."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import REPO
from webknock.protocol import transport
from webknock.protocol.transport import (
    BLOCK,
    MAX_PACKET,
    MAX_V2_BODY,
    V2_HEAD,
    V2_REQUEST_MAGIC,
    TransportError,
    check_v1_packet,
    check_v2_packet,
    decode_field,
    decode_v2_field,
    encode_field,
)

V2_CASES: list[dict[str, Any]] = json.loads((REPO / "tests/vectors/v2.json").read_text())["cases"]


def field(packet: bytes) -> bytes:
    return encode_field(packet).encode()


def v2(body_length: int, magic: bytes = V2_REQUEST_MAGIC) -> bytes:
    """A v2 request's shape: magic, key id and signature (zeros here), `body_length` bytes."""
    return magic + bytes(V2_HEAD - 4) + b"b" * body_length


# -- v1: data --------------------------------------------------------------------------------


@pytest.mark.parametrize("blocks", [1, 2, 3, 4])
def test_v1_packets_of_whole_blocks_round_trip(blocks: int) -> None:
    packet = bytes(range(256)) * 2 * blocks
    assert decode_field(field(packet)) == packet
    assert decode_field(field(packet) + b"=" * (-len(field(packet)) % 4)) == packet  # padded
    assert decode_field(b" " + field(packet) + b"\n") == packet  # blanks around it
    check_v1_packet(packet)


def test_the_field_is_url_safe_base64_without_padding() -> None:
    packet = b"\xfb\xff" * BLOCK  # '-' and '_' where standard Base64 has '+' and '/'
    text = encode_field(packet)
    assert "+" not in text and "/" not in text and "=" not in text
    assert set(text) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"====",
        b"A" * 682,  # 511 bytes
        b"A" * 684,  # 513 bytes
        b"A" * 683 + b"A",
        field(bytes(MAX_PACKET + BLOCK)),
        b"A" * 682 + b"!",
        b"A" * 682 + b"+",  # standard Base64
        b"A" * 682 + b"/",
        b"A" * 341 + b" " + b"A" * 341,  # a blank inside
        b"A" * 341 + b"=" + b"A" * 341,  # padding inside
        b"A" * 682 + b"\xff",
        "\u00c4".encode() * 341 + b"A",
    ],
)
def test_v1_fields_refused(value: bytes) -> None:
    with pytest.raises(TransportError):
        decode_field(value)


@pytest.mark.parametrize("length", [0, 1, BLOCK - 1, BLOCK + 1, MAX_PACKET + BLOCK, 3 * BLOCK // 2])
def test_v1_packet_lengths_refused(length: int) -> None:
    with pytest.raises(TransportError, match=f"packet length {length}"):
        check_v1_packet(bytes(length))


# -- v2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", V2_CASES, ids=[c["name"] for c in V2_CASES])
def test_v2_vectors_decode_to_their_packets(case: dict[str, Any]) -> None:
    name, _, value = case["form"].partition("=")
    assert name == "v2"
    packet = decode_v2_field(value.encode())
    assert packet == bytes.fromhex(case["packet_hex"])
    assert encode_field(packet) == value


@pytest.mark.parametrize("body", [1, 2, 100, MAX_V2_BODY])
def test_v2_packet_lengths_accepted(body: int) -> None:
    packet = v2(body)
    assert len(packet) == V2_HEAD + body
    check_v2_packet(packet)
    assert decode_v2_field(field(packet)) == packet


@pytest.mark.parametrize(
    ("packet", "reason"),
    [
        (b"", "wrong magic"),
        (b"WK2", "wrong magic"),
        (v2(100, b"WK2R"), "wrong magic"),  # a reply, not a request
        (v2(100, b"wk2q"), "wrong magic"),
        (v2(100, b"WK1Q"), "wrong magic"),
        (bytes(BLOCK), "wrong magic"),  # a v1 packet
        (V2_REQUEST_MAGIC, "v2 packet of 4 bytes"),
        (v2(0), f"v2 packet of {V2_HEAD} bytes"),  # a head and no body
        (v2(MAX_V2_BODY + 1), f"v2 packet of {V2_HEAD + MAX_V2_BODY + 1} bytes"),
    ],
    ids=[
        "empty",
        "short magic",
        "reply",
        "lower case",
        "v1 magic",
        "v1 packet",
        "magic only",
        "head only",
        "too long",
    ],
)
def test_v2_packets_refused(packet: bytes, reason: str) -> None:
    with pytest.raises(TransportError, match=reason):
        check_v2_packet(packet)
    with pytest.raises(TransportError):
        decode_v2_field(field(packet))


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"V0syUQ" + b"!" * 100,
        b"V0syUQ" + b"+" * 100,
        b"A" * (4 * (V2_HEAD + MAX_V2_BODY) // 3 + 9),  # too long to be decoded at all
        field(v2(MAX_V2_BODY + 600)),
    ],
)
def test_v2_fields_refused(value: bytes) -> None:
    with pytest.raises(TransportError):
        decode_v2_field(value)


def test_a_field_error_is_one_short_line() -> None:
    for value in (b"\n" * 5000, b"A" * 682 + b"\n!", "\u2028".encode() * 10):
        for decode in (decode_field, decode_v2_field):
            with pytest.raises(TransportError) as info:
                decode(value)
            assert "\n" not in str(info.value) and len(str(info.value)) < 200
    assert transport.encoded_length_ok(683) and not transport.encoded_length_ok(0)
