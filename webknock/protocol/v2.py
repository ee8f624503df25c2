"""Packet codec of protocol v2: one Ed25519 key pair per client (docs/protocol-v2.md).

request = "WK2Q" || client kid (8) || Ed25519(client, REQUEST_CONTEXT || server kid || body) || body
reply   = "WK2R" || Ed25519(server, REPLY_CONTEXT || SHA-256(request) || body) || body

Keys are pycryptodome's; private keys are stored as PKCS#8 PEM, public keys travel as
``wk2:`` + base64url of their 32 raw bytes (+ an optional comment after a space).
"""

from __future__ import annotations

import binascii
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

from Crypto.PublicKey import ECC
from Crypto.Signature import eddsa

from webknock.addresses import Address, parse_address
from webknock.protocol.transport import (
    MAX_V2_BODY,
    V2_HEAD,
    V2_REPLY_MAGIC,
    V2_REQUEST_MAGIC,
)

REQUEST_CONTEXT = b"webknock v2 request\x00"
REPLY_CONTEXT = b"webknock v2 reply\x00"
KEY_PREFIX = "wk2:"
KID_LEN = 8
SIG_LEN = 64
NONCE = re.compile(r"[A-Za-z0-9_-]{16,64}")
PORT = re.compile(r"(tcp|udp)/([0-9]{1,5})")
APIS = ("getinfo", "openports")


class V2Error(ValueError):
    """A key text, packet or body that is not valid v2; the message says why."""


def _b64url_decode(text: str) -> bytes:
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise V2Error("not base64url")
    try:
        return binascii.a2b_base64(
            (text.replace("-", "+").replace("_", "/") + "=" * (-len(text) % 4)).encode(),
            strict_mode=True,
        )
    except binascii.Error as exc:
        raise V2Error(f"not base64url: {exc}") from None


def _b64url_encode(raw: bytes) -> str:
    return (
        binascii.b2a_base64(raw, newline=False)
        .decode()
        .rstrip("=")
        .replace("+", "-")
        .replace("/", "_")
    )


def key_id(public: bytes) -> bytes:
    """The 8-byte id of a raw public key."""
    return hashlib.sha256(public).digest()[:KID_LEN]


def public_key_text(public: bytes, comment: str = "") -> str:
    """``wk2:<base64url>`` (and `` comment`` when given)."""
    text = KEY_PREFIX + _b64url_encode(public)
    return f"{text} {comment}" if comment else text


def parse_public_key(text: str) -> tuple[bytes, str]:
    """(32 raw bytes, comment) of a public key text; raises V2Error."""
    word, _, comment = text.strip().partition(" ")
    if not word.startswith(KEY_PREFIX):
        raise V2Error(f"a public key starts with {KEY_PREFIX!r}")
    raw = _b64url_decode(word[len(KEY_PREFIX) :])
    if len(raw) != 32:
        raise V2Error(f"a public key is 32 bytes, this one {len(raw)}")
    try:
        eddsa.import_public_key(raw)
    except ValueError:
        raise V2Error("not a point of Ed25519") from None
    return raw, comment.strip()


class SigningKey:
    """An Ed25519 private key (a client's or the server's)."""

    def __init__(self, key: ECC.EccKey) -> None:
        if key.curve != "Ed25519" or not key.has_private():
            raise V2Error("not an Ed25519 private key")
        self._key = key
        self.public = key.public_key().export_key(format="raw")
        self.kid = key_id(self.public)

    def __repr__(self) -> str:  # never leak secrets into logs
        return f"SigningKey(kid={self.kid.hex()})"

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(ECC.generate(curve="Ed25519"))

    @classmethod
    def from_seed(cls, seed: bytes) -> SigningKey:
        return cls(ECC.construct(curve="Ed25519", seed=seed))

    @classmethod
    def from_pem(cls, pem: str) -> SigningKey:
        """Read a PKCS#8 PEM private key; raises V2Error."""
        try:
            return cls(ECC.import_key(pem))
        except (ValueError, IndexError, TypeError):
            raise V2Error("not a PKCS#8 PEM Ed25519 private key") from None

    def to_pem(self) -> str:
        pem: str = self._key.export_key(format="PEM")
        return pem + "\n"

    def public_text(self, comment: str = "") -> str:
        return public_key_text(self.public, comment)

    def sign(self, message: bytes) -> bytes:
        signature: bytes = eddsa.new(self._key, "rfc8032").sign(message)
        return signature


def verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """Whether `signature` is `public`'s over `message`."""
    try:
        eddsa.new(eddsa.import_public_key(public), "rfc8032").verify(message, signature)
    except ValueError:
        return False
    return True


# -- packets ------------------------------------------------------------------------------


