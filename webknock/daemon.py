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
import gc
import logging
import os
import shutil
import signal
import stat
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from webknock import __version__
from webknock.config import ConfigError, ServerConfig, load
from webknock.doorbell import MAX_RESULT_BYTES, deliver, result_payload
from webknock.engine import GrantEngine, Outcome
from webknock.events import Event, EventBus, log_sink
from webknock.firewall import FirewallError, make_firewall
from webknock.logsetup import setup_logging
from webknock.spool import FAIL_PREFIX, MAX_REQUEST_BYTES, REPLAY_PREFIX, REQUEST_SUFFIX
from webknock.spool_reader import REQUEST_ID, GrantRequest, SpoolError, read_request
from webknock.spooldirs import WebIdentity, prepare_spool, web_identity
from webknock.state import StateError, StateStore

log = logging.getLogger("webknockd")

MAX_BATCH = 5000
TMP_TTL = 60.0
KEEP_REJECTED = 1000
TICK = 1.0
#: At most this many throttle counters (f- files) in seen/; the oldest go first. The web
#: user creates one per address that sent a bad packet; this bounds the disk they use.
MAX_THROTTLE_MARKS = 20000
#: The cheap firewall check may use at most 1/CHECK_SHARE of the daemon's time: it runs
#: every TICK unless one check costs more than TICK/CHECK_SHARE (it lists every grant:
#: 6 ms at 600 grants, 126 ms at 10 000 with nftables, so then every 6.3 s; the iptables
#: backends start a process per family, ~20 ms). A knock that arrives during a check
#: waits for it, so this is also the share of knocks that do. At 2% a damaged firewall
#: with a few hundred grants is seen within a second or two, with any backend.
CHECK_SHARE = 50
#: The spool is pruned every this many seconds (the shortest lifetime it enforces, of temp
#: files and doorbells, is a minute; it walks every replay mark, 11 ms per 1 800 on tmpfs).
PRUNE_EVERY = 10.0
#: Every this many seconds the check compares every key, not only counts.
FULL_CHECK = 30.0
#: After a failed check or repair, wait this long before the next attempt.
CHECK_BACKOFF = 5.0


class AlreadyRunning(Exception):
    pass


