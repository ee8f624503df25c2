"""``install.sh COMMAND [OPTIONS]``: the commands, their options and exit codes.

Exit status: 0 done, 1 failed (the message says what to fix), 2 usage error, 130
interrupted (143 terminated). ``install.sh`` runs :func:`main` with Debian's python from
the source tree; ``install.sh demo`` is answered by ``./demo`` itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import NoReturn

from webknock.client.lookup import PROFILE_NAME
from webknock.config import INSTANCE_NAME
from webknock.install import helptext
from webknock.install.client import ClientOptions, install_client, remove_client
from webknock.install.console import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    PROG,
    InstallError,
    ProfileRefused,
    UsageError,
)
from webknock.install.host import Host
from webknock.install.paths import DEFAULT_INSTANCE, check_root
from webknock.install.server import install_server, print_profile
from webknock.install.serveropts import ServerOptions, validate
from webknock.install.uninstall import uninstall

EXIT_TERMINATED = 143


class _Parser(argparse.ArgumentParser):
    """argparse without its own help and usage texts: errors become UsageError."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


def _parser(command: str) -> _Parser:
    parser = _Parser(prog=command, add_help=False, allow_abbrev=False)
    parser.add_argument("-h", "--help", action="store_true")
    return parser


def _parse(parser: _Parser, argv: Sequence[str]) -> argparse.Namespace:
    args, extra = parser.parse_known_args(list(argv))
    if extra and not args.help:
        raise UsageError(f"{parser.prog}: unknown option {extra[0]}")
    return args


def _need_root(host: Host, command: str) -> None:
    if host.uid != 0:
        raise InstallError(f"run as root (e.g. sudo {PROG} {command})")


def _work() -> Path:
    return Path(tempfile.mkdtemp(prefix="webknock-install.", dir=os.environ.get("TMPDIR")))


