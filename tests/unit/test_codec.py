"""Protocol v1 codec: every shared vector, round trips, and each rejection path."""

from __future__ import annotations

import json
from typing import Any

import pytest

from webknock.protocol import transport, v1


def cases(vectors: dict[str, Any]) -> list[dict[str, str]]:
    result: list[dict[str, str]] = vectors["cases"]
    assert len(result) >= 5
    return result


def test_every_vector_decodes_to_its_plaintext(
    vectors: dict[str, Any], vector_keys: v1.Keys
) -> None:
    for case in cases(vectors):
        packet = bytes.fromhex(case["packet_hex"])
        assert v1.decode(vector_keys, packet) == case["plaintext"].encode()
        json.loads(case["plaintext"])  # the plaintexts are JSON


def test_post_data_is_urlsafe_base64_of_the_packet(vectors: dict[str, Any]) -> None:
    for case in cases(vectors):
        packet = bytes.fromhex(case["packet_hex"])
        assert transport.decode_field(case["post_data"].encode()) == packet
        assert transport.encode_field(packet) == case["post_data"]


def test_encode_round_trips_and_pads_to_blocks(
    vectors: dict[str, Any], vector_keys: v1.Keys
) -> None:
    for case in cases(vectors):
        data = case["plaintext"].encode()
        packet = v1.encode(vector_keys, data)
        assert len(packet) % 512 == 0
        assert len(packet) == len(bytes.fromhex(case["packet_hex"]))
        assert v1.decode(vector_keys, packet) == data


def test_480_byte_data_fits_one_block(vector_keys: v1.Keys) -> None:
    assert len(v1.encode(vector_keys, b"x" * 480)) == 512
    assert len(v1.encode(vector_keys, b"x" * 481)) == 1024


@pytest.mark.parametrize("size", [0, 1, 479, 480, 481, 992, 993, v1.MAX_DATA])
def test_a_prepared_sealer_seals_what_encode_would(vector_keys: v1.Keys, size: int) -> None:
    data = b"y" * size
    packet = v1.Sealer(vector_keys).seal(data)
    assert len(packet) == len(v1.encode(vector_keys, data))
    assert v1.decode(vector_keys, packet) == data


def test_a_sealer_seals_one_packet(vector_keys: v1.Keys) -> None:
    sealer = v1.Sealer(vector_keys)
    with pytest.raises(v1.PacketError):
        sealer.seal(b"z" * (v1.MAX_DATA + 1))
    packet = sealer.seal(b"{}")  # a refused size used nothing up
    assert v1.decode(vector_keys, packet) == b"{}"
    with pytest.raises(RuntimeError):  # its CBC state moved on: a second seal would not decode
        sealer.seal(b"{}")


def test_encoding_is_randomised(vector_keys: v1.Keys) -> None:
    assert v1.encode(vector_keys, b"{}") != v1.encode(vector_keys, b"{}")


def test_mac_identifies_content_not_packet_bytes(
    vectors: dict[str, Any], vector_keys: v1.Keys
) -> None:
    packet = bytes.fromhex(cases(vectors)[0]["packet_hex"])
    _, mac = v1.decode_with_mac(vector_keys, packet)
    _, mac2 = v1.decode_with_mac(
        vector_keys, v1.encode(vector_keys, cases(vectors)[0]["plaintext"].encode())
    )
    assert mac == mac2


def test_flipped_bits_in_the_tail_still_decode(
    vectors: dict[str, Any], vector_keys: v1.Keys
) -> None:
    """The spec's warning: the last 32 bytes are not authenticated."""
    packet = bytearray(bytes.fromhex(cases(vectors)[0]["packet_hex"]))
    packet[-1] ^= 0x01
    assert v1.decode(vector_keys, bytes(packet)) == cases(vectors)[0]["plaintext"].encode()


@pytest.mark.parametrize("offset", [0, 5, 17, 64, 120])
def test_flipped_bits_in_the_body_fail(
    vectors: dict[str, Any], vector_keys: v1.Keys, offset: int
) -> None:
    packet = bytearray(bytes.fromhex(cases(vectors)[1]["packet_hex"]))
    packet[offset] ^= 0x80
    with pytest.raises(v1.PacketError):
        v1.decode(vector_keys, bytes(packet))


