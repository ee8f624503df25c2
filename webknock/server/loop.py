"""webknockd's loop: wait for requests (inotify), claim them in batches and hand each batch to
the decision path (:mod:`webknock.server.decide`); once a second, a tick that expires grants,
checks the firewall against the state file, writes the metrics and, every PRUNE_EVERY,
keeps the spool clean (:mod:`webknock.spool.housekeeping`). A failing step is logged and
retried; it never ends the loop.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Iterable
from types import FrameType

from webknock.config import ServerConfig
from webknock.fsutil import write_atomic
from webknock.keys import KeysError
from webknock.server.claim import Claimer, spool_backlog
from webknock.server.decide import Decider
from webknock.server.engine import GrantEngine
from webknock.server.firewall import FirewallError
from webknock.server.guard import Guard
from webknock.server.metrics import Metrics, snapshot_path
from webknock.server.refusallog import RefusalLog
from webknock.server.state import StateError
from webknock.server.verify import Verifier
from webknock.spool import SERVER_KEY_NAME
from webknock.spool.housekeeping import SpoolKeeper
from webknock.spool.mount import WebIdentity

log = logging.getLogger("webknockd")

TICK = 1.0
#: The cheap firewall check may use at most 1/CHECK_SHARE of the daemon's time: it runs
#: every TICK unless one check costs more than TICK/CHECK_SHARE (it lists every grant).
#: A knock that arrives during a check waits for it (docs/design.md has the figures).
CHECK_SHARE = 50
#: The spool is pruned, and replay marks and bad-packet counts forgotten, every this
#: many seconds (the shortest lifetime they enforce is a minute).
PRUNE_EVERY = 10.0
#: Every this many seconds the check compares every key, not only counts.
FULL_CHECK = 30.0
#: After a failed check or repair, wait this long before the next attempt.
CHECK_BACKOFF = 5.0


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
        self.clock = clock
        self.verifier = Verifier(cfg)
        self.guard = Guard(
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
        self.claimer = Claimer(self.spool, self.keeper)
        self.refusals = RefusalLog()
        self.metrics = Metrics(cfg.metrics_file, snapshot_path(cfg))
        self.metrics_failing = False  # the last write failed (logged once until it works)
        self.decider = Decider(
            cfg,
            engine,
            self.verifier,
            self.guard,
            metrics=self.metrics,
            keeper=self.keeper,
            refusals=self.refusals,
            allowed_uids=frozenset({0, web.uid}),
            max_wait=self.max_wait,
        )
        self.stopping = False
        self.next_check = 0.0
        self.next_full_check = 0.0
        self.next_prune = 0.0

    def drain(self, names: Iterable[str] | None = None) -> int:
        """Process everything pending as one batch; return how many requests were handled.

        With `names` (from inotify) the first batch is those requests, else requests/ is
        listed. A full batch is followed by the next one at once, from a listing. A
        smaller batch had all there was: what arrives meanwhile wakes the loop again by its
        own event (and the tick drains anyway, from a listing)."""
        handled = 0
        stuck: set[str] = set()  # names that could not be removed: never loop on them
        while True:
            claimed = self.claimer.take(names)
            names = None
            entries = [e for e in claimed if e.name not in stuck]
            if not entries:
                return handled
            stuck.update(e.name for e in entries)
            with self.engine.events.held():  # the answers first, then log, audit, notify
                self.decider.handle(entries, self.clock())
            handled += len(entries)
            if not self.claimer.full(claimed):
                return handled

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
            path.unlink(missing_ok=True)
        else:
            write_atomic(path, want, 0o644, fsync=False)

    def housekeeping(self) -> None:
        """Prune the spool, forget old replay marks and counts, log what was refused quietly,
        publish the server key."""
        self.keeper.prune()
        self.publish_server_key()
        self.refusals.summarise()
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
        self.claimer.rescan = True
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
            m.spool_backlog = spool_backlog(self.spool)
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
        """Wait for requests and ticks until `stop` (a signal) is called."""
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
