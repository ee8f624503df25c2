"""The knock itself: getinfo (cached) then openports, over one Transport."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from webknock.addresses import parse_address
from webknock.client.cache import Cache, ServerInfo
from webknock.client.errors import Refused, ServerFailed
from webknock.client.profile import Port, Profile, format_ports
from webknock.protocol import messages, v1

log = logging.getLogger(__name__)


class Poster(Protocol):
    """What the knocker needs of a transport (net.Transport, or a test double)."""

    family: str

    def post(self, packet: bytes) -> bytes: ...

    def local_address(self) -> str | None: ...


@dataclass(frozen=True)
class Grant:
    """What one knock opened."""

    family: str
    ip: str
    ports: tuple[Port, ...]
    expires: int
    seconds: int  # granted lifetime as seen from here
    requests: int  # HTTP requests this knock took

    def as_json(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "ip": self.ip,
            "ports": [f"{proto}/{num}" for proto, num in self.ports],
            "expires": self.expires,
            "seconds": self.seconds,
            "requests": self.requests,
        }


def _ports(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= 65535 for p in value
    ):
        raise ValueError("port list")
    return tuple(value)


class Knocker:
    """Knocks for one profile from one address family."""

    def __init__(
        self,
        profile: Profile,
        keys: v1.Keys,
        transport: Poster,
        cache: Cache | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile, self.keys, self.transport, self.cache = profile, keys, transport, cache
        self.clock = clock
        self.requests = 0

    @property
    def family(self) -> str:
        return self.transport.family

    def _exchange(self, data: bytes) -> dict[str, Any]:
        self.requests += 1
        reply = self.transport.post(v1.encode(self.keys, data))
        try:
            obj = json.loads(v1.decode(self.keys, reply))
        except v1.PacketError as exc:
            raise ServerFailed(
                f"undecodable reply (not sealed with our keys): {exc.reason}"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise ServerFailed("undecodable reply: the sealed content is not JSON") from None
        if not isinstance(obj, dict):
            raise ServerFailed("undecodable reply: not a JSON object")
        return obj

    def info(self) -> ServerInfo:
        """Ask the server what it offers and which address it sees (and cache it)."""
        local = self.transport.local_address()
        obj = self._exchange(messages.getinfo_request(int(self.clock())))
        if obj.get("success") is not True:
            raise Refused(f"the server refused getinfo: {obj.get('error', 'no reason given')}")
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
            raise ServerFailed(f"unexpected getinfo reply: bad or missing {exc}") from None
        if self.cache is not None:
            self.cache.store(self.profile.url, info, local, self.clock())
        return info

    def cached_info(self) -> ServerInfo | None:
        if self.cache is None:
            return None
        return self.cache.load(self.profile.url, self.transport.local_address(), self.clock())

    def plan(self, info: ServerInfo) -> tuple[tuple[Port, ...], int]:
        """The ports to ask for (wanted and offered) and the time (capped by the server)."""
        offered = info.offered()
        wanted = self.profile.ports or offered
        ports = tuple(p for p in wanted if p in offered)
        missing = [p for p in wanted if p not in offered]
        if missing:
            log.warning(
                "the server does not offer %s (it offers %s)",
                format_ports(missing),
                format_ports(offered) or "nothing",
            )
        if not ports:
            raise Refused(
                f"none of the ports asked for ({format_ports(wanted) or 'none'}) is offered by "
                f"the server (it offers {format_ports(offered) or 'nothing'})"
            )
        seconds = min(self.profile.time or info.maxtime, info.maxtime)
        return ports, seconds

    def open(self, info: ServerInfo) -> Grant:
        ports, seconds = self.plan(info)
        data = messages.openports_request(info.ip, list(ports), seconds, int(self.clock()))
        obj = self._exchange(data)
        if obj.get("success") is not True:
            error = str(obj.get("error", "no reason given"))[:200]
            code = str(obj.get("errorcode", ""))[:40]
            raise Refused(
                f"the server did not open the ports: {error}" + (f" ({code})" if code else ""),
                errorcode=code,
            )
        expires = obj.get("expires")
        if not isinstance(expires, int) or isinstance(expires, bool):
            raise ServerFailed(f"unexpected openports reply: expires is {expires!r}")
        return Grant(
            family=self.family,
            ip=info.ip,
            ports=ports,
            expires=expires,
            seconds=max(0, expires - int(self.clock())),
            requests=self.requests,
        )

    def knock(self) -> Grant:
        """Open the ports: one request with a cached getinfo, else two.

        A 403 after a cached getinfo (usually: our address changed), or a NOPORTS refusal
        (the server no longer offers what the cache says), drops the cache and asks getinfo
        once more before giving up.
        """
        self.requests = 0
        info = self.cached_info()
        if info is None:
            return self.open(self.info())
        try:
            return self.open(info)
        except Refused as exc:
            if exc.status != 403 and exc.errorcode != "NOPORTS":
                raise
            log.info(
                "refused with the cached getinfo (address %s): %s; asking the server again",
                info.ip,
                exc.message,
            )
            if self.cache is not None:
                self.cache.drop()
        return self.open(self.info())
