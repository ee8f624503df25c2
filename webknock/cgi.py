"""webknock.cgi: the CGI program the web server runs for every knock (as the web user).

Order of work is chosen for cost: method, length and the shape of the `data`
field are checked before anything heavy is imported, so junk costs about as
much as starting Python. Only a well-formed packet loads config, keys and AES.
Nothing from Python ever reaches the client: failures are bare HTTP statuses,
details go to stderr (the web server's error log), one line each, with the peer.

Statuses: 200 a reply packet; 400 not a POST, no usable Content-Length, no `data`
field, or a malformed X-Forwarded-For from a trusted proxy; 403 undecodable or
unverifiable packet, stale timestamp (X-Webknock-Error says by how much), replayed
packet, `ip` not the peer; 405 wrong `ver` or unknown `api`; 413 body over 8 KiB;
429 this address sent too many bad packets (throttle); 500 misconfiguration only
(config, keys, REMOTE_ADDR); 503 the spool, replay cache or doorbell is unavailable
(full or read-only disk, too many CGIs at once) and nothing was applied; 504 webknockd
did not answer in time (see webknock.spool.Submitted.result for what that means for the grant).
"""

from __future__ import annotations

import os
import sys
import time

TYPE_CHECKING = False  # not `from typing import ...`: typing costs ~10 ms per request
if TYPE_CHECKING:
    from ipaddress import IPv4Network, IPv6Network

    from webknock.addresses import Address

    Network = IPv4Network | IPv6Network

MAX_BODY = 8192
STATUS = {
    200: "200 OK",
    400: "400 Bad Request",
    403: "403 Forbidden",
    405: "405 Method Not Allowed",
    413: "413 Content Too Large",
    429: "429 Too Many Requests",
    500: "500 Internal Server Error",
    503: "503 Service Unavailable",
    504: "504 Gateway Timeout",
}


class Reply(Exception):
    """Stop handling and answer with this status (and an optional body/header)."""

    def __init__(self, status: int, why: str = "", body: bytes = b"", note: str = "") -> None:
        super().__init__(why)
        self.status, self.why, self.body, self.note = status, why, body, note


def respond(out: object, status: int, body: bytes = b"", note: str = "") -> None:
    """Write a CGI response (Status header, then body)."""
    ctype = "application/octet-stream" if status == 200 else "text/plain"
    head = f"Status: {STATUS[status]}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
    head += "Cache-Control: no-store\r\n"
    if note:
        head += f"X-Webknock-Error: {note.replace('±', '+/-')}\r\n"
    out.write(head.encode("ascii", "replace") + b"\r\n" + body)  # type: ignore[attr-defined]
    out.flush()  # type: ignore[attr-defined]


def warn(msg: str) -> None:
    """One line to the web server's error log."""
    peer = os.environ.get("REMOTE_ADDR", "-")[:64]
    line = f"{peer}: {msg}"[:400]
    if not line.isprintable():  # nothing a client sent may forge a log line
        line = "".join(c if c.isprintable() else "?" for c in line)
    sys.stderr.write(f"webknock.cgi: {line}\n")
    sys.stderr.flush()


def form_field(body: bytes, name: bytes) -> bytes | None:
    """The value of `name` in an x-www-form-urlencoded body (first occurrence)."""
    for part in body.split(b"&"):
        key, sep, value = part.partition(b"=")
        if sep and key == name:
            if b"%" in value or b"+" in value:
                from urllib.parse import unquote_to_bytes

                value = unquote_to_bytes(value.replace(b"+", b" "))
            return value
    return None


def read_packet(environ: dict[str, str], stdin: object) -> bytes:
    """Cheap checks in order: method, length, field, encoding. Returns the packet bytes."""
    from webknock.protocol.transport import TransportError, decode_field

    if environ.get("REQUEST_METHOD", "") != "POST":
        raise Reply(400, f"method {environ.get('REQUEST_METHOD', '')[:10]!r} is not POST")
    length_text = environ.get("CONTENT_LENGTH", "")
    if not (length_text.isascii() and length_text.isdigit()):
        raise Reply(400, "no usable Content-Length")
    if len(length_text) > 9:
        raise Reply(413, f"body of {len(length_text)} digits exceeds {MAX_BODY} bytes")
    length = int(length_text)
    if length > MAX_BODY:
        raise Reply(413, f"body of {length} bytes exceeds {MAX_BODY}")
    body = stdin.read(length) if length else b""  # type: ignore[attr-defined]
    value = form_field(body, b"data")
    if value is None:
        raise Reply(400, "no data field")
    try:
        return decode_field(value)
    except TransportError as exc:
        raise Reply(403, str(exc)) from None


def client_address(environ: dict[str, str], trusted: tuple[Network, ...]) -> Address:
    """REMOTE_ADDR, or the last untrusted X-Forwarded-For hop when the peer is a trusted proxy."""
    from webknock.addresses import parse_address

    try:
        addr = parse_address(environ.get("REMOTE_ADDR", ""))
    except ValueError:
        raise Reply(500, f"REMOTE_ADDR {environ.get('REMOTE_ADDR', '')[:60]!r} unusable") from None
    if not trusted:
        return addr
    forwarded = environ.get("HTTP_X_FORWARDED_FOR", "")
    hops = [h.strip() for h in forwarded.split(",") if h.strip()]
    while hops and any(addr in net for net in trusted):
        try:
            hop = hops.pop()
            if "%" in hop:  # an IPv6 scope means nothing off this host
                raise ValueError(hop)
            addr = parse_address(hop)
        except ValueError:
            raise Reply(400, "malformed X-Forwarded-For from a trusted proxy") from None
    return addr


