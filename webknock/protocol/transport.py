"""Cheap, crypto-free checks of the HTTP form fields that carry packets: ``data`` (v1)
and ``v2``, both URL-safe Base64 without padding.

The CGI runs these and nothing heavier: junk costs no more than starting Python, and
only a packet of a plausible shape is spooled for webknockd to verify.
"""

from __future__ import annotations

import binascii

BLOCK = 512
#: Largest packet we accept (the original's requests fit in one or two blocks).
MAX_PACKET = 4 * BLOCK

B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


#: v2 packets: magic, client key id, signature, then a body of 1..MAX_V2_BODY bytes.
V2_REQUEST_MAGIC = b"WK2Q"
V2_REPLY_MAGIC = b"WK2R"
V2_HEAD = 4 + 8 + 64
MAX_V2_BODY = 2048


class TransportError(ValueError):
    """The `data` field is not a well-formed packet encoding."""


def encoded_length_ok(n: int) -> bool:
    """True if `n` Base64 characters (unpadded) can carry a whole packet."""
    if n <= 0:
        return False
    # Unpadded Base64 of b bytes has ceil(4b/3) chars; b must be k*512.
    raw = (n * 3) // 4
    return raw % BLOCK == 0 and raw <= MAX_PACKET and -(-raw * 4 // 3) == n


def decode_field(value: bytes) -> bytes:
    """Decode the URL-safe Base64 `data` field into packet bytes, or raise TransportError."""
    value = value.strip()
    if not encoded_length_ok(len(value.rstrip(b"="))):
        raise TransportError(f"data field has bad length {len(value)}")
    packet = _b64url(value)
    check_v1_packet(packet)
    return packet


def check_v1_packet(packet: bytes) -> None:
    """Raise TransportError unless `packet` has a v1 packet's length."""
    if not packet or len(packet) % BLOCK or len(packet) > MAX_PACKET:
        raise TransportError(f"packet length {len(packet)} is not a multiple of {BLOCK}")


def check_v2_packet(packet: bytes) -> None:
    """Raise TransportError unless `packet` has a v2 request's magic and length."""
    if not packet.startswith(V2_REQUEST_MAGIC):
        raise TransportError("v2 packet has the wrong magic")
    if not V2_HEAD < len(packet) <= V2_HEAD + MAX_V2_BODY:
        raise TransportError(f"v2 packet of {len(packet)} bytes")


def _b64url(value: bytes) -> bytes:
    value = value.strip().rstrip(b"=")
    if value.translate(None, B64URL_ALPHABET):  # anything left is outside the alphabet
        raise TransportError("field is not URL-safe base64")
    std = value.replace(b"-", b"+").replace(b"_", b"/")
    std += b"=" * (-len(std) % 4)
    try:
        return binascii.a2b_base64(std, strict_mode=True)
    except binascii.Error as exc:
        raise TransportError(f"field is not base64: {exc}") from None


def decode_v2_field(value: bytes) -> bytes:
    """Decode the `v2` field into packet bytes with the right magic and lengths, or raise
    TransportError."""
    if len(value) > 4 * (V2_HEAD + MAX_V2_BODY) // 3 + 8:
        raise TransportError(f"v2 field of {len(value)} characters is too long")
    packet = _b64url(value)
    check_v2_packet(packet)
    return packet


def encode_field(packet: bytes) -> str:
    """Encode packet bytes as the URL-safe, unpadded Base64 `data` field."""
    std = binascii.b2a_base64(packet, newline=False)
    return std.replace(b"+", b"-").replace(b"/", b"_").rstrip(b"=").decode("ascii")
