"""The command line of `webknock`: its argparse parser, and its options applied to a profile."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from pathlib import Path
from typing import Any

from webknock.client.errors import EXIT_CODES_HELP, ConfigError
from webknock.client.profile import FAMILIES, MAX_TIME, Profile, parse_ports

DESCRIPTION = """Open firewall ports on a webknock server for this host's address.

The profile (INI, section [client]) comes from --config FILE, else --profile NAME:
~/.config/webknock/NAME.ini, then /etc/webknock/client.d/NAME.ini (NAME defaults to
"default"). Keys: url, then keys_file (protocol v1: keys shared with the server) or
server_key and key_file (protocol v2: the server's public key, pinned, and this client's
own private key, made by `webknock keygen`), then ports, time, verify, timeout, family.

Several servers at once, in parallel: --profile a,b,c, or a profile group (NAME.ini whose
only section is [group], with profiles = a, b, c; members are profile names, not groups).
Each output line starts with the profile's name ("office: opened ..."), each failure is
"office: error: ..." on stderr, --json prints an array (one object per profile, with its
"profile"); keep and exec renew each server on its own schedule, whatever the others do."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 like every usage error
        self.exit(2, f"webknock: {message} (see webknock --help)\n")


def _common(parser: argparse.ArgumentParser, default: Any) -> None:
    """Options accepted before and after the subcommand."""

    def d(value: Any) -> Any:
        return value if default is None else default

    parser.add_argument(
        "--config", metavar="FILE", type=Path, default=d(None), help="profile file to use"
    )
    parser.add_argument(
        "--profile",
        metavar="NAME",
        default=d("default"),
        help="profile name, a group's, or several: a,b,c (default: default)",
    )
    parser.add_argument(
        "--family",
        choices=FAMILIES,
        default=d(None),
        help="address family to knock from (both: once per family)",
    )
    parser.add_argument(
        "--ports",
        metavar="LIST",
        default=d(None),
        help="ports to open, e.g. 'tcp/22, udp/51820' (default: the profile's)",
    )
    parser.add_argument(
        "--time",
        metavar="SECONDS",
        type=int,
        default=d(None),
        help="grant time to ask for (capped by the server)",
    )
    parser.add_argument(
        "--timeout", metavar="SECONDS", type=float, default=d(None), help="seconds per HTTP request"
    )
    parser.add_argument(
        "--no-cache",
        action="store_true",
        default=d(False),
        help="always ask getinfo first (two requests per knock); getinfo replies are"
        " cached in $XDG_CACHE_HOME/webknock, else /var/cache/webknock (root) or"
        " ~/.cache/webknock",
    )
    parser.add_argument("-v", "--verbose", action="count", default=d(0), help="more detail")
    parser.add_argument("-q", "--quiet", action="store_true", default=d(False), help="errors only")


def build_parser() -> argparse.ArgumentParser:
    """webknock's parser: the common options, before or after one of its subcommands."""
    parser = _Parser(
        prog="webknock",
        description=DESCRIPTION,
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _common(parser, None)
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )

    def add(name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=text,
            description=textwrap.fill(text, 79),
            epilog=EXIT_CODES_HELP,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            **kw,
        )

    knock = add("knock", "open the ports once and print until when")
    knock.add_argument("--json", action="store_true", help="print the result as JSON")
    keep = add(
        "keep",
        "stay in the foreground and keep the ports open: renew at about a third of the "
        "granted time, knock again at once when the local address changes or a renewal "
        "fails (with backoff); stop on SIGTERM/SIGINT",
    )
    run = add(
        "exec",
        "knock, run CMD while renewing in the background, exit with CMD's status",
        usage="webknock exec [options] -- CMD [ARGS...]",
    )
    for p in (keep, run):
        p.add_argument(
            "--poll",
            metavar="SECONDS",
            type=float,
            default=5.0,
            help="how often to check the local address (default: 5)",
        )
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="CMD", help="command and arguments")
    info = add("info", "show what the server offers and the address it sees")
    info.add_argument("--json", action="store_true", help="print the result as JSON")
    gen = add(
        "keygen",
        "make this client's protocol v2 key (0600, never over an existing one) at the "
        "profile's key_file, else NAME.key beside the profile; print the public key to send "
        "to the server's admin",
    )
    pub = add("pubkey", "print the public key of this client's v2 key again")
    for p in (knock, keep, run, info, gen, pub):
        _common(p, argparse.SUPPRESS)
    return parser


def with_overrides(profile: Profile, args: argparse.Namespace) -> Profile:
    """`profile` with the command line's --family, --ports, --time, --timeout applied."""
    changes: dict[str, Any] = {}
    if args.family is not None:
        changes["family"] = args.family
    if args.ports is not None:
        try:
            changes["ports"] = parse_ports(args.ports)
        except ValueError as exc:
            raise ConfigError(f"--ports: {exc}") from None
    if args.time is not None:
        if not 1 <= args.time <= MAX_TIME:
            raise ConfigError(f"--time: {args.time} is out of range 1..{MAX_TIME}")
        changes["time"] = args.time
    if args.timeout is not None:
        if not 0.1 <= args.timeout <= 300:
            raise ConfigError(f"--timeout: {args.timeout:g} is out of range 0.1..300")
        changes["timeout"] = args.timeout
    return dataclasses.replace(profile, **changes)


def command_argv(argv: list[str]) -> list[str]:
    """exec's CMD and its arguments (a leading ``--`` dropped); ConfigError when missing."""
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ConfigError("exec: no command given (webknock exec -- CMD [ARGS...])")
    return argv
