"""`webknock`: knock, keep, exec and info from a shell, cron or a systemd unit."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
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
    worst,
)
from webknock.client.keeper import Keeper, describe
from webknock.client.knocker import Grant, Knocker
from webknock.client.net import Transport
from webknock.client.profile import (
    FAMILIES,
    MAX_TIME,
    Profile,
    expand_group,
    expand_profiles,
    find_profile,
    format_ports,
    group_members,
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
    return with_overrides(profile, args)


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


def _info_entry(knocker: Knocker, info: Any) -> dict[str, Any]:
    entry = {
        "family": knocker.family,
        "url": knocker.profile.url,
        "ports": [f"{p}/{n}" for p, n in info.offered()],
        "maxtime": info.maxtime,
        "ip": info.ip,
    }
    if knocker.protocol == "v2":
        entry["client"] = info.client
    return entry


def _info_text(knocker: Knocker, info: Any) -> str:
    known_as = f" (client {info.client})" if info.client else ""
    return (
        f"{knocker.profile.url} ({knocker.family}): offers "
        f"{format_ports(info.offered()) or 'no ports'} for up to {info.maxtime} s; "
        f"sees this host as {info.ip}{known_as}"
    )


def cmd_info(knockers: list[Knocker], as_json: bool) -> int:
    found: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for knocker in knockers:
        try:
            info = knocker.info()
        except ClientError as exc:
            errors.append(_failure(knocker.family, exc, len(knockers) > 1))
            continue
        found.append(_info_entry(knocker, info))
        if not as_json:
            print(_info_text(knocker, info))
    if as_json:
        print(json.dumps({"ok": not errors, "servers": found, "errors": errors}, indent=2))
    return errors[0]["code"] if errors else EXIT_OK


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP set `stop` while the block runs."""

    def handler(signum: int, frame: FrameType | None) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        stop.set()

    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in sigs}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def cmd_keep(knockers: list[Knocker], poll: float) -> int:
    stop = threading.Event()
    with _stop_on_signals(stop):
        Keeper(knockers, stop, poll=poll).run()
    return EXIT_OK


def _command(argv: list[str]) -> list[str]:
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if not argv:
        raise ConfigError("exec: no command given (webknock exec -- CMD [ARGS...])")
    return argv


def cmd_exec(knockers: list[Knocker], poll: float, argv: list[str]) -> int:
    argv = _command(argv)
    code, grants = cmd_knock(knockers, as_json=False)
    if code != EXIT_OK:
        return code
    stop = threading.Event()
    keeper = Keeper(knockers, stop, poll=poll)
    for knocker, grant in zip(knockers, grants, strict=True):
        keeper.adopt(grant, knocker, knocker.transport.local_address())
    return _run_renewing(argv, [keeper], stop)


def _run_renewing(argv: list[str], keepers: list[Keeper], stop: threading.Event) -> int:
    """Run `argv` while each keeper renews in a thread of its own; its exit status."""
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

    def renew(keeper: Keeper) -> None:
        try:
            keeper.run(quiet=True)
        except ClientError as exc:
            keeper.log.error("renewals stopped: %s", exc.message)

    threads = [
        threading.Thread(target=renew, args=(k,), name="webknock-keep", daemon=True)
        for k in keepers
    ]
    for thread in threads:
        thread.start()
    try:
        rc = child.wait()
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        for sig, old in previous.items():
            signal.signal(sig, old)
    return 128 - rc if rc < 0 else rc


# -- fan-out: several profiles, one thread each ----------------------------------------------


@dataclasses.dataclass
class Target:
    """One server of a fan-out: its profile's name and that profile's knockers."""

    name: str
    knockers: list[Knocker]


def targets_from(args: argparse.Namespace) -> list[Target] | None:
    """The profiles of a fan-out (--profile a,b,c, or a group by --profile or --config),
    overrides applied; None for one plain profile. Any bad profile stops all (exit 2)."""
    if args.config is not None:
        if group_members(args.config) is None:
            return None
        pairs = expand_group(args.config)
    else:
        pairs, fan_out = expand_profiles(args.profile)
        if not fan_out:
            return None
    targets = []
    for name, path in pairs:
        profile = with_overrides(load_profile(path, name), args)
        targets.append(Target(name, knockers_for(profile, use_cache=not args.no_cache)))
    return targets


def _parallel(targets: list[Target], work: Callable[[Target], Any]) -> list[Any]:
    """`work` for every target at once, one thread per profile (a group has at most
    MAX_GROUP); results in the targets' order. A slow or unreachable server costs its
    own timeout and delays no other."""
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="webknock") as pool:
        return list(pool.map(work, targets))


