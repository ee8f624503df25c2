"""webknockctl: inspect and change the grants of one webknock instance (root)."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from webknock import __version__
from webknock.addresses import grantable, parse_address
from webknock.config import STATE_FILE_SUFFIXES, ConfigError, ServerConfig, load
from webknock.ctl.common import (
    EXIT_ATTENTION,
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    engine_for,
)
from webknock.ctl.status import cmd_status
from webknock.logsetup import setup_logging
from webknock.server.engine import GrantEngine
from webknock.server.firewall import FirewallError
from webknock.server.grants import Grant
from webknock.server.state import StateError, StateStore

log = logging.getLogger("webknockctl")


def grant_json(g: Grant, now: float) -> dict[str, Any]:
    return {
        "ip": g.key.ip_text,  # an address, or the network of a client's open_prefix
        "proto": g.key.proto,
        "port": g.key.port,
        "expires": int(g.expires),
        "remaining": max(0, int(g.expires - now)),
        "first_opened": int(g.first_opened),
        "last_renewed": int(g.last_renewed),
        "renew_count": g.renew_count,
        "client": g.client,
    }


def fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def print_table(grants: Sequence[Grant], now: float) -> None:
    rows = [("ADDRESS", "PROTO", "PORT", "EXPIRES", "LEFT", "OPENED", "RENEWS", "CLIENT")]
    for g in grants:
        rows.append(
            (
                g.key.ip_text,
                g.key.proto,
                str(g.key.port),
                fmt_time(g.expires),
                f"{max(0, int(g.expires - now))}s",
                fmt_time(g.first_opened),
                str(g.renew_count),
                g.client or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_list(cfg: ServerConfig, args: argparse.Namespace) -> int:
    now = time.time()
    store = StateStore(cfg.state_file)
    grants = store.read().all() if args.all else store.read().live(now)
    grants = sorted(grants, key=lambda g: g.key)
    if args.json:
        print(json.dumps([grant_json(g, now) for g in grants], indent=2))
    elif grants:
        print_table(grants, now)
    else:
        print("no live grants")
    return EXIT_OK


def _engine(cfg: ServerConfig) -> GrantEngine:
    """The same engine the daemon uses (tests replace it)."""
    return engine_for(cfg)


def cmd_revoke(cfg: ServerConfig, args: argparse.Namespace) -> int:
    if (args.ip is None) == (args.client is None):
        print("webknockctl revoke: give an address or --client NAME", file=sys.stderr)
        return EXIT_USAGE
    if args.client is not None:
        gone = _engine(cfg).revoke_client(args.client, time.time())
        what = f"client {args.client}"
    else:
        gone = _engine(cfg).revoke(args.ip, args.proto, args.port, time.time())
        what = str(args.ip)
    if not gone:
        print(f"no grant matches {what}", file=sys.stderr)
        return EXIT_ERROR
    for g in gone:
        print(f"revoked {g.key}")
    return EXIT_OK


def cmd_grant(cfg: ServerConfig, args: argparse.Namespace) -> int:
    from webknock.server.grants import GrantRequest
    from webknock.spool.request import new_request_id

    ports = [(args.proto, args.port)] if args.port else sorted(cfg.offered())
    unknown = [p for p in ports if p not in cfg.offered()]
    if unknown:
        print(f"{unknown[0][0]}/{unknown[0][1]} is not offered by this instance", file=sys.stderr)
        return EXIT_USAGE
    seconds = min(args.time or cfg.max_time, cfg.max_time)
    now = time.time()
    req = GrantRequest(new_request_id(), args.ip, tuple(ports), seconds, source="admin")
    outcome = _engine(cfg).open([req], now)[req.id]
    if not outcome.ok:
        print(f"grant failed: {outcome.error}", file=sys.stderr)
        return EXIT_ERROR
    print(
        f"granted {args.ip} {', '.join(f'{p}/{n}' for p, n in ports)} until "
        f"{fmt_time(outcome.expires)}"
    )
    return EXIT_OK


def cmd_reap(cfg: ServerConfig, args: argparse.Namespace) -> int:
    gone = _engine(cfg).reap(time.time())
    if gone or not args.quiet:
        log.info("reaped %d expired grant(s)", len(gone))
    return EXIT_OK


def cmd_reconcile(cfg: ServerConfig, args: argparse.Namespace) -> int:
    live = _engine(cfg).reconcile(time.time())
    print(f"firewall now holds the {live} live grant(s) of the state file")
    return EXIT_OK


def cmd_teardown(cfg: ServerConfig, args: argparse.Namespace) -> int:
    from webknock.server.firewall import teardown_all

    for what in teardown_all(cfg):  # every backend: also what an earlier `backend` left
        log.info("removed %s", what)
    if args.state:
        for suffix in (s for s in STATE_FILE_SUFFIXES if s != ".daemon"):  # a daemon's own
            try:
                os.unlink(f"{cfg.state_file}{suffix}")
            except FileNotFoundError:
                pass
    print(f"removed the firewall objects of instance {cfg.instance}")
    return EXIT_OK


def cmd_prepare_spool(cfg: ServerConfig, args: argparse.Namespace) -> int:
    from webknock.spool.mount import mount_spool, prepare_spool, web_identity

    gid = web_identity(cfg).gid
    bounded = mount_spool(cfg.spool, gid)
    prepare_spool(cfg.spool, gid)
    if not bounded:
        print(f"{cfg.spool.root}: ready, but not on a tmpfs of its own", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


def cmd_check_config(cfg: ServerConfig, args: argparse.Namespace) -> int:
    from webknock.server.checks import check_installation

    problems = check_installation(cfg)
    for level, msg in problems:
        print(f"{level}: {msg}")
    if not problems:
        print(f"{cfg.source}: OK (instance {cfg.instance})")
    return (
        EXIT_ERROR
        if any(lv == "error" for lv, _ in problems)
        else (EXIT_ATTENTION if problems else EXIT_OK)
    )


def address(text: str) -> Any:
    try:
        addr = parse_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 or IPv6 address") from None
    why = grantable(addr)
    if why:
        raise argparse.ArgumentTypeError(f"{text}: {why}")
    return addr


def address_or_network(text: str) -> Any:
    """An address, or a network in CIDR notation (host bits may be set: 192.0.2.7/24)."""
    if "/" not in text:
        return address(text)
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an address or a CIDR network") from None


def port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port from 1 to 65535")
    return int(text)


def seconds(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="webknockctl",
        description="Inspect and change the grants of a webknock instance.",
        epilog="Exit status: 0 ok, 1 failed, 2 bad config or usage, "
        "3 needs attention (status: daemon down or firewall differs; check-config: warnings).",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="instance config (default: $WEBKNOCK_CONFIG or /etc/webknock/webknock.ini)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"webknockctl {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="show grants (live ones unless --all)")
    p.add_argument("--json", action="store_true", help="JSON array of grant objects")
    p.add_argument("--all", action="store_true", help="include expired grants not yet reaped")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser(
        "revoke",
        help="close the grants of an address, a network or a client now",
        description="Close grants now. ADDRESS closes its own grants and every network grant "
        "(a client's open_prefix) that contains it; a CIDR network closes every grant of an "
        "address in it and every network grant overlapping it: afterwards no address of it "
        "is let in.",
    )
    p.add_argument(
        "ip",
        type=address_or_network,
        nargs="?",
        metavar="ADDRESS|CIDR",
        help="client address, or network (e.g. 198.51.100.0/24 as list shows it)",
    )
    p.add_argument("--client", metavar="NAME", help="every grant of this enrolled client")
    p.add_argument("--proto", choices=("tcp", "udp"), help="only this protocol")
    p.add_argument("--port", type=port, help="only this port")
    p.set_defaults(func=cmd_revoke)

    p = sub.add_parser("grant", help="open offered ports for an address (as a knock would)")
    p.add_argument("ip", type=address, help="client address")
    p.add_argument("--proto", choices=("tcp", "udp"), default="tcp", help="protocol (tcp)")
    p.add_argument("--port", type=port, help="one offered port (default: all offered)")
    p.add_argument("--time", type=seconds, help="seconds (default and cap: max_time)")
    p.set_defaults(func=cmd_grant)

    p = sub.add_parser("reap", help="remove expired grants in one batch (cron fallback)")
    p.add_argument("-q", "--quiet", action="store_true", help="say nothing when nothing expired")
    p.set_defaults(func=cmd_reap)

    p = sub.add_parser("status", help="daemon, spool backlog, grant counts, firewall drift")
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("check-config", help="validate config, keys, owners and modes")
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser(
        "prepare-spool",
        help="mount the spool's own bounded tmpfs and make its directories (before webknockd)",
    )
    p.set_defaults(func=cmd_prepare_spool)

    p = sub.add_parser("reconcile", help="make the firewall hold exactly the live grants")
    p.set_defaults(func=cmd_reconcile)

    p = sub.add_parser("teardown", help="remove this instance's firewall objects")
    p.add_argument("--state", action="store_true", help="also delete the state file")
    p.set_defaults(func=cmd_teardown)

    from webknock.server.audit import add_log_command  # `webknockctl log`: the audit trail

    add_log_command(sub)
    from webknock.ctl.clients import add_client_command  # `webknockctl client`: v2 clients

    add_client_command(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging("webknockctl", verbose=args.verbose)
    if not args.verbose:  # the command prints what it did; the event lines are the daemon's
        quiet = ["webknock.server.events", "webknock.server.audit"]
        if args.command != "check-config":  # which backend and forward path: its business
            quiet.append("webknock.server.firewall")  # (else cron mails them at every reap)
        for name in quiet:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        print(f"webknockctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    needs_root = args.command not in ("check-config", "log")  # log: whoever can read it
    if needs_root and os.geteuid() != 0:
        print("webknockctl: must run as root", file=sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(cfg, args))
    except ConfigError as exc:
        print(f"webknockctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (FirewallError, StateError, OSError) as exc:
        print(f"webknockctl: {exc}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
