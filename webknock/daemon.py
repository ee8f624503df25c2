"""webknockd: the root daemon that turns spooled grant requests into firewall rules.

It watches the spool with inotify, drains everything pending as one batch,
re-validates each file as untrusted input, applies valid requests in one
firewall batch, records them in the state file and writes a result per request.
On start it reconciles the kernel with the state file; while it runs it
removes expired grants about once a second.
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType

from webknock import __version__
from webknock.config import ConfigError, ServerConfig, load
from webknock.engine import GrantEngine, Outcome
from webknock.events import Event, EventBus, log_sink
from webknock.firewall import FirewallError, make_firewall
from webknock.fsutil import write_atomic
from webknock.logsetup import setup_logging
from webknock.spool import (
    REQUEST_SUFFIX,
    RESULT_SUFFIX,
    GrantRequest,
    SpoolError,
    read_request,
    result_payload,
)
from webknock.spooldirs import WebIdentity, prepare_spool, web_identity
from webknock.state import StateError, StateStore

log = logging.getLogger("webknockd")

MAX_BATCH = 5000
RESULT_TTL = 120.0
TMP_TTL = 60.0
KEEP_REJECTED = 1000
TICK = 1.0


class AlreadyRunning(Exception):
    pass


def acquire_daemon_lock(cfg: ServerConfig) -> int:
    """One daemon per instance: an flock held for the daemon's lifetime."""
    path = Path(f"{cfg.state_file}.daemon")
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
    """PID of the running daemon of this instance, or None (lock is free)."""
    path = Path(f"{cfg.state_file}.daemon")
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


