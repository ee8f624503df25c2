"""Grant engine: every change to grants goes through here, under the state lock.

Pattern: open a state transaction, compute the change, apply it to the firewall
as one batch, and commit only when the batch held. If the batch fails, one
full sync to the intended state is tried (it repairs a kernel changed behind
our back); if that fails too, the transaction rolls back and the caller is told.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from webknock.events import Event, EventBus
from webknock.firewall import Firewall, FirewallError
from webknock.grants import Address, Entry, Grant, GrantKey
from webknock.spool import GrantRequest
from webknock.state import StateStore, StateTx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one request got: the real expiry, or an error."""

    ok: bool
    expires: int = 0
    ports: tuple[tuple[str, int], ...] = ()
    error: str = ""
    errorcode: str = ""


@dataclass
class Drift:
    """Difference between state and kernel."""

    missing: list[GrantKey] = field(default_factory=list)  # in state, not in kernel
    extra: list[GrantKey] = field(default_factory=list)  # in kernel, not in state
    duplicates: list[GrantKey] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not (self.missing or self.extra or self.duplicates)


class GrantEngine:
    """Opens, renews, expires and revokes grants for one instance."""

    def __init__(
        self, instance: str, store: StateStore, firewall: Firewall, events: EventBus | None = None
    ) -> None:
        self.instance = instance
        self.store = store
        self.firewall = firewall
        self.events = events or EventBus()

    def _commit_batch(
        self,
        tx: StateTx,
        now: float,
        add: Sequence[Entry],
        renew: Sequence[Entry],
        remove: Sequence[GrantKey],
        intended: Iterable[Grant],
    ) -> None:
        try:
            self.firewall.apply(add, renew, remove, now=now)
        except FirewallError as exc:
            log.warning("batch failed (%s); trying a full sync to the intended state", exc)
            self.firewall.sync([g.entry for g in intended if g.expires > now], now=now)

    def open(self, requests: Sequence[GrantRequest], now: float) -> dict[str, Outcome]:
        """Apply a drained spool in one batch; return an outcome per request id."""
        if not requests:
            return {}
        wanted: dict[GrantKey, tuple[float, GrantRequest]] = {}
        for req in requests:
            for proto, port in req.ports:
                key = GrantKey(req.ip, proto, port)
                expires = now + req.time
                if key not in wanted or wanted[key][0] < expires:
                    wanted[key] = (expires, req)
        events: list[Event] = []
        try:
            with self.store.transaction() as tx:
                current = tx.get(wanted)
                add: list[Entry] = []
                renew: list[Entry] = []
                changed: list[Grant] = []
                for key, (expires, req) in wanted.items():
                    old = current.get(key)
                    if old is None or old.expires <= now:
                        grant = Grant(key, now, now, expires, 0)
                        (renew if old is not None else add).append(grant.entry)
                        kind = "open"
                    else:
                        grant = Grant(
                            key,
                            old.first_opened,
                            now,
                            max(old.expires, expires),
                            old.renew_count + 1,
                        )
                        renew.append(grant.entry)
                        kind = "renew"
                    changed.append(grant)
                    events.append(
                        Event.for_key(
                            kind,
                            key,
                            time=now,
                            instance=self.instance,
                            expires=grant.expires,
                            user_agent=req.user_agent,
                        )
                    )
                tx.upsert(changed)
                self._commit_batch(tx, now, add, renew, (), tx.live(now))
        except FirewallError as exc:
            log.error("firewall refused a batch of %d request(s): %s", len(requests), exc)
            return {
                r.id: Outcome(
                    False, error="firewall failed to apply the rule", errorcode="FIREWALL"
                )
                for r in requests
            }
        for ev in events:
            self.events.emit(ev)
        expiry = {g.key: g.expires for g in changed}
        return {
            req.id: Outcome(
                True,
                expires=int(min(expiry[GrantKey(req.ip, p, n)] for p, n in req.ports)),
                ports=req.ports,
            )
            for req in requests
        }

    def _remove(
        self, kind: str, select: str, params: tuple[object, ...], now: float, reason: str = ""
    ) -> list[Grant]:
        with self.store.transaction() as tx:
            gone = tx.select(select, params)
            if not gone:
                return []
            tx.delete(g.key for g in gone)
            self._commit_batch(tx, now, (), (), [g.key for g in gone], tx.live(now))
        for g in gone:
            self.events.emit(
                Event.for_key(
                    kind, g.key, time=now, instance=self.instance, expires=g.expires, reason=reason
                )
            )
        return gone

    def reap(self, now: float) -> list[Grant]:
        """Remove every expired grant from kernel and state in one batch."""
        return self._remove("expire", "expires <= ?", (now,), now)

    def revoke(
        self,
        ip: Address,
        proto: str | None,
        port: int | None,
        now: float,
        reason: str = "revoked by admin",
    ) -> list[Grant]:
        """Remove the grants of `ip` (optionally one proto and/or port) at once."""
        where = "ip = ?"
        params: list[object] = [str(ip)]
        if proto:
            where, params = where + " AND proto = ?", [*params, proto]
        if port:
            where, params = where + " AND port = ?", [*params, port]
        return self._remove("revoke", where, tuple(params), now, reason)

    def reconcile(self, now: float) -> int:
        """Make the kernel hold exactly the live grants of the state file; drop expired ones."""
        with self.store.transaction() as tx:
            expired = tx.expired(now)
            tx.delete(g.key for g in expired)
            live = tx.live(now)
            self.firewall.ensure()
            self.firewall.sync([g.entry for g in live], now=now)
        for g in expired:
            self.events.emit(
                Event.for_key("expire", g.key, time=now, instance=self.instance, expires=g.expires)
            )
        return len(live)

    def drift(self, now: float) -> Drift:
        """Compare the kernel with the live grants of the state file."""
        with self.store.transaction() as tx:
            live = {g.key for g in tx.live(now)}
            listed = self.firewall.listed()
        seen: set[GrantKey] = set()
        drift = Drift()
        for key in listed:
            if key in seen:
                drift.duplicates.append(key)
            seen.add(key)
        drift.missing = sorted(live - seen)
        drift.extra = sorted(seen - live)
        return drift
