"""Client failures, each with the exit code the command line returns for it, and `clean`
for any text that came from the server."""

from __future__ import annotations

import unicodedata
from collections.abc import Iterable

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_SERVER = 4

EXIT_CODES_HELP = """exit codes:
  0  the ports are open (info: the server answered; keygen, pubkey: done)
  1  the server refused the knock (HTTP 400/403/405/413/429, or it answered "not granted";
     v2: a signed refusal such as clock, source, ports, limit, expired)
  2  bad configuration or usage (profile, keys file, key file, options; keygen: the key
     file exists already)
  3  cannot reach the server (name resolution, connection, TLS, timeout)
  4  the server failed (HTTP 500/503/504 or another status, undecodable reply; v2: its
     firewall failed, or the reply is not signed by the server key the profile pins)
exec returns the command's own status once it ran (128+N when a signal N ended it).
several servers (--profile a,b,c or a profile group): 0 only when every server granted
(info: answered), else the highest code of any one of them (4 > 3 > 2 > 1); exec runs
CMD only when every server granted."""


def worst(codes: Iterable[int]) -> int:
    """The exit code of a fan-out: 0 when every server succeeded, else the highest code."""
    return max(codes, default=EXIT_OK)


#: How much of one piece of server text (an error header, a reason) is ever printed.
MAX_SERVER_TEXT = 200


def clean(text: object, limit: int | None = MAX_SERVER_TEXT) -> str:
    """`text` (from the server: untrusted) made safe for a terminal or a log line.

    Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned and
    line/paragraph separator characters become visible escapes such as ``\\x1b``, so a
    hostile server cannot move the cursor, recolour, retitle or rewrite the terminal, nor
    start a line of its own; the result is cut to `limit` characters (None: no cut).
    """
    raw = text if isinstance(text, str) else str(text)
    if limit is not None:
        raw = raw[: limit + 1]
    out = []
    for ch in raw:
        if unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp"):
            out.append(ch.encode("unicode_escape", "backslashreplace").decode("ascii"))
        else:
            out.append(ch)
    safe = "".join(out)
    if limit is not None and len(safe) > limit:
        safe = safe[: max(0, limit - 3)] + "..."
    return safe


class ClientError(Exception):
    """A failure reported as one line; `code` is the exit status."""

    code = EXIT_SERVER

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ClientError):
    """The profile, the keys file or an option is wrong."""

    code = EXIT_CONFIG


class Refused(ClientError):
    """The server understood and refused.

    `status` is the HTTP status, or 0 for a refusal reply with its `errorcode`.
    """

    code = EXIT_REFUSED

    def __init__(self, message: str, status: int = 0, errorcode: str = "") -> None:
        super().__init__(message)
        self.status, self.errorcode = status, errorcode


class Unreachable(ClientError):
    """No answer: name resolution, connection, TLS or timeout."""

    code = EXIT_UNREACHABLE


class ServerFailed(ClientError):
    """The server answered but could not do it, or its reply is unusable."""

    code = EXIT_SERVER
