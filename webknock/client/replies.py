"""The server's replies, checked: getinfo and openports bodies (v1 and v2) turned into what
the client uses, and a refusal into the client's error and exit code (v2: the signed refusal
codes of `V2_REFUSALS`). Everything here is untrusted input: whatever is bad or missing is
ServerFailed, and server text is printed only through `clean`."""

from __future__ import annotations

from typing import Any

from webknock.addresses import parse_address
from webknock.client.cache import ServerInfo
from webknock.client.errors import ClientError, Refused, ServerFailed, clean
from webknock.client.profile import Port
from webknock.protocol import v2

#: v2 refusal code -> (error class, what it means for the user). Exit codes: Refused 1,
#: ServerFailed 4. `clock` gets the measured skew in front.
V2_REFUSALS: dict[str, tuple[type[ClientError], str]] = {
    "bad_request": (
        Refused,
        "the server found the request malformed (is this client much older or newer than "
        "the server?)",
    ),
    "expired": (Refused, "this client's key has expired on the server: ask its admin to renew it"),
    "clock": (Refused, "set the clock right (NTP) and knock again"),
    "source": (Refused, "the server does not accept knocks for this client from this network"),
    "ip_mismatch": (Refused, "the server sees this host at another address than the one asked for"),
    "replay": (
        Refused,
        "the server had already seen this request (something resent it): knock again",
    ),
    "ports": (Refused, "the server does not let this client open any of the ports asked for"),
    "limit": (Refused, "the server's limit of open grants is reached: try again later"),
    "firewall": (
        ServerFailed,
        "the server's firewall failed to open the ports; nothing was opened",
    ),
}
#: Refusals after which a fresh getinfo may help (v1: any 403, or NOPORTS).
V2_STALE_CACHE = ("ip_mismatch", "ports")


def info_v1(obj: dict[str, Any]) -> ServerInfo:
    """A v1 getinfo reply; raises Refused (the server said no) or ServerFailed."""
    if obj.get("success") is not True:
        raise Refused(f"the server refused getinfo: {clean(obj.get('error', 'no reason given'))}")
    try:
        info = ServerInfo(
            tcp=_ports(obj.get("tcp")),
            udp=_ports(obj.get("udp")),
            maxtime=int(obj["maxtime"]),
            ip=str(parse_address(str(obj["ip"]))),
        )
        if info.maxtime <= 0:
            raise ValueError("maxtime")
    except (KeyError, ValueError, TypeError) as exc:
        raise ServerFailed(f"unexpected getinfo reply: bad or missing {clean(exc)}") from None
    return info


def expires_v1(obj: dict[str, Any]) -> int:
    """When the grant of a v1 openports reply expires; raises Refused or ServerFailed."""
    if obj.get("success") is not True:
        error = clean(obj.get("error", "no reason given"))
        code = clean(obj.get("errorcode", ""), 40)
        raise Refused(
            f"the server did not open the ports: {error}" + (f" ({code})" if code else ""),
            errorcode=code,
        )
    expires = obj.get("expires")
    if not isinstance(expires, int) or isinstance(expires, bool):
        raise ServerFailed(f"unexpected openports reply: expires is {clean(repr(expires))}")
    return expires


def info_v2(obj: dict[str, Any]) -> ServerInfo:
    """The body of a signed v2 getinfo reply; raises ServerFailed."""
    what = "ports"
    try:
        ports = _v2_ports(obj.get("ports"))
        what = "maxtime"
        maxtime = _int(obj.get("maxtime"))
        if maxtime is None or maxtime <= 0:
            raise ValueError
        what = "ip"
        ip = obj.get("ip")
        if not isinstance(ip, str):
            raise ValueError
        seen = str(parse_address(ip))
    except ValueError:
        raise ServerFailed(f"unexpected getinfo reply: bad or missing {what}") from None
    name = obj.get("client")
    return ServerInfo(
        tcp=tuple(n for proto, n in ports if proto == "tcp"),
        udp=tuple(n for proto, n in ports if proto == "udp"),
        maxtime=maxtime,
        ip=seen,
        client=clean(name, 64) if isinstance(name, str) else "",
    )


def opened_v2(obj: dict[str, Any]) -> tuple[int, tuple[Port, ...], str]:
    """The expiry, the ports and the address of a signed v2 openports reply (at least one
    port); raises ServerFailed."""
    what = "expires"
    try:
        expires = _int(obj.get("expires"))
        if expires is None:
            raise ValueError
        what = "ports"
        granted = _v2_ports(obj.get("ports"))
        if not granted:
            raise ValueError
        what = "ip"
        ip = obj.get("ip")
        if not isinstance(ip, str):
            raise ValueError
        return expires, granted, str(parse_address(ip))
    except ValueError:
        raise ServerFailed(f"unexpected openports reply: bad or missing {what}") from None


def server_time(obj: dict[str, Any]) -> int | None:
    """The `time` of a v2 reply (the server's clock), or None when it has none."""
    return _int(obj.get("time"))


def refusal_v2(obj: dict[str, Any], api: str, now: float) -> ClientError:
    """The error for a signed refusal `{"success":false,"code":..,"error":..,"time":..}`;
    `now` is this host's clock, to tell the skew of a `clock` refusal."""
    raw_code = obj.get("code")
    code = clean(raw_code, 40) if isinstance(raw_code, str) and raw_code else ""
    reason = clean(obj.get("error") or "no reason given")
    said = f"(server: {code}: {reason})" if code else f"(server: {reason})"
    known = V2_REFUSALS.get(code)
    if known is None:
        return Refused(f"the server refused {api}: {said}", errorcode=code)
    cls, meaning = known
    if code == "clock":
        meaning = f"{clock_skew(obj.get('time'), now)}: {meaning}"
    if cls is Refused:
        return Refused(f"{meaning} {said}", errorcode=code)
    return cls(f"{meaning} {said}")


def clock_skew(server_time: Any, local_time: float) -> str:
    """How far this host's clock is off, from a reply's `time` and the local time."""
    server = _int(server_time)
    if server is None:
        return "this host's clock is off from the server's (the reply does not say by how much)"
    # `time` is whole seconds, cut like Unix time: the server's clock read up to 1 s more
    off = round(server + 0.5 - local_time)
    if off > 0:
        return f"this host's clock is {_duration(off)} behind the server's"
    if off < 0:
        return f"this host's clock is {_duration(-off)} ahead of the server's"
    return "this host's clock agrees with the server's within a second (yet the server refused it)"


def _ports(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value
    ):
        raise ValueError("port list")
    return tuple(value)


def _v2_ports(value: Any) -> tuple[Port, ...]:
    """`["tcp/22", "udp/51820"]` of a v2 reply; raises ValueError."""
    if not isinstance(value, list) or len(value) > 65536 * 2:
        raise ValueError("ports")
    ports: list[Port] = []
    for item in value:
        match = v2.PORT.fullmatch(item) if isinstance(item, str) else None
        if not match or not 1 <= int(match[2]) <= 65535:
            raise ValueError("ports")
        port = (match[1], int(match[2]))
        if port not in ports:
            ports.append(port)
    return tuple(ports)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds} s ({seconds // 60} min)"
    if seconds < 172800:
        return f"{seconds} s ({seconds // 3600} h {seconds % 3600 // 60} min)"
    return f"{seconds} s ({seconds // 86400} days)"