def handle(environ: dict[str, str], stdin: object, now: float) -> bytes:
    """Handle one request; return the reply packet or raise Reply."""
    packet = read_packet(environ, stdin)

    from webknock.config import ConfigError, load

    try:
        cfg = load(environ.get("WEBKNOCK_CONFIG") or None)
    except ConfigError as exc:
        raise Reply(500, f"configuration: {exc}") from None
    peer = client_address(environ, cfg.trusted_proxies)

    from webknock import spool

    guard = spool.Throttle(cfg.spool.seen, cfg.throttle_failures, cfg.throttle_window)
    if guard.blocked(peer, now):  # before keys and AES are loaded: a throttled flood is cheap
        raise Reply(429, "too many bad packets; throttled")

    from webknock.keys import KeysError, load_keys
    from webknock.protocol import v1
    from webknock.protocol.messages import GetInfo, RequestError, dumps, parse_request

    try:
        keys = load_keys(cfg.keys_file)
    except KeysError as exc:
        raise Reply(500, f"configuration: {exc}") from None
    try:
        data, mac = v1.decode_with_mac(keys, packet)
        request = parse_request(data, now, cfg.ts_window)
    except v1.PacketError as exc:
        guard.failed(peer, now)
        raise Reply(403, f"packet: {exc.reason}") from None
    except RequestError as exc:
        raise Reply(exc.status, exc.reason, note=exc.header) from None
    except (ValueError, ArithmeticError, RecursionError) as exc:  # sealed, values unexpected
        raise Reply(403, f"request: {type(exc).__name__}") from None
    try:
        fresh = spool.first_use(cfg.spool.seen, mac)
    except OSError as exc:  # accepting it unrecorded would allow a replay
        raise Reply(503, f"replay cache {cfg.spool.seen}: {exc.strerror}") from None
    if not fresh:
        guard.failed(peer, now)
        raise Reply(403, "replayed packet")

    if isinstance(request, GetInfo):
        reply = {
            "success": True,
            "tcp": sorted(cfg.tcp_ports),
            "udp": sorted(cfg.udp_ports),
            "maxtime": cfg.max_time,
            "ip": str(peer),
        }
        return v1.encode(keys, dumps(reply))
    if request.ip != peer:
        raise Reply(
            403,
            f"packet ip {request.ip} is not the peer address {peer}",
            note="address mismatch: the server sees another address",
        )
    offered = cfg.offered()
    ports = [p for p in request.ports if p in offered]
    if not ports:
        reply = {
            "success": False,
            "error": "none of the requested ports is offered",
            "errorcode": "NOPORTS",
        }
        return v1.encode(keys, dumps(reply))
    time_granted = min(max(request.time, 1), cfg.max_time) if request.time > 0 else cfg.max_time

    try:
        submitted = spool.submit(
            cfg, peer, ports, time_granted, now, environ.get("HTTP_USER_AGENT", "")
        )
    except OSError as exc:  # full or read-only spool, no descriptor left: never success
        raise Reply(503, f"spool unavailable: {exc}") from None
    with submitted:
        sealer = v1.Sealer(keys)  # while webknockd works on the request
        outcome = submitted.result(cfg.result_timeout)
    if outcome is None:
        raise Reply(504, "webknockd did not answer in time")
    if outcome.get("ok"):
        reply = {"success": True, "expires": int(outcome["expires"])}
    else:
        reply = {
            "success": False,
            "error": str(outcome.get("error", "refused")),
            "errorcode": str(outcome.get("errorcode", "ERROR")),
        }
    return sealer.seal(dumps(reply))


def main(*, detach: bool = True) -> int:
    """CGI entry point: always exits 0 after writing exactly one response; `detach` (the
    default, for the process the web server started) then hangs up stdout and stderr and
    ends the process at once.

    Ending it with ``os._exit`` skips the interpreter's teardown (freeing every module,
    pycryptodome's included: ~25 ms of CPU here), which no client waits for but which
    would compete for the CPU with the next knock and with webknockd. Nothing is left to
    flush by then: the answer and every log line are written, spool files and the
    doorbell closed and removed."""
    out = sys.stdout.buffer
    try:
        body = handle(dict(os.environ), sys.stdin.buffer, time.time())
    except Reply as reply:
        warn(f"{reply.status}: {reply.why}")
        status, body, note = reply.status, reply.body, reply.note
    except Exception as exc:  # never a traceback to the client
        warn(f"500: internal error: {type(exc).__name__}: {exc}")
        status, body, note = 500, b"", ""
    else:
        status, note = 200, ""
    try:
        respond(out, status, body, note)
    except OSError as exc:  # the client or web server went away
        warn(f"{status} not delivered: {exc}")
    if detach:
        hang_up()
        os._exit(0)
    return 0


def hang_up() -> None:
    """Give the web server its end of file now: the answer is complete, and what is left
    (the interpreter's shutdown) costs milliseconds that the client need not wait for.
    stdout and stderr become /dev/null for the rest."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        null = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for fd in (1, 2):
        try:
            os.dup2(null, fd)
        except OSError:
            pass
    os.close(null)
