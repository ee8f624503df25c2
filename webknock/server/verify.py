"""What webknockd believes of a spooled request: the packet verified with a key only root
holds, fresh, and for the address it came from.

:class:`Verifier` turns a :class:`~webknock.spool.reader.SpooledRequest` and the client
address into a :class:`Verified` request, or raises :class:`Refusal` with the answer to
send. The replay mark is not burnt here (the daemon burns the marks of a batch in one
transaction, after these checks: a copy sent first from another address fails the
address check and spoils nothing). Replies are sealed by the :class:`Replies` of the
request's protocol, so the daemon never needs to know which one it is answering.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

from webknock.addresses import Address
from webknock.config import ServerConfig
from webknock.keys import KeysError, load_keys, load_server_key
from webknock.protocol import v1, v2
from webknock.protocol.messages import GetInfo, RequestError, dumps, parse_request
from webknock.server.clients import Client, ClientRegistry
from webknock.spool.reader import SpooledRequest

log = logging.getLogger(__name__)

K = TypeVar("K")

Port = tuple[str, int]


@dataclass(frozen=True)
class Answer:
    """What the CGI sends back: an HTTP status, an X-Webknock-Error note, a body."""

    status: int
    note: str = ""
    body: bytes = b""


class Refusal(Exception):
    """The request ends here with `answer`; `bad`: the packet did not verify or was a
    replay (counted by the throttle)."""

    def __init__(self, answer: Answer, reason: str, *, bad: bool = False) -> None:
        super().__init__(reason)
        self.answer, self.reason, self.bad = answer, reason, bad


class Replies:
    """Seals the replies to one verified request (one implementation per protocol)."""

    def info(self, peer: Address, ports: frozenset[Port], max_time: int, now: float) -> Answer:
        raise NotImplementedError

    def granted(self, ip: Address, ports: tuple[Port, ...], expires: int, now: float) -> Answer:
        raise NotImplementedError

    def refused(self, code: str, error: str, now: float) -> Answer:
        """`code`: REPLAY, NOPORTS, LIMIT, FIREWALL, STATE, INVALID."""
        raise NotImplementedError


class V1Replies(Replies):
    """Replies of protocol v1: sealed with the shared keys; a replay gets a bare 403."""

    def __init__(self, keys: v1.Keys) -> None:
        self.keys = keys

    def _seal(self, reply: dict[str, object]) -> Answer:
        return Answer(200, body=v1.encode(self.keys, dumps(reply)))

    def info(self, peer: Address, ports: frozenset[Port], max_time: int, now: float) -> Answer:
        tcp = sorted(n for p, n in ports if p == "tcp")
        udp = sorted(n for p, n in ports if p == "udp")
        return self._seal(
            {"success": True, "tcp": tcp, "udp": udp, "maxtime": max_time, "ip": str(peer)}
        )

    def granted(self, ip: Address, ports: tuple[Port, ...], expires: int, now: float) -> Answer:
        return self._seal({"success": True, "expires": expires})

    def refused(self, code: str, error: str, now: float) -> Answer:
        if code == "REPLAY":
            return Answer(403)
        return self._seal({"success": False, "error": error, "errorcode": code})


class V2Replies(Replies):
    """Replies of protocol v2: signed with the server key and bound to the request."""

    #: The spec's refusal codes for the daemon's outcome codes.
    CODES = {
        "REPLAY": "replay",
        "NOPORTS": "ports",
        "LIMIT": "limit",
        "FIREWALL": "firewall",
        "STATE": "firewall",
    }

    def __init__(self, server: v2.SigningKey, packet: bytes, client: Client) -> None:
        self.server, self.packet, self.client = server, packet, client

    def _seal(self, reply: dict[str, object]) -> Answer:
        return Answer(200, body=v2.encode_reply(self.server, self.packet, v2.dumps(reply)))

    def info(self, peer: Address, ports: frozenset[Port], max_time: int, now: float) -> Answer:
        return self._seal(
            {
                "success": True,
                "client": self.client.name,
                "ip": str(peer),
                "ports": [v2.port_text(p) for p in sorted(ports)],
                "maxtime": max_time,
                "time": int(now),
            }
        )

    def granted(self, ip: Address, ports: tuple[Port, ...], expires: int, now: float) -> Answer:
        reply: dict[str, object] = {
            "success": True,
            "client": self.client.name,
            "ip": str(ip),
            "ports": [v2.port_text(p) for p in ports],
            "expires": expires,
            "time": int(now),
        }
        prefixlen = self.client.prefix_for(ip)
        if prefixlen is not None:  # open_prefix: the network opened around `ip`
            reply["net"] = str(ipaddress.ip_network((ip, prefixlen), strict=False))
        return self._seal(reply)

    def refused(self, code: str, error: str, now: float) -> Answer:
        code = self.CODES.get(code, code)
        return self._seal({"success": False, "code": code, "error": error, "time": int(now)})


@dataclass(frozen=True)
class Verified:
    """A request whose packet verified and passed the time and address checks."""

    id: str
    peer: Address
    api: str  # "getinfo" or "openports"
    mark: bytes  # replay mark: the packet's authenticated identity
    replies: Replies
    allowed: frozenset[Port]  # the ports this client may open
    max_time: int  # this client's longest grant
    ports: tuple[Port, ...] = ()  # openports: asked for and allowed
    time: int = 0  # openports: seconds, already capped to max_time
    client: str | None = None  # v2: the enrolled client's name
    user_agent: str = field(default="", compare=False)
    prefixlen: int | None = None  # openports of a client with open_prefix: open peer's network
    protocol: str = "v1"  # which protocol's packet it was


class KeyFile(Generic[K]):
    """A key file, read again whenever it changes (device, inode, size or mtime)."""

    def __init__(self, path: Path, load: Callable[[Path], K]) -> None:
        self.path, self._load = path, load
        self._stamp: tuple[int, int, int, float] | None = None
        self._value: K | None = None

    def current(self) -> K | None:
        """The key, None when there is no file; raises KeysError for one that cannot be
        read or loaded."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeysError(f"{self.path}: cannot read: {exc.strerror}") from None
        stamp = (st.st_dev, st.st_ino, st.st_size, st.st_mtime)
        if stamp != self._stamp or self._value is None:
            self._value = self._load(self.path)
            self._stamp = stamp
        return self._value


