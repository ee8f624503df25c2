"""Packet codec of protocol v1 (see docs/protocol-v1.md).

block  = R4 || u32be(len(data)) || data || HMAC-SHA1(sign, data) || R4'  (+ random pad to 512)
packet = AES256-CBC(key2, iv2, rotr1(AES256-CBC(key1, iv1, block)))
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass

from webknock.protocol.aes import AES
from webknock.protocol.transport import BLOCK, MAX_PACKET

HMAC_LEN = 20
OVERHEAD = 4 + 4 + HMAC_LEN + 4  # 32 bytes around the data
MAX_DATA = MAX_PACKET - OVERHEAD

_KEY_SIZES = {"key1": 32, "iv1": 16, "key2": 32, "iv2": 16, "sign": 20}


class PacketError(ValueError):
    """A packet could not be decoded or verified; `reason` is for logs only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, repr=False)
class Keys:
    """The five shared secrets of one installation."""

    key1: bytes
    iv1: bytes
    key2: bytes
    iv2: bytes
    sign: bytes

    def __post_init__(self) -> None:
        for name, size in _KEY_SIZES.items():
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != size:
                raise ValueError(f"{name} must be {size} bytes ({size * 2} hex characters)")

    def __repr__(self) -> str:  # never leak secrets into logs
        return "Keys(<secret>)"

    @classmethod
    def from_hex(cls, values: dict[str, str]) -> Keys:
        """Build from the lowercase-hex values used by the original installation."""
        raw: dict[str, bytes] = {}
        for name, size in _KEY_SIZES.items():
            text = values.get(name)
            if text is None:
                raise ValueError(f"missing {name}")
            text = text.strip()
            if len(text) != size * 2:
                raise ValueError(f"{name} must be {size * 2} hex characters, got {len(text)}")
            try:
                raw[name] = bytes.fromhex(text)
            except ValueError:
                raise ValueError(f"{name} is not hexadecimal") from None
        return cls(**raw)

    @classmethod
    def generate(cls) -> Keys:
        """Fresh keys from the OS CSPRNG."""
        return cls(**{name: os.urandom(size) for name, size in _KEY_SIZES.items()})

    def to_hex(self) -> dict[str, str]:
        return {name: getattr(self, name).hex() for name in _KEY_SIZES}


def _rotr1(data: bytes) -> bytes:
    return data[-1:] + data[:-1]


def _rotl1(data: bytes) -> bytes:
    return data[1:] + data[:1]


#: Random bytes one seal takes at most: R4, R4' and a pad of up to BLOCK - 1.
_RANDOM = 8 + BLOCK - 1


class Sealer:
    """The sealing of one packet, made ready before its data is known: the HMAC, both
    ciphers and the random bytes. The CGI makes its reply's while webknockd works on the
    request, so that only the cheap part remains once the answer is in."""

    def __init__(self, keys: Keys) -> None:
        self._mac = hmac.new(keys.sign, digestmod=hashlib.sha1)
        self._inner = AES.new(keys.key1, AES.MODE_CBC, iv=keys.iv1)
        self._outer = AES.new(keys.key2, AES.MODE_CBC, iv=keys.iv2)
        self._random: bytes | None = os.urandom(_RANDOM)

    def seal(self, data: bytes) -> bytes:
        """Seal `data` (UTF-8 JSON) into a packet; once only (CBC ciphers carry state)."""
        if self._random is None:
            raise RuntimeError("a Sealer seals one packet")
        if len(data) > MAX_DATA:
            raise PacketError(f"data of {len(data)} bytes exceeds {MAX_DATA}")
        rand, self._random = self._random, None
        self._mac.update(data)
        block = rand[:4] + struct.pack(">I", len(data)) + data + self._mac.digest() + rand[4:8]
        block += rand[8 : 8 + (-len(block) % BLOCK)]
        return self._outer.encrypt(_rotr1(self._inner.encrypt(block)))


def encode(keys: Keys, data: bytes) -> bytes:
    """Seal `data` (UTF-8 JSON) into a packet."""
    return Sealer(keys).seal(data)


def decode_with_mac(keys: Keys, packet: bytes) -> tuple[bytes, bytes]:
    """Open and verify a packet; return (data, mac). The MAC identifies the content."""
    if not packet or len(packet) % BLOCK:
        raise PacketError(f"packet length {len(packet)} is not a non-zero multiple of {BLOCK}")
    if len(packet) > MAX_PACKET:
        raise PacketError(f"packet length {len(packet)} exceeds {MAX_PACKET}")
    outer = AES.new(keys.key2, AES.MODE_CBC, iv=keys.iv2).decrypt(packet)
    block = AES.new(keys.key1, AES.MODE_CBC, iv=keys.iv1).decrypt(_rotl1(outer))
    (size,) = struct.unpack_from(">I", block, 4)
    if size > len(block) - OVERHEAD:
        raise PacketError(f"size field {size} runs past the block of {len(block)}")
    data = block[8 : 8 + size]
    mac = block[8 + size : 8 + size + HMAC_LEN]
    expected = hmac.new(keys.sign, data, hashlib.sha1).digest()
    if not hmac.compare_digest(mac, expected):
        raise PacketError("HMAC mismatch (wrong keys or altered packet)")
    return data, mac


def decode(keys: Keys, packet: bytes) -> bytes:
    """Open and verify a packet; return its data."""
    return decode_with_mac(keys, packet)[0]
