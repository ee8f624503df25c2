"""webknock.cgi: the CGI program the web server runs for every knock (as the web user).

It frames and relays; it holds no secret and decides nothing. It checks what can be
checked without a key (method, length, the form field and its Base64, the packet's
magic and length), writes the raw packet with REMOTE_ADDR, X-Forwarded-For and
User-Agent into the spool, rings its doorbell and returns what webknockd answers: the
HTTP status, the X-Webknock-Error note and the sealed reply, byte for byte. It imports
no crypto and no config parser: a knock costs little more than starting Python.

Statuses of its own: 400 not a POST, no usable Content-Length, no packet field; 403 a
field that is not a packet (Base64, magic, length); 413 body over 8 KiB; 500 a config
the CGI cannot read; 503 the spool is unavailable (full, read-only, too many CGIs at
once) and nothing was applied; 504 webknockd did not answer in time (see
:meth:`webknock.spool.request.Submitted.answer` for what that means for the grant). Every other
status is webknockd's. Nothing from Python ever reaches the client: details go to
stderr (the web server's error log), one line each, with the peer.
"""

from __future__ import annotations

import os
import sys

from webknock.spool.doorbell import STATUSES

MAX_BODY = 8192


class Reply(Exception):
    """Stop handling and answer with this status."""

    def __init__(self, status: int, why: str = "") -> None:
        super().__init__(why)
        self.status, self.why = status, why


def respond(out: object, status: int, body: bytes = b"", note: str = "", headers: str = "") -> None:
    """Write a CGI response (Status header, then body); `headers` replace the default
    Content-Type (CRLF-terminated lines)."""
    ctype = "application/octet-stream" if status == 200 else "text/plain"
    head = f"Status: {STATUSES[status]}\r\n"
    head += headers or f"Content-Type: {ctype}\r\n"
    head += f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
    if note:
        head += f"X-Webknock-Error: {note}\r\n"
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


def packet_field(body: bytes) -> tuple[str, bytes] | None:
    """The first packet field (``data`` or ``v2``) of an x-www-form-urlencoded body: its
    name and value."""
    for part in body.split(b"&"):
        key, sep, value = part.partition(b"=")
        if sep and key in (b"data", b"v2"):
            return key.decode(), unquote(value)
    return None


def unquote(value: bytes) -> bytes:
    """Undo form encoding (``+`` and ``%XX``) as urllib.parse.unquote_to_bytes would, without
    importing it (it loads re and ipaddress); a ``%`` not followed by two hex digits stays."""
    value = value.replace(b"+", b" ")
    if b"%" not in value:
        return value
    parts = value.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) >= 2 and not part[:2].translate(None, b"0123456789abcdefABCDEF"):
            out.append(bytes((int(part[:2], 16),)) + part[2:])
        else:
            out.append(b"%" + part)
    return b"".join(out)


def read_packet(environ: dict[str, str], stdin: object) -> tuple[str, bytes]:
    """Cheap checks in order: method, length, field, encoding. Returns (field, packet)."""
    from webknock.protocol.transport import TransportError, decode_field, decode_v2_field

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
    found = packet_field(body)
    if found is None:
        raise Reply(400, "no data or v2 field")
    name, value = found
    try:
        return name, (decode_field(value) if name == "data" else decode_v2_field(value))
    except TransportError as exc:
        raise Reply(403, str(exc)) from None


