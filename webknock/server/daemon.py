"""webknockd: the root daemon that verifies every knock and turns it into firewall rules.

It watches the spool with inotify and drains everything pending as one batch. For each
request, top to bottom: read the frame as untrusted input, tell the client address
(``trusted_proxies``), verify the packet with keys only root holds (:mod:`webknock.server.verify`),
burn its replay mark (:mod:`webknock.server.guard`), decide, apply the batch's grants in one
firewall batch (:mod:`webknock.server.engine`) and answer each CGI with the sealed reply through
its doorbell. On start it reconciles the kernel with the state file; while it runs it
removes expired grants about once a second and keeps the spool clean
(:mod:`webknock.spool.housekeeping`).
"""

from __future__ import annotations

import argparse
import fcntl
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import NamedTuple

from webknock import __version__
from webknock.addresses import Address, AddressError, client_address, prefix_of
from webknock.config import ConfigError, ServerConfig, load
from webknock.fsutil import write_atomic
from webknock.keys import KeysError
from webknock.logsetup import setup_logging
from webknock.server.engine import GrantEngine, Limits, Outcome
from webknock.server.events import EventBus, log_sink
from webknock.server.firewall import FirewallError, make_firewall
from webknock.server.grants import GrantRequest
from webknock.server.guard import Guard
from webknock.server.hooks import hooks_sink
from webknock.server.metrics import Metrics, snapshot_path
from webknock.server.state import StateError, StateStore
from webknock.server.verify import Answer, Refusal, Verified, Verifier
from webknock.spool import SERVER_KEY_NAME
from webknock.spool.doorbell import deliver, encode_answer
from webknock.spool.housekeeping import SpoolKeeper
from webknock.spool.mount import WebIdentity, prepare_spool, web_identity
from webknock.spool.reader import SpoolError, read_request, request_name_id

log = logging.getLogger("webknockd")