def encode_request(client: SigningKey, server_kid: bytes, body: bytes) -> bytes:
    """Sign `body` (UTF-8 JSON) for the server `server_kid`."""
    if not 1 <= len(body) <= MAX_V2_BODY:
        raise V2Error(f"a body is 1 to {MAX_V2_BODY} bytes")
    signature = client.sign(REQUEST_CONTEXT + server_kid + body)
    return V2_REQUEST_MAGIC + client.kid + signature + body


def split_request(packet: bytes) -> tuple[bytes, bytes, bytes]:
    """(client kid, signature, body) of a request packet; raises V2Error."""
    if not packet.startswith(V2_REQUEST_MAGIC) or not V2_HEAD < len(packet) <= (
        V2_HEAD + MAX_V2_BODY
    ):
        raise V2Error("not a v2 request packet")
    kid = packet[4 : 4 + KID_LEN]
    return kid, packet[4 + KID_LEN : V2_HEAD], packet[V2_HEAD:]


def verify_request(public: bytes, server_kid: bytes, packet: bytes) -> bytes:
    """The body of a request packet signed by `public`; raises V2Error."""
    _kid, signature, body = split_request(packet)
    if not verify(public, REQUEST_CONTEXT + server_kid + body, signature):
        raise V2Error("signature does not verify")
    return body


def encode_reply(server: SigningKey, request_packet: bytes, body: bytes) -> bytes:
    digest = hashlib.sha256(request_packet).digest()
    return V2_REPLY_MAGIC + server.sign(REPLY_CONTEXT + digest + body) + body


def verify_reply(server_public: bytes, request_packet: bytes, reply: bytes) -> bytes:
    """The body of `reply` if the server signed it for exactly `request_packet`; raises
    V2Error."""
    if not reply.startswith(V2_REPLY_MAGIC) or len(reply) < 4 + SIG_LEN + 2:
        raise V2Error("not a v2 reply")
    signature, body = reply[4 : 4 + SIG_LEN], reply[4 + SIG_LEN :]
    digest = hashlib.sha256(request_packet).digest()
    if not verify(server_public, REPLY_CONTEXT + digest + body, signature):
        raise V2Error("reply signature does not verify against the server key")
    return body


# -- bodies -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """A v2 request body, well formed (step 0 of the checks)."""

    api: str
    ts: int
    nonce: str
    ip: Address | None = None
    ports: tuple[tuple[str, int], ...] = ()  # empty: every port the client may open
    time: int = 0  # 0: the client's longest grant


def _int(obj: dict[str, Any], name: str, default: int | None = None) -> int:
    value = obj.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise V2Error(f"{name} is not an integer")
    return value


def _address_or_none(value: Any) -> Address | None:
    if not isinstance(value, str) or "%" in value:
        return None
    try:
        return parse_address(value)
    except ValueError:
        return None


def parse_body(body: bytes) -> Request:
    """Check a request body's shape; raises V2Error (answered ``bad_request``)."""
    try:
        obj = json.loads(body.decode("utf-8"))  # UTF-8 only: no BOM, no UTF-16/32
    except (ValueError, RecursionError):  # UnicodeDecodeError included
        raise V2Error("body is not JSON (in UTF-8)") from None
    if not isinstance(obj, dict):
        raise V2Error("body is not a JSON object")
    api = obj.get("api")
    if api not in APIS:
        raise V2Error("unknown api")
    ts = _int(obj, "ts")
    nonce = obj.get("nonce")
    if not isinstance(nonce, str) or not NONCE.fullmatch(nonce):
        raise V2Error("nonce is not 16-64 characters of A-Z a-z 0-9 _ -")
    raw_ip = obj.get("ip")
    if api == "getinfo":  # its ip is informational only: never a reason to refuse
        return Request(api, ts, nonce, _address_or_none(raw_ip))
    ip = _address_or_none(raw_ip)
    if ip is None:
        raise V2Error("ip is not an address")
    raw_ports = obj.get("ports", [])
    if not isinstance(raw_ports, list) or len(raw_ports) > 256:
        raise V2Error("ports is not a list of at most 256 entries")
    ports: list[tuple[str, int]] = []
    for item in raw_ports:
        match = PORT.fullmatch(item) if isinstance(item, str) else None
        if not match or not 1 <= int(match[2]) <= 65535:
            raise V2Error("a port is not tcp/N or udp/N")
        pair = (match[1], int(match[2]))
        if pair not in ports:
            ports.append(pair)
    seconds = _int(obj, "time", 0)
    if seconds < 0:
        raise V2Error("time is negative")
    return Request(api, ts, nonce, ip, tuple(ports), seconds)


def port_text(port: tuple[str, int]) -> str:
    return f"{port[0]}/{port[1]}"


def new_nonce() -> str:
    return _b64url_encode(os.urandom(16))


def dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()