def browser_page(environ: dict[str, str]) -> tuple[bytes, str]:
    """The browser client (``[server] browser_page = yes``) with the server's public key
    and a fresh CSP nonce in it, and its headers; raises Reply."""
    import binascii

    from webknock.cgi import conf as cgiconf

    config = environ.get(cgiconf.ENV_CONFIG) or cgiconf.DEFAULT_CONFIG
    try:
        spool_dir = cgiconf.read_page_settings(config)
    except cgiconf.CgiConfigError as exc:
        raise Reply(500, f"configuration: {exc}") from None
    if spool_dir is None:
        raise Reply(400, "GET: the browser page is off (browser_page = no)")
    from webknock.protocol.transport import B64URL_ALPHABET
    from webknock.spool import SERVER_KEY_NAME

    try:
        with open(os.path.join(spool_dir, SERVER_KEY_NAME), "rb") as fh:
            server_key = fh.read(200).strip()
        with open(os.path.join(os.path.dirname(__file__), "page.html"), "rb") as fh:
            page = fh.read()
    except OSError as exc:
        raise Reply(503, f"browser page: {exc} (is v2 on and webknockd running?)") from None
    if not server_key.startswith(b"wk2:") or server_key[4:].translate(None, B64URL_ALPHABET):
        raise Reply(503, "browser page: the published server key is malformed")
    nonce = binascii.b2a_base64(os.urandom(18), newline=False)
    body = page.replace(b"__WK_SERVER_KEY__", server_key).replace(b"__WK_NONCE__", nonce)
    csp = (
        "default-src 'none'; script-src 'nonce-{n}'; style-src 'nonce-{n}'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    ).format(n=nonce.decode())
    headers = (
        "Content-Type: text/html; charset=utf-8\r\n"
        f"Content-Security-Policy: {csp}\r\n"
        "X-Content-Type-Options: nosniff\r\nReferrer-Policy: no-referrer\r\n"
        "X-Frame-Options: DENY\r\nCross-Origin-Opener-Policy: same-origin\r\n"
    )
    return body, headers


def handle(environ: dict[str, str]) -> tuple[int, str, bytes]:
    """Relay one request; return (status, note, body) or raise Reply."""
    name, packet = read_packet(environ, sys.stdin.buffer)

    from webknock.cgi import conf as cgiconf
    from webknock.spool import FIELDS
    from webknock.spool import request as spool

    config = environ.get(cgiconf.ENV_CONFIG) or cgiconf.DEFAULT_CONFIG
    try:
        spool_dir, timeout = cgiconf.read_cgi_settings(config)
    except cgiconf.CgiConfigError as exc:
        raise Reply(500, f"configuration: {exc}") from None
    frame = spool.encode_request(
        FIELDS[name],
        environ.get("REMOTE_ADDR", ""),
        environ.get("HTTP_X_FORWARDED_FOR", ""),
        environ.get("HTTP_USER_AGENT", ""),
        packet,
    )
    try:
        submitted = spool.submit(spool_dir, frame)
    except OSError as exc:  # full or read-only spool, no descriptor left: never success
        raise Reply(503, f"spool unavailable: {exc}") from None
    with submitted:
        answer = submitted.answer(timeout)
    if answer is None:
        raise Reply(504, "webknockd did not answer in time")
    return answer


def main(*, detach: bool = True) -> int:
    """CGI entry point: always exits 0 after writing exactly one response; `detach` (the
    default, for the process the web server started) then hangs up stdout and stderr and
    ends the process at once (no interpreter teardown for the next knock to compete with)."""
    headers = ""
    try:
        environ = dict(os.environ)
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            body, headers = browser_page(environ)
            status, note = 200, ""
            if environ["REQUEST_METHOD"] == "HEAD":
                body = b""
        else:
            status, note, body = handle(environ)
    except Reply as reply:
        warn(f"{reply.status}: {reply.why}")
        status, note, body = reply.status, "", b""
    except Exception as exc:  # never a traceback to the client
        warn(f"500: internal error: {type(exc).__name__}: {exc}")
        status, note, body = 500, "", b""
    try:
        respond(sys.stdout.buffer, status, body, note, headers if status == 200 else "")
    except OSError as exc:  # the client or web server went away
        warn(f"{status} not delivered: {exc}")
    if detach:
        hang_up()
        os._exit(0)
    return 0


def hang_up() -> None:
    """Give the web server its end of file now: the answer is complete. stdout and stderr
    become /dev/null for the rest."""
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