class Claimed(NamedTuple):
    """A spool entry the daemon has taken out of the web user's reach (claimed/)."""

    name: str
    path: str


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
        self.next_check = 0.0
        self.next_full_check = 0.0
        self.next_prune = 0.0
        self.rescan = True  # look for claimed/ leftovers (a crash) at start and every tick
        self._requests = str(self.spool.requests)
        self._claimed = str(self.spool.claimed)
        self._waits = str(self.spool.waits)

    # -- spool --------------------------------------------------------------------------

    def pending(self, names: Iterable[str] | None = None) -> list[Claimed]:
        """Claim up to MAX_BATCH new requests (rename into claimed/); return what is claimed:
        those, or after a `rescan` everything in claimed/ (leftovers of a crash included).

        `names` are what inotify reported arriving; without them requests/ is listed."""
        if names is None:
            with os.scandir(self._requests) as it:
                fresh = sorted(e.name for e in it if not e.name.startswith("."))
        else:
            fresh = sorted({n for n in names if n and not n.startswith(".")})
        taken: list[Claimed] = []
        for name in fresh[:MAX_BATCH]:
            target = os.path.join(self._claimed, name)
            try:
                os.rename(os.path.join(self._requests, name), target)
            except FileNotFoundError:
                continue  # withdrawn by the CGI after its timeout
            except OSError as exc:  # e.g. a directory planted under a name already claimed
                log.warning("cannot claim spool entry %r (%s); moving it aside", name, exc)
                self._set_aside(self.spool.requests / name, name)
                continue
            taken.append(Claimed(name, target))
        if not self.rescan:
            return taken
        self.rescan = False
        with os.scandir(self._claimed) as it:
            entries = [Claimed(e.name, e.path) for e in it if not e.name.startswith(".")]
        entries.sort()
        return entries[:MAX_BATCH]

    def answer(self, request_id: str, outcome: Outcome) -> None:
        """Hand the outcome to the CGI waiting on the request's doorbell, if one still does."""
        if outcome.ok:
            payload = result_payload(
                True, expires=outcome.expires, ports=[list(p) for p in outcome.ports]
            )
            if len(payload) > MAX_RESULT_BYTES:  # 256 ports fit; the CGI needs only the expiry
                payload = result_payload(True, expires=outcome.expires)
        else:
            payload = result_payload(False, error=outcome.error, errorcode=outcome.errorcode)
        if not deliver(os.path.join(self._waits, request_id), self.allowed_uids, payload):
            log.info("request %s: no CGI waits for its answer (ok=%s)", request_id, outcome.ok)

    def reject(self, entry: Claimed, reason: str) -> None:
        """Log, answer (when the name is a request id) and move the file aside."""
        log.warning("rejected spool file %r: %s", entry.name[:80], reason)
        self.engine.events.emit(
            Event(
                "reject",
                self.clock(),
                self.cfg.instance,
                "",
                reason=f"spool file {entry.name[:80]!r}: {reason}",
            )
        )
        stem = entry.name[: -len(REQUEST_SUFFIX)] if entry.name.endswith(REQUEST_SUFFIX) else ""
        if REQUEST_ID.fullmatch(stem):
            self.answer(
                stem, Outcome(False, error="request refused by the server", errorcode="INVALID")
            )
        self._set_aside(Path(entry.path), entry.name)

    def _set_aside(self, path: Path, name: str) -> None:
        """Move a refused spool entry into rejected/ (root only) under a name of its own.

        Only small files are kept for the admin; directories and files too big to be a
        request are deleted once out of the web user's reach.
        """
        target = self.spool.rejected / f"{name[:80]}.{int(self.clock())}.{os.urandom(4).hex()}"
        try:
            os.rename(path, target)
        except OSError as exc:
            log.error("cannot move %r aside (%s); removing it", name[:80], exc.strerror)
            target = path
        try:
            st = os.lstat(target)
            if stat.S_ISDIR(st.st_mode):
                shutil.rmtree(target)  # fd-based: never follows a link planted inside
            elif target == path or st.st_size > MAX_REQUEST_BYTES:
                os.unlink(target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.error("cannot remove refused spool entry %r: %s", name[:80], exc)

    def drain(self, names: Iterable[str] | None = None) -> int:
        """Process everything pending as one batch; return how many requests were handled.

        With `names` (from inotify) the first batch is those requests, else requests/ is
        listed. A batch of MAX_BATCH is followed by the next one at once, from a listing. A
        smaller batch had all there was: what arrives meanwhile wakes the loop again by its
        own event (and the tick drains anyway, from a listing: nothing lost with the event
        queue's overflow), so the common case pays for no look at the spool at all."""
        handled = 0
        stuck: set[str] = set()  # names that could not be removed: never loop on them
        while True:
            claimed = self.pending(names)
            names = None
            entries = [e for e in claimed if e.name not in stuck]
            if not entries:
                return handled
            stuck.update(e.name for e in entries)
            with self.engine.events.held():  # the answers first, then log, audit, notify
                self._handle(entries)
            handled += len(entries)
            if len(claimed) < MAX_BATCH:
                return handled

    def _handle(self, entries: list[Claimed]) -> None:
        """Validate, apply and answer one batch of claimed requests."""
        now = self.clock()
        valid: list[tuple[Claimed, GrantRequest]] = []
        for entry in entries:
            try:
                req = read_request(
                    entry.path,
                    allowed_uids=self.allowed_uids,
                    offered=self.offered,
                    max_time=self.cfg.max_time,
                )
            except SpoolError as exc:
                self.reject(entry, str(exc))
                continue
            except Exception as exc:  # untrusted input must never stop the daemon
                log.exception("unexpected error reading spool file %r", entry.name[:80])
                self.reject(entry, f"unreadable: {type(exc).__name__}")
                continue
            age = now - req.received
            if not -30 <= age <= self.cfg.result_timeout + 30:
                self.reject(entry, f"stale: received {age:.0f}s ago")
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
            self.answer(req.id, outcomes[req.id])
            self._unlink(entry.path)

    # -- housekeeping --------------------------------------------------------------------

    @staticmethod
    def _unlink(path: str | Path) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:  # read-only spool, a directory: never stop the daemon over it
            log.error("cannot remove %s: %s", path, exc)

    def seen_ttl(self, name: str) -> float:
        """How long an entry of seen/ must live: a replay mark as long as its packet could be
        accepted (timestamp window on both sides), a throttle counter its window."""
        replay = 2 * self.cfg.ts_window + 5
        throttle = self.cfg.throttle_window + 5
        if name.startswith(REPLAY_PREFIX):
            return replay
        if name.startswith(FAIL_PREFIX):
            return throttle
        return max(replay, throttle)  # not ours: whatever the web user left there

    def prune(self) -> None:
        """Drop abandoned temp files and doorbells, old replay marks and throttle counters,
        excess throttle counters and excess rejects."""
        now = self.clock()
        bell_ttl = 2 * self.cfg.result_timeout + TMP_TTL  # a CGI waits twice at most
        for directory, ttl in (
            (self.spool.requests, lambda name: TMP_TTL if name.startswith(".") else None),
            (self.spool.waits, lambda _name: bell_ttl),
            (self.spool.seen, self.seen_ttl),
        ):
            counters: list[tuple[float, str]] = []
            with os.scandir(directory) as it:
                for e in it:
                    limit = ttl(e.name)
                    if limit is None:
                        continue
                    try:
                        st = e.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if now - st.st_mtime <= limit:
                        if e.name.startswith(FAIL_PREFIX) and directory == self.spool.seen:
                            counters.append((st.st_mtime, e.path))
                    elif stat.S_ISDIR(st.st_mode):  # planted by the web user: not ours
                        self._set_aside(Path(e.path), e.name)
                    else:
                        self._unlink(e.path)
            if len(counters) > MAX_THROTTLE_MARKS:
                counters.sort()
                log.warning(
                    "%d throttle counters in %s: dropping the %d oldest",
                    len(counters),
                    directory,
                    len(counters) - MAX_THROTTLE_MARKS,
                )
                for _, path in counters[: len(counters) - MAX_THROTTLE_MARKS]:
                    self._unlink(path)
        rejected: list[tuple[float, str]] = []
        with os.scandir(self.spool.rejected) as it:
            for e in it:
                try:
                    rejected.append((e.stat(follow_symlinks=False).st_mtime, e.path))
                except OSError:
                    continue
        rejected.sort()
        for _, path in rejected[:-KEEP_REJECTED]:
            self._unlink(path)

    def check_firewall(self, now: float) -> None:
        """Repair a firewall changed behind our back (flushed, reloaded, hook deleted).

        A cheap count every TICK (less often if one check costs more than its share of the
        daemon's time), a full key-by-key compare every FULL_CHECK seconds.
        """
        full = now >= self.next_full_check
        started = time.monotonic()
        try:
            why = self.engine.check(now, full=full)
            cost = time.monotonic() - started  # of the check alone: a repair is no reason
            if why:  # to look less often (the next damage would wait for it)
                log.warning("firewall differs from the state file (%s): restoring", why)
                live = self.engine.reconcile(self.clock())
                log.warning("firewall restored: %d live grant(s)", live)
        except (FirewallError, StateError) as exc:
            log.error("firewall check failed: %s (next try in %.0f s)", exc, CHECK_BACKOFF)
            self.next_check = now + CHECK_BACKOFF
            return
        self.next_check = now + max(TICK, cost * CHECK_SHARE) - TICK / 10
        if full:
            self.next_full_check = now + FULL_CHECK

    def tick(self) -> None:
        """Once a second: expire grants, check the firewall (see CHECK_SHARE), prune the
        spool (every PRUNE_EVERY), and have the next drain look through claimed/ as well."""
        now = self.clock()
        self.rescan = True
        try:
            self.engine.reap(now)
        except (FirewallError, StateError) as exc:
            log.error("reap failed: %s", exc)
        if now >= self.next_prune:
            self.next_prune = now + PRUNE_EVERY
            try:
                self.prune()
            except OSError as exc:
                log.error("pruning the spool failed: %s", exc)
        if now >= self.next_check:
            self.check_firewall(now)

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        from webknock.inotify import INotify, flags

        # What start-up built (modules, config, backend, state connection) lives as long as
        # the daemon: move it out of the collector's way, so that a full collection, when
        # one falls on a knock, walks only what the loop allocated since.
        gc.freeze()
        inotify = INotify()
        # Requests appear by rename: only that wakes us (each wake-up of an idle host costs
        # latency; a temp file's close would be a second one). Anything else, e.g. a file
        # written in place or events lost to a full queue, is picked up by the tick's drain.
        inotify.add_watch(self.spool.requests, flags.MOVED_TO)
        try:
            next_tick = 0.0
            while not self.stopping:
                now = self.clock()
                if now >= next_tick:
                    self._safely(self.drain)
                    self._safely(self.tick)
                    next_tick = now + TICK
                wait_ms = max(1, int((next_tick - self.clock()) * 1000))
                events = inotify.read(timeout=wait_ms)
                if events:
                    names = (
                        None  # the queue overflowed: list requests/
                        if any(e.mask & flags.Q_OVERFLOW for e in events)
                        else [e.name for e in events]
                    )
                    self._safely(self.drain, names)
        finally:
            inotify.close()

    @staticmethod
    def _safely(step: Callable[..., object], *args: object) -> None:
        """Run one step of the loop; a failing disk, state file or firewall is logged and
        retried on the next event or tick, never the end of the daemon."""
        try:
            step(*args)
        except (OSError, StateError, FirewallError) as exc:
            log.error("%s failed: %s", getattr(step, "__name__", "step"), exc)
            time.sleep(0.1)  # no hot loop on a persistent failure

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
