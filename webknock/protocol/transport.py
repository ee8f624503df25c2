"""Cheap, crypto-free checks of the HTTP `data` field (URL-safe Base64, no padding).

Everything here runs before pycryptodome is imported, so junk costs no more
than starting Python.
"""

from __future__ import annotations

import binascii

BLOCK = 512
#: Largest packet we accept (the original's requests fit in one or two blocks).
MAX_PACKET = 4 * BLOCK

_B64URL_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


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
    value = value.rstrip(b"=")
    if value.translate(None, _B64URL_ALPHABET):  # anything left is outside the alphabet
        raise TransportError("data field is not URL-safe base64")
    std = value.replace(b"-", b"+").replace(b"_", b"/")
    std += b"=" * (-len(std) % 4)
    try:
        packet = binascii.a2b_base64(std, strict_mode=True)
    except binascii.Error as exc:
        raise TransportError(f"data field is not base64: {exc}") from None
    if not packet or len(packet) % BLOCK:
        raise TransportError(f"packet length {len(packet)} is not a multiple of {BLOCK}")
    return packet


def encode_field(packet: bytes) -> str:
    """Encode packet bytes as the URL-safe, unpadded Base64 `data` field."""
    std = binascii.b2a_base64(packet, newline=False)
    return std.replace(b"+", b"-").replace(b"/", b"_").rstrip(b"=").decode("ascii")
