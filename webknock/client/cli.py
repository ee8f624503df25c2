"""`webknock`: knock, keep, exec and info from a shell, cron or a systemd unit."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from webknock.client import keygen
from webknock.client.cache import Cache, cache_dir, cache_name
from webknock.client.errors import (
    EXIT_CODES_HELP,
    EXIT_OK,
    ClientError,
    ConfigError,
    clean,
)
from webknock.client.keeper import Keeper, describe
from webknock.client.knocker import Grant, Knocker
from webknock.client.net import Transport
from webknock.client.profile import (
    FAMILIES,
    MAX_TIME,
    Profile,
    find_profile,
    format_ports,
    load_profile,
    new_profile_path,
    parse_ports,
    profile_candidates,
)

log = logging.getLogger("webknock.client")

DESCRIPTION = """Open firewall ports on a webknock server for this host's address.

The profile (INI, section [client]) comes from --config FILE, else --profile NAME:
~/.config/webknock/NAME.ini, then /etc/webknock/client.d/NAME.ini (NAME defaults to
"default"). Keys: url, then keys_file (protocol v1: keys shared with the server) or
server_key and key_file (protocol v2: the server's public key, pinned, and this client's
own private key, made by `webknock keygen`), then ports, time, verify, timeout, family."""


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
        help="profile name (default: default)",
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
        help="always ask getinfo first (two requests per knock)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=d(0), help="more detail")
    parser.add_argument("-q", "--quiet", action="store_true", default=d(False), help="errors only")


def build_parser() -> argparse.ArgumentParser:
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


class _SafeFormatter(logging.Formatter):
    """Whatever ends up in a message, no control character reaches the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record), None)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO if args.command in ("keep", "exec") else logging.WARNING
    if args.verbose:
        level = logging.DEBUG if args.verbose > 1 else logging.INFO
    if args.quiet:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("webknock: %(message)s"))
    ours = logging.getLogger("webknock")  # not the root logger: main() may run inside a host
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    logging.getLogger("urllib3").setLevel(max(level, logging.WARNING))


def profile_from(args: argparse.Namespace) -> Profile:
    """The profile with command-line overrides applied."""
    if args.config is not None:
        profile = load_profile(args.config)
    else:
        profile = load_profile(find_profile(args.profile), args.profile)
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


def knockers_for(profile: Profile, *, use_cache: bool = True) -> list[Knocker]:
    """One knocker per address family the profile asks for."""
    keys = profile.credentials()
    families = ["ipv4", "ipv6"] if profile.family == "both" else [profile.family]
    knockers = []
    for family in families:
        transport = Transport(profile.url, family, profile.verify, profile.timeout)
        cache = Cache(cache_dir() / cache_name(profile.path, family)) if use_cache else None
        knockers.append(Knocker(profile, keys, transport, cache))
    return knockers


def _failure(family: str, exc: ClientError, several: bool) -> dict[str, Any]:
    log.error("%s%s", f"[{family}] " if several else "", exc.message)
    return {"family": family, "error": exc.message, "code": exc.code}


def cmd_knock(knockers: list[Knocker], as_json: bool) -> tuple[int, list[Grant]]:
    grants: list[Grant] = []
    errors: list[dict[str, Any]] = []
    for knocker in knockers:
        try:
            grant = knocker.knock()
        except ClientError as exc:
            errors.append(_failure(knocker.family, exc, len(knockers) > 1))
            continue
        grants.append(grant)
        if not as_json:
            prefix = f"[{grant.family}] " if len(knockers) > 1 else ""
            print(prefix + describe(grant), flush=True)
    if as_json:
        result = {"ok": not errors, "grants": [g.as_json() for g in grants], "errors": errors}
        print(json.dumps(result, indent=2))
    return (errors[0]["code"] if errors else EXIT_OK), grants