def test_wrong_keys_fail(vectors: dict[str, Any]) -> None:
    with pytest.raises(v1.PacketError, match=r"HMAC|size"):
        v1.decode(v1.Keys.generate(), bytes.fromhex(cases(vectors)[0]["packet_hex"]))


@pytest.mark.parametrize("length", [0, 1, 511, 513, 1000])
def test_bad_lengths_fail(vector_keys: v1.Keys, length: int) -> None:
    with pytest.raises(v1.PacketError, match="multiple of 512"):
        v1.decode(vector_keys, b"\0" * length)


def test_oversized_packet_fails(vector_keys: v1.Keys) -> None:
    with pytest.raises(v1.PacketError, match="exceeds"):
        v1.decode(vector_keys, b"\0" * (transport.MAX_PACKET + 512))


def test_size_field_past_the_block_fails(vector_keys: v1.Keys) -> None:
    from Crypto.Cipher import AES

    block = b"RRRR" + (600).to_bytes(4, "big") + b"\0" * 504
    inner = AES.new(vector_keys.key1, AES.MODE_CBC, iv=vector_keys.iv1).encrypt(block)
    packet = AES.new(vector_keys.key2, AES.MODE_CBC, iv=vector_keys.iv2).encrypt(
        inner[-1:] + inner[:-1]
    )
    with pytest.raises(v1.PacketError, match="size field"):
        v1.decode(vector_keys, packet)


@pytest.mark.parametrize(
    "field",
    [b"", b"abc", b"!" * 683, b"A" * 682, b"A" * 684, b"A=" * 400, b"A" * 5000, b"A+" * 300],
)
def test_bad_field_encodings_fail(field: bytes) -> None:
    with pytest.raises(transport.TransportError):
        transport.decode_field(field)


def test_padded_field_is_accepted(vectors: dict[str, Any]) -> None:
    case = cases(vectors)[0]
    assert transport.decode_field(case["post_data"].encode() + b"=") == bytes.fromhex(
        case["packet_hex"]
    )


def test_keys_repr_hides_secrets(vector_keys: v1.Keys) -> None:
    assert "0011" not in repr(vector_keys)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [("key1", "00", "64 hex"), ("iv1", "zz" * 16, "not hexadecimal"), ("sign", "", "40 hex")],
)
def test_keys_from_hex_errors(vectors: dict[str, Any], name: str, value: str, message: str) -> None:
    values = dict(vectors["keys"])
    values[name] = value
    with pytest.raises(ValueError, match=message):
        v1.Keys.from_hex(values)


def test_request_builders_match_the_original_format(vectors: dict[str, Any]) -> None:
    from webknock.protocol import messages

    plain = [c["plaintext"] for c in cases(vectors)]
    assert messages.getinfo_request(1764000000, with_nonce=False).decode() == plain[0]
    ours = messages.openports_request(
        "192.0.2.10", [("tcp", 22), ("udp", 51820)], 3600, 1764000000, with_nonce=False
    )
    assert ours.decode() == plain[1]
    a, b = messages.getinfo_request(1), messages.getinfo_request(1)
    assert a != b and json.loads(a)["nonce"] != json.loads(b)["nonce"]


def test_parse_request_accepts_original_requests(vectors: dict[str, Any]) -> None:
    from webknock.protocol import messages

    info = messages.parse_request(cases(vectors)[0]["plaintext"].encode(), 1764000005, 15)
    assert isinstance(info, messages.GetInfo) and info.ts == 1764000000
    ports = messages.parse_request(cases(vectors)[1]["plaintext"].encode(), 1764000000, 15)
    assert isinstance(ports, messages.OpenPorts)
    assert ports.ports == (("tcp", 22), ("udp", 51820)) and ports.time == 3600
    with pytest.raises(messages.RequestError, match="from server time"):
        messages.parse_request(cases(vectors)[0]["plaintext"].encode(), 1764000016, 15)
