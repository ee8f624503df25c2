"""HTTP for the client: one POST per exchange, from a chosen address family, errors in words.

`requests` has no address-family switch. For `ipv4`/`ipv6` we resolve the host ourselves
and mount a `PinnedAdapter` that connects to one resolved address while the Host header,
TLS SNI and certificate check still use the host name of the URL.
"""

from __future__ import annotations

import logging
import socket
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter

from webknock.client.errors import (
    ClientError,
    ConfigError,
    Refused,
    ServerFailed,
    Unreachable,
    clean,
)
from webknock.protocol.transport import BLOCK, MAX_PACKET, V2_REPLY_MAGIC, encode_field

if TYPE_CHECKING:  # typeshed's names for what build_connection_pool_key_attributes returns
    from requests.adapters import _HostParams, _PoolKwargs

log = logging.getLogger(__name__)

FAMILY = {"any": socket.AF_UNSPEC, "ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}
USER_AGENT = "webknock-client/1"
RESOLVE_TTL = 60.0  # seconds a resolved server address is reused for the local-address poll
MAX_V2_REPLY = 65536  # bytes; a signed v2 reply is a few hundred
FIELDS = ("data", "v2")  # the form field of each protocol: v1 and v2

_REFUSED = {
    400: "the server refused the request as malformed (400 Bad Request): is the URL the "
    "webknock CGI?",
    403: "the server refused the knock (403 Forbidden): wrong keys, a clock more than the "
    "allowed window off, or the address it sees is not the one in the request",
    404: "no webknock at this URL (404 Not Found): check url in the profile",
    405: "this URL does not take knocks (405 Method Not Allowed): it is probably not a "
    "webknock endpoint but a plain web page (check url in the profile), or the server does "
    "not speak this protocol version",
    413: "the server refused the request as too large (413 Content Too Large)",
    429: "the server throttles this address after too many bad packets (429 Too Many "
    "Requests): check the keys, then wait a minute",
}
_FAILED = {
    500: "the server is misconfigured (500 Internal Server Error): see its web server error log",
    502: "the web server could not run webknock (502 Bad Gateway): is fcgiwrap running?",
    503: "the server cannot record knocks right now (503 Service Unavailable): nothing was "
    "opened; try again later",
    504: "the server's webknockd did not answer in time (504 Gateway Timeout): it is not "
    "running or overloaded; nothing was opened",
}


_V2_403 = (
    "the server refused this client's key (403 Forbidden): it is not enrolled there, or "
    "disabled, or the request did not verify (server_key in the profile not this server's, "
    "or the server does not speak v2)"
)


def status_error(status: int, note: str = "", protocol: str = "v1") -> ClientError:
    """The error for an HTTP status other than 200; `note` is the X-Webknock-Error header
    (untrusted: printed only through `clean`)."""
    note = clean(note)
    if protocol == "v2" and status == 403:  # bare: no trusted client key was found
        return Refused(f"{_V2_403}: {note}" if note else _V2_403, status)
    if status in _REFUSED:
        text = _REFUSED[status]
        if note:
            text = f"the server refused the knock ({status}): {note}"
        return Refused(text, status)
    text = _FAILED.get(status, f"the server answered HTTP {status} instead of a reply packet")
    return ServerFailed(f"{text}: {note}" if note else text)


def _reason(exc: BaseException) -> str:
    """The innermost useful words of a requests/urllib3 exception chain."""
    todo, seen, last = [exc], set(), exc
    while todo:
        cur = todo.pop(0)
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        last = cur
        if (
            isinstance(cur, OSError)
            and cur.strerror
            and not isinstance(cur, requests.RequestException)
        ):
            return clean(cur.strerror)
        todo += [a for a in cur.args if isinstance(a, BaseException)]
        todo += [
            e
            for e in (getattr(cur, "reason", None), cur.__cause__, cur.__context__)
            if isinstance(e, BaseException)
        ]
    return clean(last)  # may quote what the server sent (a bad status line, a name)


class ConnectFailed(Unreachable):
    """No connection to this address (another address of the host may still work)."""


@dataclass(frozen=True)
class Endpoint:
    """The URL's host, port and the Host header to send."""

    scheme: str
    host: str
    port: int
    netloc: str

    @classmethod
    def of(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ConfigError(f"url {url!r} has no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port, parts.netloc.rpartition("@")[2])


def resolve(host: str, port: int, family: str) -> list[str]:
    """Addresses of `host` in `family` (getaddrinfo order, duplicates removed)."""
    try:
        infos = socket.getaddrinfo(host, port, FAMILY[family], socket.SOCK_STREAM)
    except socket.gaierror as exc:
        where = {"ipv4": " (IPv4)", "ipv6": " (IPv6)"}.get(family, "")
        raise Unreachable(f"cannot resolve {host}{where}: {exc.strerror}") from None
    addresses: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in addresses:
            addresses.append(addr)
    return addresses


def local_address(server: str, port: int) -> str | None:
    """The source address the kernel would use to reach `server` (no packet is sent)."""
    family = socket.AF_INET6 if ":" in server else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((server, port))
            return str(s.getsockname()[0])
    except OSError:
        return None


class PinnedAdapter(HTTPAdapter):
    """Connect to `address`; Host, SNI and certificate checks stay on `hostname`."""

    def __init__(self, address: str, hostname: str) -> None:
        self.address, self.hostname = address, hostname
        super().__init__(max_retries=0)

    def build_connection_pool_key_attributes(
        self, request: requests.PreparedRequest, verify: Any, cert: Any = None
    ) -> tuple[_HostParams, _PoolKwargs]:
        host_params, pool_kwargs = super().build_connection_pool_key_attributes(
            request, verify, cert
        )
        host_params["host"] = self.address
        if host_params["scheme"] == "https":
            tls = cast(dict[str, Any], pool_kwargs)
            tls["server_hostname"] = self.hostname
            if verify is not False:
                tls["assert_hostname"] = self.hostname
        return host_params, pool_kwargs


class Transport:
    """POSTs packets to one URL from one address family (`any`, `ipv4` or `ipv6`)."""

    def __init__(self, url: str, family: str, verify: bool | str, timeout: float) -> None:
        if family not in FAMILY:
            raise ConfigError(f"family {family!r}: use any, ipv4 or ipv6 here")
        self.url, self.family, self.verify, self.timeout = url, family, verify, timeout
        self.endpoint = Endpoint.of(url)
        self._resolved: tuple[float, list[str]] | None = None

    def addresses(self) -> list[str]:
        addresses = resolve(self.endpoint.host, self.endpoint.port, self.family)
        self._resolved = (time.monotonic(), addresses)
        return addresses

    def local_address(self) -> str | None:
        """Our source address towards the server's first address; None when unroutable.

        Polled every few seconds by `keep`: the route lookup is cheap, name resolution is
        reused for RESOLVE_TTL seconds.
        """
        try:
            if self._resolved and time.monotonic() - self._resolved[0] < RESOLVE_TTL:
                first = self._resolved[1][0]
            else:
                first = self.addresses()[0]
        except (ClientError, IndexError):
            return None
        return local_address(first, self.endpoint.port)

    def post(self, packet: bytes, field: str = "data") -> bytes:
        """Send one packet in form field `field` (`data`: v1, `v2`: v2); return the reply
        packet or raise a ClientError."""
        if field not in FIELDS:
            raise ValueError(f"form field {field!r}")
        body = {field: encode_field(packet)}
        if self.family == "any":
            return self._send(body, None)
        addresses = self.addresses()
        for i, address in enumerate(addresses):
            try:
                return self._send(body, address)
            except ConnectFailed as exc:
                if i + 1 == len(addresses):
                    raise
                log.info("%s: %s; trying the next address", address, exc.message)
        raise Unreachable(f"{self.endpoint.host} has no {self.family} address")

    def _send(self, body: dict[str, str], address: str | None) -> bytes:
        headers = {"User-Agent": USER_AGENT}
        with requests.Session() as session:
            session.mount("http://", HTTPAdapter(max_retries=0))
            session.mount("https://", HTTPAdapter(max_retries=0))
            kwargs: dict[str, Any] = {}
            if address is not None:
                session.mount(
                    f"{self.endpoint.scheme}://", PinnedAdapter(address, self.endpoint.host)
                )
                headers["Host"] = self.endpoint.netloc
                kwargs["proxies"] = {"http": None, "https": None}  # a proxy would hide the family
            where = f"{self.endpoint.host}" + (f" ({address})" if address else "")
            try:
                with warnings.catch_warnings():
                    if self.verify is False:
                        warnings.simplefilter("ignore", urllib3.exceptions.InsecureRequestWarning)
                    resp = session.post(
                        self.url,
                        data=body,
                        headers=headers,
                        timeout=self.timeout,
                        verify=self.verify,
                        allow_redirects=False,
                        stream=True,
                        **kwargs,
                    )
                    try:
                        limit = MAX_V2_REPLY if "v2" in body else MAX_PACKET
                        content = resp.raw.read(limit + 1, decode_content=True)
                    finally:
                        resp.close()
            except requests.exceptions.SSLError as exc:
                raise Unreachable(f"TLS failure with {where}: {_reason(exc)}") from None
            except requests.exceptions.ConnectTimeout:
                raise ConnectFailed(
                    f"cannot connect to {where}: timed out after {self.timeout:g}s"
                ) from None
            except (requests.exceptions.ReadTimeout, urllib3.exceptions.ReadTimeoutError):
                raise Unreachable(
                    f"{where} accepted the connection but did not answer within {self.timeout:g}s"
                ) from None
            except requests.exceptions.ConnectionError as exc:
                raise ConnectFailed(f"cannot connect to {where}: {_reason(exc)}") from None
            except (requests.exceptions.InvalidURL, requests.exceptions.MissingSchema) as exc:
                raise ConfigError(f"url {self.url!r}: {exc}") from None
            except requests.RequestException as exc:
                raise Unreachable(f"request to {where} failed: {_reason(exc)}") from None
        if resp.status_code in (301, 302, 303, 307, 308):
            target = clean(resp.headers.get("Location", "?"))
            raise ServerFailed(
                f"the server redirects ({resp.status_code}) to {target}: "
                "put that URL in the profile"
            )
        protocol = "v2" if "v2" in body else "v1"
        if resp.status_code != 200:
            note = resp.headers.get("X-Webknock-Error", "").strip()
            raise status_error(resp.status_code, note, protocol)
        if protocol == "v2":
            if not content.startswith(V2_REPLY_MAGIC) or len(content) > MAX_V2_REPLY:
                raise ServerFailed(
                    f"undecodable reply from {where}: {len(content)} bytes is not a v2 reply "
                    "(is the URL the webknock CGI?)"
                )
            return content
        if not content or len(content) % BLOCK or len(content) > MAX_PACKET:
            raise ServerFailed(
                f"undecodable reply from {where}: {len(content)} bytes is not a v1 packet "
                "(is the URL the webknock CGI?)"
            )
        return content