MAX_BATCH = 5000
TICK = 1.0
#: The cheap firewall check may use at most 1/CHECK_SHARE of the daemon's time: it runs
#: every TICK unless one check costs more than TICK/CHECK_SHARE (it lists every grant).
#: A knock that arrives during a check waits for it (docs/design.md has the figures).
CHECK_SHARE = 50
#: The spool is pruned, and replay marks and bad-packet counts forgotten, every this
#: many seconds (the shortest lifetime they enforce is a minute).
PRUNE_EVERY = 10.0
#: At most this many refusals are logged one by one per housekeeping round (PRUNE_EVERY).
REFUSAL_LINES = 100
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
    arrived: float  # its ctime before the claim: when the CGI put it there, or later
    inode: int = 0
    leftover: bool = False  # found in claimed/ after a crash: it may have burnt its mark


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
        verifier: Verifier | None = None,
        guard: Guard | None = None,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.web = web
        self.clock = clock
        self.verifier = verifier or Verifier(cfg)
        self.guard = guard or Guard(
            engine.store,
            max(cfg.ts_window, cfg.v2_ts_window),
            cfg.throttle_failures,
            cfg.throttle_window,
        )
        self.spool = cfg.spool
        #: The longest a CGI waits for its answer (twice: see Submitted.answer); a request
        #: older than that is never applied: its client was told 504.
        self.max_wait = 2 * cfg.result_timeout + 1
        self.keeper = SpoolKeeper(self.spool, 2 * self.max_wait + 60, clock)
        self.allowed_uids = frozenset({0, web.uid})
        self.stopping = False
        self.next_check = 0.0
        self.next_full_check = 0.0
        self.next_prune = 0.0
        self.refused_files = 0  # malformed spool files since the last prune (logged then)
        self.refusal_lines = 0  # refusals logged one by one since the last prune
        self.unlogged = 0  # refusals past REFUSAL_LINES since the last prune (logged then)
        self.rescan = True  # look for claimed/ leftovers (a crash) at start and every tick
        self.metrics = Metrics(cfg.metrics_file, snapshot_path(cfg))
        self.metrics_failing = False  # the last write failed (logged once until it works)
        self._requests = str(self.spool.requests)
        self._claimed = str(self.spool.claimed)
        self._waits = str(self.spool.waits)

    # -- spool --------------------------------------------------------------------------

    def pending(self, names: Iterable[str] | None = None) -> list[Claimed]:
        """Claim up to MAX_BATCH new requests (rename into claimed/); return what is claimed:
        those, or after a `rescan` everything in claimed/ (leftovers of a crash included).

        `names` are what inotify reported arriving; without them requests/ is listed. Only
        names of requests are claimed: whatever else the web user plants there is the
        housekeeping's, and never takes a valid request's place in a batch."""
        if names is None:
            with os.scandir(self._requests) as it:
                fresh = sorted(e.name for e in it if request_name_id(e.name))
        else:
            fresh = sorted({n for n in names if request_name_id(n)})
        taken: list[Claimed] = []
        for name in fresh[:MAX_BATCH]:
            source = os.path.join(self._requests, name)
            target = os.path.join(self._claimed, name)
            try:
                st = os.lstat(source)
                if self.keeper.is_stuck(self._requests, st.st_ino):
                    continue  # could not be removed and was logged: not again
                os.rename(source, target)
            except FileNotFoundError:
                continue  # withdrawn by the CGI after its timeout
            except OSError as exc:  # e.g. a directory the web user made unmovable
                log.debug("cannot claim spool entry %r (%s); removing it", name, exc)
                self.keeper.set_aside(Path(source), name)
                continue
            taken.append(Claimed(name, target, st.st_ctime, st.st_ino))
        if not self.rescan:
            return taken
        self.rescan = False
        # What this call claimed is fresh, not a leftover: the web user may name a copy of
        # a packet after the request that burnt its mark, which a leftover may re-use.
        just_taken = {c.name: c for c in taken}
        entries: list[Claimed] = []
        with os.scandir(self._claimed) as it:
            for e in it:
                if e.name in just_taken:
                    entries.append(just_taken[e.name])
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not self.keeper.is_stuck(self._claimed, st.st_ino):
                    entries.append(Claimed(e.name, e.path, st.st_ctime, st.st_ino, leftover=True))
        entries.sort()
        return entries[:MAX_BATCH]

    def answer(self, request_id: str, answer: Answer) -> None:
        """Hand the answer to the CGI waiting on the request's doorbell, if one still does."""
        payload = encode_answer(answer.status, answer.note, answer.body)
        if not deliver(os.path.join(self._waits, request_id), self.allowed_uids, payload):
            log.debug("request %s: no CGI waits for its answer", request_id)

    def reject(self, entry: Claimed, reason: str) -> None:
        """A malformed spool file: answer 400 (its CGI, if any, waits), set it aside, and
        count it for one log line per prune (a flood of them must not flood the log)."""
        log.debug("rejected spool file %r: %s", entry.name[:80], reason)
        self.refused_files += 1
        request_id = request_name_id(entry.name)
        if request_id:
            self.answer(request_id, Answer(400))
        self.keeper.set_aside(Path(entry.path), entry.name)

    def drain(self, names: Iterable[str] | None = None) -> int:
        """Process everything pending as one batch; return how many requests were handled.

        With `names` (from inotify) the first batch is those requests, else requests/ is
        listed. A batch of MAX_BATCH is followed by the next one at once, from a listing. A
        smaller batch had all there was: what arrives meanwhile wakes the loop again by its
        own event (and the tick drains anyway, from a listing)."""
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

    # -- the decision path ---------------------------------------------------------------

    def _handle(self, entries: list[Claimed]) -> None:
        """Verify, decide, apply and answer one batch of claimed requests."""
        now = self.clock()
        self.verifier.refresh()
        answers: dict[str, Answer] = {}
        checked: list[Verified] = []
        for entry in entries:
            verified = self._check(entry, now, answers)
            if verified is not None:
                checked.append(verified)
        retries = frozenset(rid for e in entries if e.leftover and (rid := request_name_id(e.name)))
        try:
            fresh = self.guard.commit([(v.mark, v.id) for v in checked], now, retries)
        except StateError as exc:  # a mark not recorded would allow a replay: accept nothing
            log.error("state file error, %d request(s) refused: %s", len(checked), exc)
            for v in checked:
                answers[v.id] = Answer(503)
                self.metrics.knock("error", v.protocol)
            checked, fresh = [], []
        grants: list[Verified] = []
        for v, new in zip(checked, fresh, strict=True):
            if not new:
                answers[v.id] = self._refuse(
                    v.id,
                    v.peer,
                    Refusal(
                        v.replies.refused("REPLAY", "this request was seen before", now),
                        "replayed",
                        bad=True,
                    ),
                    now,
                    v.protocol,
                    "replay",
                )
            elif v.api == "getinfo":
                answers[v.id] = v.replies.info(v.peer, v.allowed, v.max_time, now)
                self.metrics.knock("info", v.protocol)
            elif not v.ports:
                error = "none of the requested ports is offered"
                answers[v.id] = v.replies.refused("NOPORTS", error, now)
                self.metrics.knock("refused", v.protocol)
            else:
                grants.append(v)
        outcomes = self._open(grants, now)
        for v in grants:
            o = outcomes[v.id]
            answers[v.id] = (
                v.replies.granted(v.peer, o.ports, o.expires, now)
                if o.ok
                else v.replies.refused(o.errorcode, o.error, now)
            )
            self.metrics.knock(_outcome(o), v.protocol)
        for entry in entries:
            request_id = request_name_id(entry.name)
            if request_id in answers:
                self.answer(request_id, answers[request_id])
            self.keeper.remove(self._claimed, entry.name, entry.inode)

    def _check(self, entry: Claimed, now: float, answers: dict[str, Answer]) -> Verified | None:
        """Read and verify one claimed request; a refusal goes into `answers`."""
        try:
            req = read_request(entry.path, allowed_uids=self.allowed_uids)
        except SpoolError as exc:
            self.reject(entry, str(exc))
            return None
        except Exception as exc:  # untrusted input must never stop the daemon
            log.exception("unexpected error reading spool file %r", entry.name[:80])
            self.reject(entry, f"unreadable: {type(exc).__name__}")
            return None
        if now - entry.arrived > self.max_wait:
            log.info(
                "request %s: %.0f s old, its CGI gave up; dropped", req.id, now - entry.arrived
            )
            return None
        try:
            peer = client_address(req.remote, req.forwarded, self.cfg.trusted_proxies)
        except AddressError as exc:
            self._log_refusal("request %s: %s", req.id, exc.reason)
            answers[req.id] = Answer(exc.status)
            self.metrics.knock("refused", req.protocol)
            return None
        try:
            return self.verifier.verify(req, peer, now)
        except Refusal as refusal:
            answers[req.id] = self._refuse(req.id, peer, refusal, now, req.protocol)
            return None

    def _refuse(
        self,
        request_id: str,
        peer: Address,
        refusal: Refusal,
        now: float,
        protocol: str,
        outcome: str = "",
    ) -> Answer:
        """The answer to a refused request. A bad packet is counted; one from a throttled
        prefix gets 429 and no log line of its own (a summary per prune). `outcome` for the
        metrics: by default error (5xx), bad_packet or refused."""
        if refusal.bad:
            throttled = self.guard.throttled(peer, now)
            self.guard.failed(peer, now)
            if throttled:
                prefix = prefix_of(peer)
                self.guard.suppressed[prefix] = self.guard.suppressed.get(prefix, 0) + 1
                self.metrics.knock("throttled", protocol)
                return Answer(429)
        if not outcome:
            bad = "bad_packet" if refusal.bad else "refused"
            outcome = "error" if refusal.answer.status >= 500 else bad
        self.metrics.knock(outcome, protocol)
        self._log_refusal("refused %s from %s: %s", request_id[:8], peer, refusal.reason)
        return refusal.answer

    def _open(self, grants: list[Verified], now: float) -> dict[str, Outcome]:
        """Apply the batch's grants: an outcome per request id."""
        requests = [
            GrantRequest(
                v.id, v.peer, v.ports, v.time, "knock", v.client, v.user_agent, v.prefixlen
            )
            for v in grants
        ]
        started = time.monotonic()
        try:
            return self.engine.open(requests, now)
        except StateError as exc:
            log.error("state file error: %s", exc)
            return {
                r.id: Outcome(False, error="server state unavailable", errorcode="STATE")
                for r in requests
            }
        finally:
            if requests:
                self.metrics.applied(time.monotonic() - started)

    def _log_refusal(self, message: str, *args: object) -> None:
        """One line per refusal, up to REFUSAL_LINES per housekeeping round; then a count
        (anyone can send bad packets, and the web user can forge any number of requests)."""
        if self.refusal_lines < REFUSAL_LINES:
            self.refusal_lines += 1
            log.info(message, *args)
        else:
            self.unlogged += 1

    # -- housekeeping --------------------------------------------------------------------

    def publish_server_key(self) -> None:
        """Keep ``<spool>/server.pub`` the v2 server's public key text, for the browser page
        the CGI serves (absent while v2 is off)."""
        path = self.spool.root / SERVER_KEY_NAME
        try:
            key = self.verifier.server_key()
        except KeysError:
            key = None  # the knocks say why (logged once)
        want = f"{key.public_text()}\n".encode() if key else None
        try:
            have: bytes | None = path.read_bytes()
        except FileNotFoundError:
            have = None
        if want == have:
            return
        if want is None:
            self._unlink_quietly(path)
        else:
            write_atomic(path, want, 0o644, fsync=False)

    @staticmethod
    def _unlink_quietly(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass

    def housekeeping(self) -> None:
        """Prune the spool, forget old replay marks and counts, log what was refused quietly,
        publish the server key."""
        self.keeper.prune()
        self.publish_server_key()
        if self.refused_files:
            log.warning("refused %d malformed spool file(s)", self.refused_files)
            self.refused_files = 0
        if self.unlogged:
            log.warning("refused %d more request(s), not logged one by one", self.unlogged)
        self.refusal_lines = self.unlogged = 0
        self.guard.forget(self.clock())

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
                self.housekeeping()
            except (OSError, StateError) as exc:
                log.error("spool housekeeping failed: %s", exc)
        if now >= self.next_check:
            self.check_firewall(now)
        if self.metrics.due(now):
            self.write_metrics(now)

    def write_metrics(self, now: float) -> None:
        """Update the gauges and write the metrics files; a failure is logged (once until
        a write works again), never the end of the tick."""
        m = self.metrics
        try:
            m.grants_live = self.engine.store.read().live_total(now)
            m.spool_backlog = len(os.listdir(self._claimed)) + sum(
                1 for n in os.listdir(self._requests) if not n.startswith(".")
            )
            m.throttled_prefixes = self.guard.throttled_prefixes(now)
            m.write(now)
        except (OSError, StateError) as exc:
            if not self.metrics_failing:
                log.error("cannot write metrics: %s", exc)
            self.metrics_failing = True
            m.next_write = now + TICK
            return
        if self.metrics_failing:
            log.info("metrics written again")
        self.metrics_failing = False

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> None:
        from webknock.server.inotify import INotify, flags

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


def _outcome(o: Outcome) -> str:
    """The metrics outcome of an openports the engine decided."""
    if o.ok:
        return "granted"
    return "error" if o.errorcode in ("FIREWALL", "STATE") else "refused"


def build(cfg: ServerConfig) -> tuple[GrantEngine, WebIdentity]:
    """Wire config, state, firewall and event sinks together."""
    web = web_identity(cfg)
    prepare_spool(cfg.spool, web.gid)
    bus = EventBus(log_sink)
    try:
        from webknock.server.notify import sinks_for  # optional: audit trail and notifications
    except ImportError:
        pass
    else:
        for sink in sinks_for(cfg):
            bus.add(sink)
    hooks = hooks_sink(cfg)  # [hooks]: run off the apply path, stopped at exit
    if hooks is not None:
        bus.add(hooks)
    limits = Limits(cfg.max_grants, cfg.max_grants_per_prefix)
    engine = GrantEngine(cfg.instance, StateStore(cfg.state_file), make_firewall(cfg), bus, limits)
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