@dataclasses.dataclass
class _Outcome:
    """What one profile of a fan-out got: per family a result, or a failure."""

    target: Target
    results: list[tuple[Knocker, Any]]
    failures: list[tuple[Knocker, ClientError]]

    @property
    def code(self) -> int:
        return worst(exc.code for _, exc in self.failures)

    def tag(self, knocker: Knocker) -> str:
        several = len(self.target.knockers) > 1
        return f"{self.target.name}: " + (f"[{knocker.family}] " if several else "")

    def report_failures(self) -> list[dict[str, Any]]:
        """Print `NAME: error: ...` on stderr for each failure; their JSON form."""
        for knocker, exc in self.failures:
            name = self.target.name
            family = f"[{knocker.family}] " if len(self.target.knockers) > 1 else ""
            sys.stderr.write(clean(f"{name}: error: {family}{exc.message}", None) + "\n")
        sys.stderr.flush()
        return [
            {"family": k.family, "error": exc.message, "code": exc.code} for k, exc in self.failures
        ]


def _each(targets: list[Target], call: Callable[[Knocker], Any]) -> list[_Outcome]:
    def work(target: Target) -> _Outcome:
        outcome = _Outcome(target, [], [])
        for knocker in target.knockers:
            try:
                outcome.results.append((knocker, call(knocker)))
            except ClientError as exc:
                outcome.failures.append((knocker, exc))
        return outcome

    return _parallel(targets, work)


def fan_knock(targets: list[Target], as_json: bool) -> tuple[int, list[_Outcome]]:
    """Knock at every server at once; print in the profiles' order."""
    outcomes = _each(targets, lambda knocker: knocker.knock())
    found = []
    for outcome in outcomes:
        if not as_json:
            for knocker, grant in outcome.results:
                print(outcome.tag(knocker) + describe(grant))
            sys.stdout.flush()
        errors = outcome.report_failures()
        found.append(
            {
                "profile": outcome.target.name,
                "ok": not errors,
                "code": outcome.code,
                "grants": [grant.as_json() for _, grant in outcome.results],
                "errors": errors,
            }
        )
    if as_json:
        print(json.dumps(found, indent=2), flush=True)
    return worst(o.code for o in outcomes), outcomes


def fan_info(targets: list[Target], as_json: bool) -> int:
    outcomes = _each(targets, lambda knocker: knocker.info())
    found = []
    for outcome in outcomes:
        if not as_json:
            for knocker, info in outcome.results:
                print(outcome.tag(knocker) + _info_text(knocker, info))
            sys.stdout.flush()
        errors = outcome.report_failures()
        found.append(
            {
                "profile": outcome.target.name,
                "ok": not errors,
                "code": outcome.code,
                "servers": [_info_entry(knocker, info) for knocker, info in outcome.results],
                "errors": errors,
            }
        )
    if as_json:
        print(json.dumps(found, indent=2), flush=True)
    return worst(o.code for o in outcomes)


def fan_keep(targets: list[Target], poll: float) -> int:
    """One keeper per profile, each on its own schedule in its own thread; one that fails
    keeps retrying (with backoff) and delays no other. Until a signal, or until every
    keeper stopped on a configuration error (then: the highest of their codes)."""
    stop = threading.Event()
    codes: list[int] = []

    def keep(target: Target) -> None:
        keeper = Keeper(target.knockers, stop, poll=poll, label=target.name)
        try:
            keeper.run(quiet=True)
        except ClientError as exc:
            keeper.log.error("error: %s; renewals for this profile stopped", exc.message)
            codes.append(exc.code)

    threads = [
        threading.Thread(target=keep, args=(t,), name=f"webknock-keep-{t.name}", daemon=True)
        for t in targets
    ]
    with _stop_on_signals(stop):
        for thread in threads:
            thread.start()
        while not stop.is_set() and any(thread.is_alive() for thread in threads):
            stop.wait(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    log.info("stopped")
    return worst(codes)


def fan_exec(targets: list[Target], poll: float, argv: list[str]) -> int:
    """Knock at every server; run CMD only when every one granted, renewing each (on its
    own schedule) while CMD runs; else the highest code, and CMD does not run."""
    argv = _command(argv)
    code, outcomes = fan_knock(targets, as_json=False)
    if code != EXIT_OK:
        return code
    stop = threading.Event()
    keepers = []
    for outcome in outcomes:
        keeper = Keeper(outcome.target.knockers, stop, poll=poll, label=outcome.target.name)
        for knocker, grant in outcome.results:
            keeper.adopt(grant, knocker, knocker.transport.local_address())
        keepers.append(keeper)
    return _run_renewing(argv, keepers, stop)


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
        targets = targets_from(args)
        if targets is not None:
            poll = max(0.2, getattr(args, "poll", 5.0))
            if args.command == "knock":
                return fan_knock(targets, args.json)[0]
            if args.command == "info":
                return fan_info(targets, args.json)
            if args.command == "keep":
                return fan_keep(targets, poll)
            return fan_exec(targets, poll, list(args.cmd))
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
