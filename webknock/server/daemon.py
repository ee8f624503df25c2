"""webknockd, the process: command line, one daemon per instance (an flock), wiring
config, state, firewall and event sinks together (`build`), then the loop
(:mod:`webknock.server.loop`) until a signal.

On start it reconciles the kernel with the state file: the kernel holds exactly the live
grants, with their remaining time. Each batch of knocks goes through the decision path
(:mod:`webknock.server.decide`).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import time
from pathlib import Path

from webknock import __version__
from webknock.config import ConfigError, ServerConfig, load
from webknock.logsetup import setup_logging
from webknock.server.engine import GrantEngine, Limits
from webknock.server.events import EventBus, log_sink
from webknock.server.firewall import FirewallError, make_firewall
from webknock.server.hooks import hooks_sink
from webknock.server.loop import Daemon
from webknock.server.notify import sinks_for
from webknock.server.state import StateError, StateStore
from webknock.spool.mount import WebIdentity, prepare_spool, web_identity

log = logging.getLogger("webknockd")


def _lock_path(cfg: ServerConfig) -> Path:
    return Path(f"{cfg.state_file}.daemon")


class AlreadyRunning(Exception):
    """Another webknockd holds this instance's daemon lock."""


def acquire_daemon_lock(cfg: ServerConfig) -> int:
    """One daemon per instance: an flock held for the daemon's lifetime (its descriptor);
    raises AlreadyRunning."""
    path = _lock_path(cfg)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyRunning(f"another webknockd holds {path}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def daemon_running(cfg: ServerConfig) -> int | None:
    """PID of the running daemon of this instance (-1 if it did not write it yet), or None
    (the lock is free)."""
    path = _lock_path(cfg)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.read(fd, 32).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)
    return None


def build(cfg: ServerConfig, *, daemon: bool = True) -> tuple[GrantEngine, WebIdentity]:
    """Wire config, state, firewall and event sinks together; for webknockd itself, or
    (not `daemon`) for webknockctl, whose firewall follows what webknockd set up."""
    web = web_identity(cfg)
    prepare_spool(cfg.spool, web.gid)
    bus = EventBus(log_sink)
    for sink in sinks_for(cfg):  # the audit trail, mail and webhooks the config asks for
        bus.add(sink)
    hooks = hooks_sink(cfg)  # [hooks]: run off the apply path, stopped at exit
    if hooks is not None:
        bus.add(hooks)
    limits = Limits(cfg.max_grants, cfg.max_grants_per_prefix)
    firewall = make_firewall(cfg, follow_kernel=not daemon)
    engine = GrantEngine(cfg.instance, StateStore(cfg.state_file), firewall, bus, limits)
    return engine, web


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="webknockd",
        description="Root daemon of webknock: applies spooled knocks to the firewall.",
        epilog="Exit status: 0 stopped by signal or --once done, 1 runtime error, "
        "2 bad config or usage, 3 another daemon already runs this instance.",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="instance config (default: $WEBKNOCK_CONFIG or /etc/webknock/webknock.ini)",
    )
    parser.add_argument(
        "--once", action="store_true", help="reconcile, drain the spool, reap, then exit"
    )
    parser.add_argument("--syslog", action="store_true", help="log to syslog instead of stderr")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"webknockd {__version__}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging("webknockd", verbose=args.verbose, use_syslog=args.syslog)
    if os.geteuid() != 0:
        log.error("webknockd must run as root (it changes the firewall)")
        return 2
    try:
        cfg = load(args.config)
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    setup_logging("webknockd", verbose=args.verbose, use_syslog=args.syslog, instance=cfg.instance)
    try:
        lock_fd = acquire_daemon_lock(cfg)
    except AlreadyRunning as exc:
        log.error("%s", exc)
        return 3
    try:
        engine, web = build(cfg)
        daemon = Daemon(cfg, engine, web)
        daemon.guard.load(time.time())
        daemon.publish_server_key()
        live = engine.reconcile(time.time())
        log.info(
            "started %s, instance %s, %s: restored %d live grant(s)",
            __version__,
            cfg.instance,
            engine.firewall.describe(),
            live,
        )
        if args.once:
            daemon.drain()
            daemon.tick()
            return 0
        signal.signal(signal.SIGTERM, daemon.stop)
        signal.signal(signal.SIGINT, daemon.stop)
        daemon.run()
        return 0
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    except (FirewallError, StateError, OSError) as exc:
        log.error("fatal: %s", exc)
        return 1
    finally:
        os.close(lock_fd)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
