"""The JSON requests and replies carried inside v1 packets."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from webknock.addresses import Address, parse_address

MAX_PORTS = 256


class RequestError(ValueError):
    """A well-sealed packet whose request we refuse; `status` is the HTTP status to send."""

    def __init__(self, status: int, reason: str, header: str = "") -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.header = header  # short text safe to show an authenticated client


@dataclass(frozen=True)
class GetInfo:
    ts: int
    ip: Address | None = None


@dataclass(frozen=True)
class OpenPorts:
    ts: int
    ip: Address
    ports: tuple[tuple[str, int], ...]
    time: int


def _int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, str) and value.isdigit():  # PHP clients may send numbers as strings
            return int(value)
        raise RequestError(403, f"{what} is not an integer")
    return value


def parse_request(data: bytes, now: float, window: int) -> GetInfo | OpenPorts:
    """Parse and check a decrypted request (version, api, timestamp, fields)."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise RequestError(403, "request is not JSON") from None
    if not isinstance(obj, dict):
        raise RequestError(403, "request is not a JSON object")
    if obj.get("ver") != 1:
        raise RequestError(405, f"unsupported ver {obj.get('ver')!r}")
    api = obj.get("api")
    if api not in ("getinfo", "openports"):
        raise RequestError(405, f"unknown api {str(api)[:32]!r}")
    ts = _int(obj.get("ts"), "ts")
    if abs(ts - now) > window:
        raise RequestError(
            403,
            f"timestamp {ts} is {ts - int(now):+d}s from server time",
            f"clock skew: request time is {ts - int(now):+d}s off the server's {int(now)} "
            f"(allowed +/-{window}s); fix the client's clock",
        )
    ip: Address | None = None
    if obj.get("ip") not in (None, ""):
        try:
            ip = parse_address(str(obj["ip"]))
        except ValueError:
            raise RequestError(403, f"ip {str(obj['ip'])[:64]!r} is not an address") from None
    if api == "getinfo":
        return GetInfo(ts=ts, ip=ip)
    if ip is None:
        raise RequestError(403, "openports without ip")
    raw_ports = obj.get("ports")
    if not isinstance(raw_ports, list) or len(raw_ports) > MAX_PORTS:
        raise RequestError(403, "ports is not a list of at most 256 entries")
    ports: list[tuple[str, int]] = []
    for item in raw_ports:
        if not isinstance(item, dict):
            raise RequestError(403, "port entry is not an object")
        proto = str(item.get("proto", "")).lower()
        num = _int(item.get("num"), "port num")
        if proto in ("tcp", "udp") and 1 <= num <= 65535 and (proto, num) not in ports:
            ports.append((proto, num))
    return OpenPorts(ts=ts, ip=ip, ports=tuple(ports), time=_int(obj.get("time", 0), "time"))


def dumps(obj: dict[str, Any]) -> bytes:
    """Compact JSON as the original emits it."""
    return json.dumps(obj, separators=(",", ":")).encode()


def nonce() -> str:
    """Random request id: two requests in the same second must not look like a replay.

    Servers key their replay cache on the authenticated content; the original server
    ignores fields it does not know, so this stays wire compatible.
    """
    return os.urandom(8).hex()


def getinfo_request(ts: int, ip: str | None = None, *, with_nonce: bool = True) -> bytes:
    req: dict[str, Any] = {"api": "getinfo", "ver": 1, "ts": ts}
    if ip:
        req["ip"] = ip
    if with_nonce:
        req["nonce"] = nonce()
    return dumps(req)


def openports_request(
    ip: str, ports: list[tuple[str, int]], time: int, ts: int, *, with_nonce: bool = True
) -> bytes:
    req: dict[str, Any] = {
        "api": "openports",
        "ip": ip,
        "ports": [{"proto": proto.upper(), "num": num} for proto, num in ports],
        "time": time,
        "ver": 1,
        "ts": ts,
    }
    if with_nonce:
        req["nonce"] = nonce()
    return dumps(req)