class Daemon:
    """One instance's spool processor."""

    def __init__(
        self,
        cfg: ServerConfig,
        engine: GrantEngine,
        web: WebIdentity,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.web = web
        self.clock = clock
        self.spool = cfg.spool
        self.allowed_uids = frozenset({0, web.uid})
        self.offered = cfg.offered()
        self.stopping = False

    # -- spool --------------------------------------------------------------------------

    def pending(self) -> list[os.DirEntry[str]]:
        """Claim up to MAX_BATCH new requests (rename into claimed/) and list all claimed."""
        with os.scandir(self.spool.requests) as it:
            fresh = sorted(e.name for e in it if not e.name.startswith("."))
        for name in fresh[:MAX_BATCH]:
            try:
                os.rename(self.spool.requests / name, self.spool.claimed / name)
            except FileNotFoundError:
                continue  # withdrawn by the CGI after its timeout
        with os.scandir(self.spool.claimed) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        entries.sort(key=lambda e: e.name)
        return entries[:MAX_BATCH]

    def write_result(self, request_id: str, outcome: Outcome) -> None:
        if outcome.ok:
            payload = result_payload(
                True, expires=outcome.expires, ports=[list(p) for p in outcome.ports]
            )
        else:
            payload = result_payload(False, error=outcome.error, errorcode=outcome.errorcode)
        path = self.spool.results / f"{request_id}{RESULT_SUFFIX}"
        write_atomic(path, payload, 0o640, uid=0, gid=self.web.gid, fsync=False)

    def reject(self, entry: os.DirEntry[str], reason: str) -> None:
        """Log, answer (when the name is a request id) and move the file aside."""
        log.warning("rejected spool file %s: %s", entry.name[:80], reason)
        self.engine.events.emit(
            Event(
                "reject",
                self.clock(),
                self.cfg.instance,
                "",
                reason=f"spool file {entry.name[:80]}: {reason}",
            )
        )
        stem = entry.name[: -len(REQUEST_SUFFIX)] if entry.name.endswith(REQUEST_SUFFIX) else ""
        if len(stem) == 32 and all(c in "0123456789abcdef" for c in stem):
            self.write_result(
                stem, Outcome(False, error="request refused by the server", errorcode="INVALID")
            )
        target = self.spool.rejected / f"{entry.name[:80]}.{int(self.clock())}"
        try:
            os.rename(entry.path, target)
        except OSError as exc:
            log.error("cannot move %s aside (%s); removing it", entry.name[:80], exc.strerror)
            self._unlink(Path(entry.path))

    def drain(self) -> int:
        """Process everything pending as one batch; return how many requests were handled."""
        handled = 0
        stuck: set[str] = set()  # names that could not be removed: never loop on them
        while True:
            entries = [e for e in self.pending() if e.name not in stuck]
            if not entries:
                return handled
            stuck.update(e.name for e in entries)
            now = self.clock()
            valid: list[tuple[os.DirEntry[str], GrantRequest]] = []
            for entry in entries:
                try:
                    req = read_request(
                        Path(entry.path),
                        allowed_uids=self.allowed_uids,
                        offered=self.offered,
                        max_time=self.cfg.max_time,
                    )
                except SpoolError as exc:
                    self.reject(entry, str(exc))
                    continue
                if now - req.received > self.cfg.result_timeout + 30:
                    self.reject(entry, f"stale: received {now - req.received:.0f}s ago")
                    continue
                valid.append((entry, req))
            try:
                outcomes = self.engine.open([req for _, req in valid], now)
            except StateError as exc:
                log.error("state file error: %s", exc)
                outcomes = {
                    req.id: Outcome(False, error="server state unavailable", errorcode="STATE")
                    for _, req in valid
                }
            for entry, req in valid:
                self.write_result(req.id, outcomes[req.id])
                self._unlink(Path(entry.path))
            handled += len(entries)

    # -- housekeeping --------------------------------------------------------------------

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def prune(self) -> None:
        """Drop old results, abandoned temp files, old replay marks and excess rejects."""
        now = self.clock()
        seen_ttl = 2 * self.cfg.ts_window + 5
        for directory, ttl, dot_only in (
            (self.spool.results, RESULT_TTL, False),
            (self.spool.requests, TMP_TTL, True),
            (self.spool.seen, seen_ttl, False),
        ):
            with os.scandir(directory) as it:
                for e in it:
                    if dot_only and not e.name.startswith("."):
                        continue
                    try:
                        if now - e.stat(follow_symlinks=False).st_mtime > ttl:
                            self._unlink(Path(e.path))
                    except OSError:
                        continue
        with os.scandir(self.spool.rejected) as it:
            rejected = sorted(it, key=lambda e: e.stat(follow_symlinks=False).st_mtime)
        for e in rejected[:-KEEP_REJECTED]:
            self._unlink(Path(e.path))

    def tick(self) -> None:
        """Once a second: expire grants and prune the spool."""
        try:
            self.engine.reap(self.clock())
        except (FirewallError, StateError) as exc:
            log.error("reap failed: %s", exc)
        self.prune()

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        from inotify_simple import INotify, flags

        inotify = INotify()
        inotify.add_watch(self.spool.requests, flags.CLOSE_WRITE | flags.MOVED_TO)
        try:
            self.drain()
            next_tick = 0.0
            while not self.stopping:
                now = self.clock()
                if now >= next_tick:
                    self.tick()
                    next_tick = now + TICK
                wait_ms = max(1, int((next_tick - self.clock()) * 1000))
                if inotify.read(timeout=wait_ms):
                    self.drain()
        finally:
            inotify.close()

    def stop(self, signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping (grants stay in the firewall)", signum)
        self.stopping = True


def build(cfg: ServerConfig) -> tuple[GrantEngine, WebIdentity]:
    """Wire config, state, firewall and event sinks together."""
    web = web_identity(cfg)
    prepare_spool(cfg.spool, web.gid)
    bus = EventBus(log_sink)
    try:
        from webknock.notify import sinks_for  # optional: audit trail and notifications
    except ImportError:
        pass
    else:
        for sink in sinks_for(cfg):
            bus.add(sink)
    engine = GrantEngine(cfg.instance, StateStore(cfg.state_file), make_firewall(cfg), bus)
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
