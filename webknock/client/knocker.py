"""The knock itself: getinfo (cached) then openports, over one Transport, in v1 or v2.

v1 seals requests and replies with the keys shared with the server. v2 signs each request
with this client's key and believes a reply only when it verifies against the server key the
profile pins, for exactly the request sent (docs/protocol-v2.md). What the replies say is
checked by :mod:`webknock.client.replies`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from webknock.client.cache import Cache, ServerInfo
from webknock.client.credentials import Credentials, V2Keys
from webknock.client.errors import ConfigError, Refused, ServerFailed
from webknock.client.profile import Port, Profile, format_ports
from webknock.client.replies import (
    V2_STALE_CACHE,
    expires_v1,
    info_v1,
    info_v2,
    opened_v2,
    refusal_v2,
    server_time,
)
from webknock.protocol import messages, v1, v2

log = logging.getLogger(__name__)


class Poster(Protocol):
    """What the knocker needs of a transport (net.Transport, or a test double)."""

    family: str

    def post(self, packet: bytes, field: str = "data") -> bytes: ...

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


class Knocker:
    """Knocks for one profile from one address family."""

    def __init__(
        self,
        profile: Profile,
        keys: Credentials,
        transport: Poster,
        cache: Cache | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.profile, self.keys, self.transport, self.cache = profile, keys, transport, cache
        self.clock = clock
        self.requests = 0
        self.scope = ""  # v1 cache entries have none
        if isinstance(keys, V2Keys):
            self.scope = f"v2 {keys.client.kid.hex()} {keys.server_kid.hex()}"

    @property
    def family(self) -> str:
        return self.transport.family

    @property
    def protocol(self) -> str:
        return "v2" if isinstance(self.keys, V2Keys) else "v1"

    def _exchange(self, data: bytes) -> dict[str, Any]:
        keys = self.keys
        if not isinstance(keys, v1.Keys):
            raise TypeError("a v1 exchange needs v1 keys")
        self.requests += 1
        reply = self.transport.post(v1.encode(keys, data))
        try:
            obj = json.loads(v1.decode(keys, reply))
        except v1.PacketError as exc:
            raise ServerFailed(
                f"undecodable reply (not sealed with our keys): {exc.reason}"
            ) from None
        except (ValueError, UnicodeDecodeError):
            raise ServerFailed("undecodable reply: the sealed content is not JSON") from None
        if not isinstance(obj, dict):
            raise ServerFailed("undecodable reply: not a JSON object")
        return obj

    def _exchange_v2(self, body: dict[str, Any]) -> dict[str, Any]:
        """Send a signed request; return the body of the reply the pinned server signed for
        it, or raise: a refusal as its error, anything unverified as ServerFailed."""
        keys = self.keys
        if not isinstance(keys, V2Keys):
            raise TypeError("a v2 exchange needs v2 keys")
        self.requests += 1
        try:
            packet = v2.encode_request(keys.client, keys.server_kid, v2.dumps(body))
        except v2.V2Error as exc:
            raise ConfigError(f"cannot sign this request: {exc} (ask for fewer ports)") from None
        reply = self.transport.post(packet, "v2")
        try:
            signed = v2.verify_reply(keys.server, packet, reply)
        except v2.V2Error:
            raise ServerFailed(
                "the reply is not signed by the server this profile pins (server_key in "
                f"{self.profile.path}), or not for this request: not believed"
            ) from None
        try:
            obj = json.loads(signed.decode("utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ServerFailed("unexpected reply: the signed body is not JSON") from None
        if not isinstance(obj, dict):
            raise ServerFailed("unexpected reply: the signed body is not a JSON object")
        if obj.get("success") is not True:
            raise refusal_v2(obj, str(body["api"]), self.clock())
        return obj

    def info(self) -> ServerInfo:
        """Ask the server what it offers and which address it sees (and cache it)."""
        local = self.transport.local_address()
        info = self._info_v2() if self.protocol == "v2" else self._info_v1()
        if self.cache is not None:
            self.cache.store(self.profile.url, info, local, self.clock(), self.scope)
        return info

    def _info_v1(self) -> ServerInfo:
        return info_v1(self._exchange(messages.getinfo_request(int(self.clock()))))

    def _info_v2(self) -> ServerInfo:
        body = {"api": "getinfo", "ts": int(self.clock()), "nonce": v2.new_nonce()}
        return info_v2(self._exchange_v2(body))

    def cached_info(self) -> ServerInfo | None:
        if self.cache is None:
            return None
        return self.cache.load(
            self.profile.url, self.transport.local_address(), self.clock(), self.scope
        )

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
        if self.protocol == "v2":
            return self._open_v2(info, ports, seconds)
        data = messages.openports_request(info.ip, list(ports), seconds, int(self.clock()))
        expires = expires_v1(self._exchange(data))
        return Grant(
            family=self.family,
            ip=info.ip,
            ports=ports,
            expires=expires,
            seconds=max(0, expires - int(self.clock())),
            requests=self.requests,
        )

    def _open_v2(self, info: ServerInfo, ports: tuple[Port, ...], seconds: int) -> Grant:
        body = {
            "api": "openports",
            "ts": int(self.clock()),
            "nonce": v2.new_nonce(),
            "ip": info.ip,
            "ports": [v2.port_text(p) for p in ports],
            "time": seconds,
        }
        obj = self._exchange_v2(body)
        expires, granted, opened_for = opened_v2(obj)
        left = [p for p in ports if p not in granted]
        if left:
            log.warning(
                "the server opened %s but not %s", format_ports(granted), format_ports(left)
            )
        now = server_time(obj)  # the server's clock: the lifetime does not depend on ours
        return Grant(
            family=self.family,
            ip=opened_for,
            ports=granted,
            expires=expires,
            seconds=max(0, expires - (int(self.clock()) if now is None else now)),
            requests=self.requests,
        )

    def _stale_cache(self, exc: Refused) -> bool:
        """Whether a refusal of a knock made with cached getinfo may be the cache's fault."""
        if self.protocol == "v2":  # a bare 403 is about the key: asking again cannot help
            return exc.errorcode in V2_STALE_CACHE
        return exc.status == 403 or exc.errorcode == "NOPORTS"

    def knock(self) -> Grant:
        """Open the ports: one request with a cached getinfo, else two.

        A 403 after a cached getinfo (usually: our address changed), or a NOPORTS refusal
        (the server no longer offers what the cache says), drops the cache and asks getinfo
        once more before giving up; in v2 the signed refusals ip_mismatch and ports do.
        """
        self.requests = 0
        info = self.cached_info()
        if info is None:
            return self.open(self.info())
        try:
            return self.open(info)
        except Refused as exc:
            if not self._stale_cache(exc):
                raise
            log.info(
                "refused with the cached getinfo (address %s): %s; asking the server again",
                info.ip,
                exc.message,
            )
            if self.cache is not None:
                self.cache.drop()
        return self.open(self.info())