def cmd_info(knockers: list[Knocker], as_json: bool) -> int:
    found: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for knocker in knockers:
        try:
            info = knocker.info()
        except ClientError as exc:
            errors.append(_failure(knocker.family, exc, len(knockers) > 1))
            continue
        entry = {
            "family": knocker.family,
            "url": knocker.profile.url,
            "ports": [f"{p}/{n}" for p, n in info.offered()],
            "maxtime": info.maxtime,
            "ip": info.ip,
        }
        if knocker.protocol == "v2":
            entry["client"] = info.client
        found.append(entry)
        if not as_json:
            known_as = f" (client {info.client})" if info.client else ""
            print(
                f"{knocker.profile.url} ({knocker.family}): offers "
                f"{format_ports(info.offered()) or 'no ports'} for up to {info.maxtime} s; "
                f"sees this host as {info.ip}{known_as}"
            )
    if as_json:
        print(json.dumps({"ok": not errors, "servers": found, "errors": errors}, indent=2))
    return errors[0]["code"] if errors else EXIT_OK


def cmd_keep(knockers: list[Knocker], poll: float) -> int:
    stop = threading.Event()

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        Keeper(knockers, stop, poll=poll).run()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return EXIT_OK


def cmd_exec(knockers: list[Knocker], poll: float, argv: list[str]) -> int:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ConfigError("exec: no command given (webknock exec -- CMD [ARGS...])")
    code, grants = cmd_knock(knockers, as_json=False)
    if code != EXIT_OK:
        return code
    stop = threading.Event()
    keeper = Keeper(knockers, stop, poll=poll)
    for knocker, grant in zip(knockers, grants, strict=True):
        keeper.adopt(grant, knocker, knocker.transport.local_address())
    try:
        child = subprocess.Popen(argv)
    except FileNotFoundError:
        log.error("exec: %s: command not found", argv[0])
        return 127
    except OSError as exc:
        log.error("exec: %s: %s", argv[0], exc.strerror)
        return 126

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.SIG_IGN)  # CMD gets it too

    def renew() -> None:
        try:
            keeper.run(quiet=True)
        except ClientError as exc:
            log.error("renewals stopped: %s", exc.message)

    thread = threading.Thread(target=renew, name="webknock-keep", daemon=True)
    thread.start()
    try:
        rc = child.wait()
    finally:
        stop.set()
        thread.join(timeout=30)
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 128 - rc if rc < 0 else rc


def keygen_target(args: argparse.Namespace) -> tuple[Path, str]:
    """The profile file keygen and pubkey work for (it need not exist yet) and its name."""
    if args.config is not None:
        return args.config, args.config.stem
    for candidate in profile_candidates(args.profile):
        if candidate.is_file():
            return candidate, args.profile
    return new_profile_path(args.profile), args.profile


def cmd_keygen(args: argparse.Namespace) -> int:
    profile, name = keygen_target(args)
    path = keygen.key_path(profile)
    key = keygen.create_key(path)
    text = key.public_text(keygen.comment(name))
    print(text, flush=True)
    if not args.quiet:
        say = sys.stderr.write
        say(f"webknock: wrote this client's private key to {path} (0600; it stays here)\n")
        say(
            "webknock: send the public key above to the server's admin, who enrolls it with: "
            f"webknockctl client add {keygen.client_name()} --key '{text}'\n"
        )
        advice = keygen.profile_advice(profile, path)
        if advice:
            say(f"webknock: {advice}\n")
    return EXIT_OK


def cmd_pubkey(args: argparse.Namespace) -> int:
    profile, name = keygen_target(args)
    key = keygen.read_key(keygen.key_path(profile))
    print(key.public_text(keygen.comment(name)))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        if args.command == "keygen":
            return cmd_keygen(args)
        if args.command == "pubkey":
            return cmd_pubkey(args)
        profile = profile_from(args)
        knockers = knockers_for(profile, use_cache=not args.no_cache)
        if args.command == "knock":
            return cmd_knock(knockers, args.json)[0]
        if args.command == "info":
            return cmd_info(knockers, args.json)
        if args.command == "keep":
            return cmd_keep(knockers, max(0.2, args.poll))
        return cmd_exec(knockers, max(0.2, args.poll), list(args.cmd))
    except ClientError as exc:
        log.error("%s", exc.message)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
