"""webknockd's replay cache and bad-packet throttle, kept in the state file (root only).

A replay mark names the authenticated content of a packet that passed its time and
address checks (v1: its HMAC; v2: key id and nonce); it lives as long as a copy of the
packet could still pass them. Bad packets (that do not verify, or replays) are counted
per address prefix (:func:`webknock.addresses.prefix_of`); a prefix over the limit is
throttled: its bad packets get 429 and no log line each. A packet that verifies is never
throttled and never counted, so junk sent from a shared NAT address does not lock out
the valid clients behind it. Both survive a restart of the daemon: the counts are read
back at start, the marks are looked up in the file.
"""

from __future__ import annotations

import logging

from webknock.addresses import Address, prefix_of
from webknock.server.state import StateStore

log = logging.getLogger(__name__)

#: At most this many prefixes are counted; the oldest counts go first.
MAX_COUNTED = 20000


class Guard:
    """Replay marks and bad-packet counts of one instance."""

    def __init__(self, store: StateStore, ts_window: int, limit: int, window: int) -> None:
        self.store = store
        self.mark_ttl = 2 * ts_window + 5
        self.limit, self.window = limit, window
        self.counts: dict[str, tuple[int, float]] = {}
        self._dirty: set[str] = set()
        self.suppressed: dict[str, int] = {}  # throttled refusals not logged one by one

    def load(self, now: float) -> None:
        """Read back the counts a previous daemon left (those still inside their window)."""
        with self.store.transaction() as tx:
            rows = tx.load_failures(now - self.window)
        self.counts = {prefix: (count, last) for prefix, count, last in rows}

    def throttled(self, addr: Address, now: float) -> bool:
        count, last = self.counts.get(prefix_of(addr), (0, 0.0))
        return count >= self.limit and now - last < self.window

    def throttled_prefixes(self, now: float) -> int:
        """How many prefixes are throttled now (for the daemon's metrics)."""
        return sum(
            count >= self.limit and now - last < self.window for count, last in self.counts.values()
        )

    def failed(self, addr: Address, now: float) -> None:
        """Count one bad packet from `addr` (saved with the next :meth:`commit`)."""
        prefix = prefix_of(addr)
        count, last = self.counts.get(prefix, (0, 0.0))
        count = count if now - last < self.window else 0
        self.counts[prefix] = (min(count + 1, self.limit + 1), now)
        self._dirty.add(prefix)

    def commit(
        self, marks: list[tuple[bytes, str]], now: float, retries: frozenset[str] = frozenset()
    ) -> list[bool]:
        """Burn `marks` (mark, request id) and save the counts, in one transaction; per mark,
        True if it was new, or burnt by the same request and that request is one of
        `retries` (a leftover of a crash that root took back from claimed/, which the web
        user cannot write). Raises StateError: then nothing is recorded, and nothing may be
        accepted."""
        dirty = [(p, *self.counts[p]) for p in self._dirty if p in self.counts]
        if not marks and not dirty:
            return []
        with self.store.transaction() as tx:
            burnt = tx.burn(marks, now + self.mark_ttl) if marks else []
            if dirty:
                tx.save_failures(dirty)
        self._dirty.clear()
        return [
            new or (by == request and request in retries)
            for (_, request), (new, by) in zip(marks, burnt, strict=True)
        ]

    def forget(self, now: float) -> None:
        """Drop expired marks and counts (the daemon's housekeeping, every few seconds)."""
        stale = [p for p, (_, last) in self.counts.items() if now - last >= self.window]
        for prefix in stale:
            del self.counts[prefix]
        if len(self.counts) > MAX_COUNTED:
            newest = sorted(self.counts.items(), key=lambda kv: kv[1][1])[-MAX_COUNTED:]
            self.counts = dict(newest)
        for prefix, count in sorted(self.suppressed.items()):
            log.warning("throttled %s: %d more bad packet(s) refused with 429", prefix, count)
        self.suppressed.clear()
        with self.store.transaction() as tx:
            tx.forget(now, now - self.window, MAX_COUNTED)
