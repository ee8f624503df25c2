"""``webknockctl client``: enrol, list, show, enable, disable and remove v2 clients.

Each client is one file ``<clients_dir>/<NAME>.conf`` (:mod:`webknock.ctl.clientfiles`);
webknockd re-reads the directory when it changes, so every command here takes effect for the
next knock without a restart. Notices go to stderr, so that the profile ``client add``
prints on stdout (:mod:`webknock.ctl.enrol`) can be redirected into a file as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from webknock.config import ServerConfig
from webknock.ctl.clientfiles import checked_name, client_path, read_client, write_enabled
from webknock.ctl.common import EXIT_ERROR, EXIT_OK, Refused, engine_for
from webknock.ctl.enrol import cmd_add
from webknock.protocol.v2 import public_key_text
from webknock.server.clients import Client, format_open_prefix, format_ports, load_clients


def client_json(cfg: ServerConfig, client: Client) -> dict[str, Any]:
    """What the client may do on this instance (ports and max_time as effective)."""
    return {
        "name": client.name,
        "enabled": client.enabled,
        "comment": client.comment,
        "ports": [f"{p}/{n}" for p, n in sorted(client.allowed(cfg.offered()))],
        "max_time": client.longest(cfg.max_time),
        "from": [str(n) for n in client.sources],
        "open_prefix": dict(zip(("ipv4", "ipv6"), client.open_prefix or (32, 128), strict=True)),
        "expires": client.expires.isoformat() if client.expires else None,
        "kid": client.kid.hex(),
    }


def _opens_text(client: Client) -> str:
    """What a knock opens: ``the address alone``, or ``its IPv4 /24, its IPv6 /64 (open_prefix
    = 24, 64)`` (either family may be the address alone)."""
    if client.open_prefix is None or client.open_prefix == (32, 128):
        return "the address alone"
    v4, v6 = client.open_prefix
    four = "the IPv4 address alone" if v4 == 32 else f"its IPv4 /{v4}"
    six = "the IPv6 address alone" if v6 == 128 else f"its IPv6 /{v6}"
    return f"{four}, {six} (open_prefix = {format_open_prefix(client.open_prefix)})"


def _expires_text(client: Client, now: float) -> str:
    if client.expires is None:
        return "never"
    return f"{client.expires}{' (expired)' if client.expired(now) else ''}"


def cmd_list(cfg: ServerConfig, args: argparse.Namespace) -> int:
    clients, problems = load_clients(cfg.clients_dir)
    for problem in problems:
        print(f"webknockctl client list: not served: {problem}", file=sys.stderr)
    ordered = [clients[name] for name in sorted(clients)]
    if args.json:
        print(json.dumps([client_json(cfg, c) for c in ordered], indent=2))
        return EXIT_OK
    if not ordered:
        print(f"no clients enrolled in {cfg.clients_dir}")
        return EXIT_OK
    now = time.time()
    rows = [("NAME", "ENABLED", "PORTS", "MAX_TIME", "FROM", "OPEN_PREFIX", "EXPIRES", "COMMENT")]
    for c in ordered:
        rows.append(
            (
                c.name,
                "yes" if c.enabled else "no",
                format_ports(c.allowed(cfg.offered())).replace(" ", "") or "-",
                str(c.longest(cfg.max_time)),
                ",".join(str(n) for n in c.sources) or "any",
                format_open_prefix(c.open_prefix).replace(" ", "") if c.open_prefix else "-",
                _expires_text(c, now),
                c.comment or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return EXIT_OK


def cmd_show(cfg: ServerConfig, args: argparse.Namespace) -> int:
    client = read_client(cfg, args.name)
    now = time.time()
    _, problems = load_clients(cfg.clients_dir)
    skipped = [p.message for p in problems if p.path == client.path]
    if skipped:
        state = f"NOT SERVED: {'; '.join(skipped)}"
    elif not client.enabled:
        state = "disabled (refused as an unknown key)"
    elif client.expired(now):
        state = "expired (refused)"
    else:
        state = "active"
    ports = format_ports(client.allowed(cfg.offered())) or "none"
    if client.ports is None:
        ports += " (every port the instance offers)"
    elif client.ports - cfg.offered():
        ports += f" (on file also {format_ports(client.ports - cfg.offered())}: not offered)"
    max_time = str(client.longest(cfg.max_time))
    if client.max_time is None:
        max_time += " (the instance's max_time)"
    elif client.max_time > cfg.max_time:
        max_time += f" (on file {client.max_time}, capped to the instance's max_time)"
    for label, value in (
        ("name", client.name),
        ("file", str(client.path)),
        ("state", state),
        ("enabled", "yes" if client.enabled else "no"),
        ("key", public_key_text(client.public, client.comment)),
        ("kid", client.kid.hex()),
        ("comment", client.comment or "-"),
        ("ports", ports),
        ("max_time", max_time),
        ("from", ", ".join(str(n) for n in client.sources) or "anywhere"),
        ("opens", _opens_text(client)),
        ("expires", _expires_text(client, now)),
    ):
        print(f"{label + ':':<10}{value}")
    return EXIT_OK


def _set_enabled(cfg: ServerConfig, args: argparse.Namespace, enabled: bool) -> int:
    client = read_client(cfg, args.name)
    word = "enabled" if enabled else "disabled"
    changed = client.enabled != enabled
    if not changed:
        print(f"client {client.name} is already {word}")
    else:
        write_enabled(client, enabled)
        print(f"client {client.name} {word}")
    if enabled and client.expired(time.time()):
        print(f"(its key expired after {client.expires}: still refused)", file=sys.stderr)
    if not enabled:
        if args.revoke:
            _revoke(cfg, client.name)
        elif changed:
            print(
                f"(its live grants stay until they expire: "
                f"webknockctl client disable --revoke {client.name} or "
                f"webknockctl revoke --client {client.name} closes them)",
                file=sys.stderr,
            )
    return EXIT_OK


def cmd_enable(cfg: ServerConfig, args: argparse.Namespace) -> int:
    return _set_enabled(cfg, args, True)


def cmd_disable(cfg: ServerConfig, args: argparse.Namespace) -> int:
    return _set_enabled(cfg, args, False)


def _revoke(cfg: ServerConfig, name: str) -> None:
    gone = engine_for(cfg).revoke_client(name, time.time())
    print(f"revoked {len(gone)} live grant(s) of client {name}")
    for g in gone:
        print(f"revoked {g.key}")


def cmd_remove(cfg: ServerConfig, args: argparse.Namespace) -> int:
    name = checked_name(args.name)
    path = client_path(cfg, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        hint = f"; webknockctl revoke --client {name} closes grants" if args.revoke else ""
        raise Refused(f"no client {name} (no file {path}){hint}", EXIT_ERROR) from None
    print(f"removed client {name} ({path})")
    if args.revoke:
        _revoke(cfg, name)
    return EXIT_OK


Command = Callable[[ServerConfig, argparse.Namespace], int]


def _run(func: Command, what: str) -> Command:
    def run(cfg: ServerConfig, args: argparse.Namespace) -> int:
        try:
            return int(func(cfg, args))
        except Refused as exc:
            print(f"webknockctl client {what}: {exc}", file=sys.stderr)
            return exc.status

    return run


def add_client_command(sub: Any) -> None:
    """Add ``client`` and its subcommands to webknockctl's subparsers `sub`."""
    group = sub.add_parser(
        "client",
        help="enrol, list, show, enable, disable or remove protocol v2 clients",
        description="Protocol v2 clients: one file per client in clients_dir; webknockd "
        "reads changes before the next knock.",
    )
    csub = group.add_subparsers(dest="client_command", required=True, metavar="SUBCOMMAND")

    p = csub.add_parser("add", help="enrol a client and print its profile")
    p.add_argument("name", metavar="NAME", help="letters, digits, '.', '_', '-' (max 64)")
    p.add_argument(
        "--key",
        required=True,
        metavar="KEYTEXT",
        help="the client's public key: 'wk2:... [COMMENT]' (quote it)",
    )
    p.add_argument(
        "--ports", metavar="tcp/N,udp/N", help="ports it may open (default: all offered)"
    )
    p.add_argument(
        "--max-time", metavar="S", help="longest grant in seconds (default: the instance's)"
    )
    p.add_argument("--from", dest="sources", metavar="CIDR,...", help="networks it may knock from")
    p.add_argument(
        "--open-prefix",
        metavar="V4[,V6]",
        help="open the knocking address's network of these prefix lengths instead of the "
        "address (IPv4 16-32, IPv6 32-128; 32 or 128: the address alone), e.g. 24,64",
    )
    p.add_argument("--expires", metavar="YYYY-MM-DD", help="last day (UTC) the key is accepted")
    p.set_defaults(func=_run(cmd_add, "add"))

    p = csub.add_parser("list", help="the clients webknockd serves")
    p.add_argument("--json", action="store_true", help="JSON array of client objects")
    p.set_defaults(func=_run(cmd_list, "list"))

    p = csub.add_parser("show", help="everything about one client")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_run(cmd_show, "show"))

    p = csub.add_parser("enable", help="accept a disabled client's knocks again")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_run(cmd_enable, "enable"), revoke=False)

    p = csub.add_parser("disable", help="refuse a client's knocks, keeping it on file")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--revoke", action="store_true", help="also close its live grants now")
    p.set_defaults(func=_run(cmd_disable, "disable"))

    p = csub.add_parser("remove", help="delete a client's file")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--revoke", action="store_true", help="also close its live grants now")
    p.set_defaults(func=_run(cmd_remove, "remove"))