def cmd_server(host: Host, argv: Sequence[str]) -> int:
    parser = _parser("server")
    for flag in ("--instance", "--tcp-ports", "--udp-ports", "--max-time", "--backend"):
        parser.add_argument(flag)
    for flag in ("--protect", "--web-user", "--web-server", "--cgi-dir", "--url", "--root"):
        parser.add_argument(flag)
    for flag in ("--v1", "--no-apt", "--no-start"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("-y", "--yes", action="store_true")
    args = _parse(parser, argv)
    if args.help:
        host.console.out.write(helptext.SERVER)
        return 0
    _need_root(host, "server")
    root = check_root(args.root or "")
    opts = ServerOptions(
        instance=DEFAULT_INSTANCE if args.instance is None else args.instance,
        tcp_ports=args.tcp_ports,
        udp_ports=args.udp_ports,
        max_time=args.max_time or "",
        backend=args.backend or "",
        protect=args.protect or "",
        web_user=args.web_user or "",
        web_server=args.web_server or "",
        cgi_dir=args.cgi_dir or "",
        url=args.url or "",
        url_given=args.url is not None,
        v1=args.v1,
        root=root,
        no_apt=args.no_apt or bool(root),
        no_start=args.no_start or bool(root),
        yes=args.yes,
    )
    validate(opts)
    if root:
        os.makedirs(root, mode=0o755, exist_ok=True)
    return _with_work(lambda work: install_server(host, opts, work))


def cmd_client(host: Host, argv: Sequence[str]) -> int:
    parser = _parser("client")
    for flag in ("--profile", "--from", "--url", "--root"):
        parser.add_argument(flag)
    for flag in ("--keygen-only", "--no-apt", "--no-venv"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("-y", "--yes", action="store_true")
    args = _parse(parser, argv)
    if args.help:
        host.console.out.write(helptext.CLIENT)
        return 0
    opts = ClientOptions(
        profile="default" if args.profile is None else args.profile,
        source=args.__dict__["from"] or "",
        url=args.url or "",
        keygen_only=args.keygen_only,
        no_apt=args.no_apt,
        no_venv=args.no_venv,
        yes=args.yes,
    )
    if not PROFILE_NAME.fullmatch(opts.profile):
        raise UsageError(f"--profile: {opts.profile}: use letters, digits, _ or - (at most 64)")
    if opts.keygen_only and (opts.source or opts.url):
        raise UsageError("--keygen-only reads no profile: leave out --from and --url")
    opts.root = check_root(args.root or "")
    if opts.root and host.uid != 0:
        raise UsageError("--root needs root")
    opts.no_apt = opts.no_apt or bool(opts.root) or host.uid != 0
    if opts.root:
        os.makedirs(opts.root, mode=0o755, exist_ok=True)
    return _with_work(lambda work: install_client(host, opts, work))


def cmd_profile(host: Host, argv: Sequence[str]) -> int:
    parser = _parser("profile")
    for flag in ("--instance", "--url", "--root"):
        parser.add_argument(flag)
    args = _parse(parser, argv)
    if args.help:
        host.console.out.write(helptext.PROFILE)
        return 0
    _need_root(host, "profile")
    root = check_root(args.root or "")
    instance = DEFAULT_INSTANCE if args.instance is None else args.instance
    if not INSTANCE_NAME.fullmatch(instance):
        raise UsageError(f"--instance: {instance} is not an instance name")
    print_profile(host, root, instance, args.url or "")
    return 0


def cmd_uninstall(host: Host, argv: Sequence[str]) -> int:
    parser = _parser("uninstall")
    for flag in ("--instance", "--root"):
        parser.add_argument(flag)
    for flag in ("--all", "--purge", "--client"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("-y", "--yes", action="store_true")
    args = _parse(parser, argv)
    if args.help:
        host.console.out.write(helptext.UNINSTALL)
        return 0
    root = check_root(args.root or "")
    if args.client:
        remove_client(host, root, purge=args.purge)
        return 0
    _need_root(host, "uninstall")
    instance = DEFAULT_INSTANCE if args.instance is None else args.instance
    if not INSTANCE_NAME.fullmatch(instance):
        raise UsageError(f"--instance: {instance} is not an instance name")
    uninstall(host, root, instance, every=args.all, purge=args.purge)
    return 0


def _with_work(step: Callable[[Path], None]) -> int:
    """Run `step` with a scratch folder of its own, removed after."""
    work = _work()
    try:
        step(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


COMMANDS: dict[str, Callable[[Host, Sequence[str]], int]] = {
    "server": cmd_server,
    "client": cmd_client,
    "profile": cmd_profile,
    "uninstall": cmd_uninstall,
}


def run(host: Host, argv: Sequence[str]) -> int:
    """Run one command; raises UsageError, ProfileRefused or InstallError."""
    if not argv:
        host.console.err.write(helptext.MAIN)
        return EXIT_USAGE
    command, rest = argv[0], argv[1:]
    if command in ("-h", "--help", "help"):
        host.console.out.write(helptext.MAIN)
        return 0
    if command not in COMMANDS:
        raise UsageError(f"unknown command {command}")
    return COMMANDS[command](host, rest)


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(EXIT_TERMINATED)


def default_host() -> Host:
    """This machine, with the source tree this package was imported from."""
    return Host(
        src=Path(__file__).resolve().parents[2],
        system_python=os.environ.get("WEBKNOCK_SYSTEM_PYTHON", "/usr/bin/python3"),
    )


def main(argv: Sequence[str] | None = None, host: Host | None = None) -> int:
    """The installer; returns the exit status."""
    os.umask(0o022)
    host = host or default_host()
    console = host.console
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        return run(host, sys.argv[1:] if argv is None else argv)
    except UsageError as exc:
        console.usage_error(str(exc))
        return EXIT_USAGE
    except ProfileRefused as exc:
        console.refused(exc)
        return EXIT_USAGE
    except InstallError as exc:
        console.error(str(exc))
        return EXIT_FAILED
    except OSError as exc:  # a full disk, a read-only or missing folder, a denied write
        where = f"{exc.filename}: " if exc.filename else ""
        console.error(f"{where}{exc.strerror or exc}")
        return EXIT_FAILED
    except KeyboardInterrupt:
        console.err.write(f"{PROG}: interrupted\n")
        return EXIT_INTERRUPTED
    except SystemExit as exc:
        if exc.code == EXIT_TERMINATED:
            console.err.write(f"{PROG}: terminated\n")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