class Verifier:
    """Verifies spooled packets with the instance's keys (re-read when the file changes)."""

    def __init__(self, cfg: ServerConfig, registry: ClientRegistry | None = None) -> None:
        self.cfg = cfg
        self.clients = registry or ClientRegistry(cfg.clients_dir)
        keys = cfg.keys_file
        self._keys_file = None if keys is None else KeyFile(keys, load_keys)
        self._server_file = KeyFile(cfg.server_key_file, load_server_key)
        self._logged: dict[str, str] = {}  # per key file, the problem last logged

    def refresh(self) -> None:
        """Re-read clients_dir if it changed (once per batch): an enrolment, a change or a
        removal takes effect for the next knock. Problems are logged once per change."""
        if self.clients.refresh():
            for problem in self.clients.problems:
                log.error("client file skipped: %s", problem)

    def server_key(self) -> v2.SigningKey | None:
        """The v2 server key, read again when the file changed; None: v2 is off (no file).
        Raises KeysError for a file that is there but unusable."""
        return self._server_file.current()

    def _keys_failed(self, exc: KeysError, what: str) -> Refusal:
        if self._logged.get(what) != str(exc):  # once per new problem, not per knock
            log.error("%s: %s", what, exc)
            self._logged[what] = str(exc)
        return Refusal(Answer(500), f"{what} unusable: {exc}")

    def v1_keys(self) -> v1.Keys:
        """The v1 keys, read again when the file changed; raises KeysError."""
        if self._keys_file is None:
            raise KeysError("v1 is not enabled: no keys_file")
        keys = self._keys_file.current()
        if keys is None:
            raise KeysError(f"{self._keys_file.path}: cannot read: {os.strerror(errno.ENOENT)}")
        return keys

    def verify(self, req: SpooledRequest, peer: Address, now: float) -> Verified:
        """Verify one request (raises Refusal)."""
        if req.protocol == "v1":
            return self._verify_v1(req, peer, now)
        return self._verify_v2(req, peer, now)

    def _verify_v1(self, req: SpooledRequest, peer: Address, now: float) -> Verified:
        if self.cfg.keys_file is None:
            raise Refusal(Answer(403), "protocol v1 is not enabled on this instance", bad=True)
        try:
            keys = self.v1_keys()
        except KeysError as exc:
            raise self._keys_failed(exc, "v1 keys") from None
        self._logged.pop("v1 keys", None)
        try:
            data, mac = v1.decode_with_mac(keys, req.packet)
        except v1.PacketError as exc:
            raise Refusal(Answer(403), f"packet: {exc.reason}", bad=True) from None
        try:
            request = parse_request(data, now, self.cfg.ts_window)
        except RequestError as exc:
            raise Refusal(Answer(exc.status, exc.header), exc.reason) from None
        except (ValueError, ArithmeticError, RecursionError) as exc:  # sealed, values unexpected
            raise Refusal(Answer(403), f"request: {type(exc).__name__}") from None
        offered, max_time = self.cfg.offered(), self.cfg.max_time
        ports: tuple[Port, ...] = ()
        seconds = 0
        if isinstance(request, GetInfo):
            api = "getinfo"
        else:
            if request.ip != peer:
                raise Refusal(
                    Answer(403, "address mismatch: the server sees another address"),
                    f"packet ip {request.ip} is not the client address {peer}",
                )
            api = "openports"
            ports = tuple(p for p in request.ports if p in offered)
            seconds = min(max(request.time, 1), max_time) if request.time > 0 else max_time
        return Verified(
            id=req.id,
            peer=peer,
            api=api,
            mark=b"v1:" + mac,
            replies=V1Replies(keys),
            allowed=offered,
            max_time=max_time,
            ports=ports,
            time=seconds,
            user_agent=req.agent,
        )

    def _verify_v2(self, req: SpooledRequest, peer: Address, now: float) -> Verified:
        """The checks of docs/protocol-v2.md in their order: signature (bare 403), then
        body, expiry, clock, source, address (signed refusals); the replay mark, ports,
        limits and firewall are the daemon's next steps."""
        try:
            server = self.server_key()
        except KeysError as exc:
            raise self._keys_failed(exc, "v2 server key") from None
        if server is None:
            raise Refusal(Answer(403), "protocol v2 is not enabled on this instance", bad=True)
        self._logged.pop("v2 server key", None)
        try:
            kid, _signature, body = v2.split_request(req.packet)
        except v2.V2Error as exc:
            raise Refusal(Answer(403), f"packet: {exc}", bad=True) from None
        client = self.clients.lookup(kid)
        if client is None or not client.enabled:
            why = "unknown key" if client is None else f"client {client.name} is disabled"
            raise Refusal(Answer(403), f"{why} (kid {kid.hex()})", bad=True)
        try:
            v2.verify_request(client.public, server.kid, req.packet)
        except v2.V2Error as exc:
            raise Refusal(Answer(403), f"client {client.name}: {exc}", bad=True) from None
        replies = V2Replies(server, req.packet, client)

        def refuse(code: str, error: str, reason: str) -> Refusal:
            return Refusal(replies.refused(code, error, now), f"client {client.name}: {reason}")

        try:
            request = v2.parse_body(body)
        except v2.V2Error as exc:
            raise refuse("bad_request", str(exc), f"bad request: {exc}") from None
        if client.expired(now):
            raise refuse("expired", "this key has expired", f"key expired {client.expires}")
        skew = request.ts - int(now)
        window = self.cfg.v2_ts_window
        if abs(skew) > window:
            raise refuse(
                "clock",
                f"the request's time is {skew:+d} s off the server's (allowed +/-{window} s)",
                f"clock skew {skew:+d} s",
            )
        if not client.admits(peer):
            raise refuse("source", "not allowed from this address", f"{peer} not in from")
        if request.api == "openports" and request.ip != peer:
            raise refuse(
                "ip_mismatch",
                "ip is not the address the request came from",
                f"packet ip {request.ip} is not the client address {peer}",
            )
        allowed = client.allowed(self.cfg.offered())
        longest = client.longest(self.cfg.max_time)
        wanted = request.ports or tuple(sorted(allowed))
        seconds = min(request.time, longest) if request.time > 0 else longest
        return Verified(
            id=req.id,
            peer=peer,
            api=request.api,
            mark=b"v2:" + kid + request.nonce.encode(),
            replies=replies,
            allowed=allowed,
            max_time=longest,
            ports=tuple(p for p in wanted if p in allowed) if request.api == "openports" else (),
            time=seconds if request.api == "openports" else 0,
            client=client.name,
            user_agent=req.agent,
            prefixlen=client.prefix_for(peer) if request.api == "openports" else None,
            protocol="v2",
        )
