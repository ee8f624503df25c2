"""The commands of `webknock` for one profile (knock, info, keep, exec, keygen, pubkey), and
what keep and exec share with their fan-out forms: stopping on signals, and running CMD
while keepers renew. Each command returns its exit code (:mod:`webknock.client.errors`)."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from webknock.client import keygen
from webknock.client.errors import EXIT_OK, ClientError
from webknock.client.keeper import Keeper, describe
from webknock.client.knocker import Grant, Knocker
from webknock.client.lookup import new_profile_path, profile_candidates
from webknock.client.options import command_argv
from webknock.client.output import info_json, info_text, log_failure, print_json

log = logging.getLogger("webknock.client")


def cmd_knock(knockers: list[Knocker], as_json: bool) -> tuple[int, list[Grant]]:
    """Knock from each family; the exit code (the first failure's) and the grants."""
    grants: list[Grant] = []
    errors: list[dict[str, Any]] = []
    for knocker in knockers:
        try:
            grant = knocker.knock()
        except ClientError as exc:
            errors.append(log_failure(knocker.family, exc, len(knockers) > 1))
            continue
        grants.append(grant)
        if not as_json:
            prefix = f"[{grant.family}] " if len(knockers) > 1 else ""
            print(prefix + describe(grant), flush=True)
    if as_json:
        print_json({"ok": not errors, "grants": [g.as_json() for g in grants], "errors": errors})
    return (errors[0]["code"] if errors else EXIT_OK), grants


def cmd_info(knockers: list[Knocker], as_json: bool) -> int:
    found: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    for knocker in knockers:
        try:
            info = knocker.info()
        except ClientError as exc:
            errors.append(log_failure(knocker.family, exc, len(knockers) > 1))
            continue
        found.append(info_json(knocker, info))
        if not as_json:
            print(info_text(knocker, info))
    if as_json:
        print_json({"ok": not errors, "servers": found, "errors": errors})
    return errors[0]["code"] if errors else EXIT_OK


@contextlib.contextmanager
def stop_on_signals(stop: threading.Event) -> Iterator[None]:
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
    with stop_on_signals(stop):
        Keeper(knockers, stop, poll=poll).run()
    return EXIT_OK


def cmd_exec(knockers: list[Knocker], poll: float, argv: list[str]) -> int:
    """Knock; run CMD only when it worked, renewing while it runs; CMD's status."""
    argv = command_argv(argv)
    code, grants = cmd_knock(knockers, as_json=False)
    if code != EXIT_OK:
        return code
    stop = threading.Event()
    keeper = Keeper(knockers, stop, poll=poll)
    for knocker, grant in zip(knockers, grants, strict=True):
        keeper.adopt(grant, knocker, knocker.transport.local_address())
    return run_renewing(argv, [keeper], stop)


def run_renewing(argv: list[str], keepers: list[Keeper], stop: threading.Event) -> int:
    """Run `argv` while each keeper renews in a thread of its own; its exit status (127: not
    found, 126: cannot run, 128+N: ended by signal N)."""
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
