"""What `webknock` prints: grant and info lines, failures, and the --json forms.

One server: a failure is a log line on stderr (``[ipv4] `` in front when the profile knocks
from both families). A fan-out: every line starts with the profile's name
(``office: opened ...``), every failure is ``office: error: ...`` on stderr. Whatever the
server said goes through `clean` first.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from webknock.client.cache import ServerInfo
from webknock.client.errors import ClientError, clean
from webknock.client.knocker import Knocker
from webknock.client.profile import format_ports

log = logging.getLogger("webknock.client")


def print_json(obj: object, *, flush: bool = False) -> None:
    print(json.dumps(obj, indent=2), flush=flush)


def failure_json(family: str, exc: ClientError) -> dict[str, Any]:
    return {"family": family, "error": exc.message, "code": exc.code}


def log_failure(family: str, exc: ClientError, several: bool) -> dict[str, Any]:
    """Log one server's failure (naming the family when `several`); its JSON form."""
    log.error("%s%s", f"[{family}] " if several else "", exc.message)
    return failure_json(family, exc)


def info_json(knocker: Knocker, info: ServerInfo) -> dict[str, Any]:
    """What a server offers, as `info --json` prints it."""
    entry: dict[str, Any] = {
        "family": knocker.family,
        "url": knocker.profile.url,
        "ports": [f"{p}/{n}" for p, n in info.offered()],
        "maxtime": info.maxtime,
        "ip": info.ip,
    }
    if knocker.protocol == "v2":
        entry["client"] = info.client
    return entry


def info_text(knocker: Knocker, info: ServerInfo) -> str:
    """What a server offers, in one line."""
    known_as = f" (client {info.client})" if info.client else ""
    return (
        f"{knocker.profile.url} ({knocker.family}): offers "
        f"{format_ports(info.offered()) or 'no ports'} for up to {info.maxtime} s; "
        f"sees this host as {info.ip}{known_as}"
    )


def fan_tag(name: str, family: str, several: bool) -> str:
    """The start of a fan-out line: ``NAME: ``, and ``[FAMILY] `` when `several` families."""
    return f"{name}: " + (f"[{family}] " if several else "")


def report_fan_failures(
    name: str, failures: list[tuple[Knocker, ClientError]], several: bool
) -> list[dict[str, Any]]:
    """Print `NAME: error: ...` on stderr for each failure; their JSON form."""
    for knocker, exc in failures:
        family = f"[{knocker.family}] " if several else ""
        sys.stderr.write(clean(f"{name}: error: {family}{exc.message}", None) + "\n")
    sys.stderr.flush()
    return [failure_json(k.family, exc) for k, exc in failures]
