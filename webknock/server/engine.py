"""Grant engine: every change to grants goes through here, under the state lock.

Pattern: open a state transaction, compute the change, apply it to the firewall
as one batch, and commit only when the batch held. If the batch fails, one
full sync to the intended state is tried (it repairs a kernel changed behind
our back); if that fails too, the transaction rolls back and the caller is told.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

from webknock.addresses import Address, Network, prefix_of
from webknock.server.events import Event, EventBus
from webknock.server.firewall import Firewall, FirewallError
from webknock.server.grants import Entry, Grant, GrantKey, GrantRequest
from webknock.server.state import StateError, StateStore, StateTx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What one request got: the real expiry, or an error."""

    ok: bool
    expires: int = 0
    ports: tuple[tuple[str, int], ...] = ()
    error: str = ""
    errorcode: str = ""


@dataclass(frozen=True)
class Limits:
    """Live grants no one may exceed: per instance and per address prefix
    (:func:`webknock.addresses.prefix_of`)."""

    total: int = 10000
    per_prefix: int = 256


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
        self,
        instance: str,
        store: StateStore,
        firewall: Firewall,
        events: EventBus | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.instance = instance
        self.store = store
        self.firewall = firewall
        self.events = events or EventBus()
        self.limits = limits or Limits()

    def _commit_batch(
        self,
        tx: StateTx,
        now: float,
        add: Sequence[Entry],
        renew: Sequence[Entry],
        remove: Sequence[GrantKey],
        intended: Callable[[], Iterable[Grant]],
    ) -> None:
        """`intended` is read only when the batch fails: at 10 000 grants, reading every live
        grant costs more than the whole batch, so the usual path must not pay for it."""
        try:
            self.firewall.apply(add, renew, remove, now=now)
        except FirewallError as exc:
            log.warning("batch failed (%s); trying a full sync to the intended state", exc)
            self.firewall.sync([g.entry for g in intended() if g.expires > now], now=now)

    def open(self, requests: Sequence[GrantRequest], now: float) -> dict[str, Outcome]:
        """Apply a batch of requests in one firewall batch; return an outcome per request id.

        A request that would take the instance or its address prefix past the limits is
        refused alone (LIMIT); the others go ahead."""
        if not requests:
            return {}
        outcomes: dict[str, Outcome] = {}
        events: list[Event] = []
        changed: list[Grant] = []
        added: list[Entry] = []  # what the kernel got, for an undo if the commit fails
        try:
            # The lock is re-entrant: held across the commit and, if the state file refuses
            # it, across taking the new kernel entries back out.
            with (
                self.store.locked(),
                self._undo_on_state_error(now, added, ()),
                self.store.transaction() as tx,
            ):
                current = tx.get({r.key(p, n) for r in requests for p, n in r.ports})
                admitted = self._within_limits(tx, requests, current, now, outcomes)
                wanted: dict[GrantKey, tuple[float, GrantRequest]] = {}
                for req in admitted:
                    for proto, port in req.ports:
                        key = req.key(proto, port)
                        expires = now + req.time
                        if key not in wanted or wanted[key][0] < expires:
                            wanted[key] = (expires, req)
                add: list[Entry] = []
                renew: list[Entry] = []
                for key, (expires, req) in wanted.items():
                    old = current.get(key)
                    if old is None or old.expires <= now:
                        grant = Grant(key, now, now, expires, 0, req.client)
                        (renew if old is not None else add).append(grant.entry)
                        kind = "open"
                    else:
                        grant = Grant(
                            key,
                            old.first_opened,
                            now,
                            max(old.expires, expires),
                            old.renew_count + 1,
                            req.client,
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
                            source=req.source,
                            client=req.client,
                            peer=req.ip if key.prefixlen is not None else None,
                        )
                    )
                if changed:
                    tx.upsert(changed)
                    self._commit_batch(tx, now, add, renew, (), lambda: tx.live(now))
                    added += add
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
        for req in admitted:
            outcomes[req.id] = Outcome(
                True,
                expires=int(min(expiry[req.key(p, n)] for p, n in req.ports)),
                ports=req.ports,
            )
        return outcomes

    def _within_limits(
        self,
        tx: StateTx,
        requests: Sequence[GrantRequest],
        current: dict[GrantKey, Grant],
        now: float,
        refused: dict[str, Outcome],
    ) -> list[GrantRequest]:
        """The requests that fit the limits, in order; the others get a LIMIT outcome in
        `refused`. Renewals never count; the counts are read only when something is new.
        A network grant (``open_prefix``) counts as one grant of its prefix (the wider of
        the network and the usual prefix: :func:`prefix_of`)."""
        admitted: list[GrantRequest] = []
        counted: set[GrantKey] = set()
        total: int | None = None
        per_prefix: dict[str, int] = {}
        for req in requests:
            new = {
                key
                for key in (req.key(p, n) for p, n in req.ports)
                if key not in counted and (key not in current or current[key].expires <= now)
            }
            if new:
                if total is None:
                    total = tx.live_total(now)
                prefix = prefix_of(req.ip, req.prefixlen)
                if prefix not in per_prefix:
                    per_prefix[prefix] = tx.live_in_prefix(prefix, now)
                if total + len(new) > self.limits.total:
                    why = f"this server holds its limit of {self.limits.total} grants"
                elif per_prefix[prefix] + len(new) > self.limits.per_prefix:
                    why = f"{prefix} holds its limit of {self.limits.per_prefix} grants"
                else:
                    why = ""
                if why:
                    log.warning("refused %s: %s", req.opened, why)
                    refused[req.id] = Outcome(False, error=why, errorcode="LIMIT")
                    continue
                total += len(new)
                per_prefix[prefix] += len(new)
                counted |= new
            admitted.append(req)
        return admitted

    @contextmanager
    def _undo_on_state_error(
        self, now: float, added: Sequence[Entry], removed: Sequence[Grant]
    ) -> Iterator[None]:
        """If the state file refuses the commit (full disk, read-only) after the kernel batch
        went in, put the kernel back as the state file still has it: take `added` out, put the
        still-live grants of `removed` back (expired ones stay out). Best effort: the daemon's
        periodic check repairs what this cannot. The caller fills the lists inside the block
        once the kernel batch went in; they are read only on failure."""
        try:
            yield
        except StateError:
            readd = [g.entry for g in removed if g.expires > now]
            if added or readd:
                try:
                    self.firewall.apply(readd, (), [e.key for e in added], now=now)
                except FirewallError as exc:
                    log.error("cannot undo a batch the state file refused: %s", exc)
            raise

    def _remove(
        self,
        kind: str,
        select: str,
        params: tuple[object, ...],
        now: float,
        reason: str = "",
        keep: Callable[[Grant], bool] | None = None,
    ) -> list[Grant]:
        """Remove the grants `select` finds (and `keep` keeps, when given). A revoke is a
        durable commit: it must not come back after a power loss (an expiry that does is
        simply repeated)."""
        removed: list[Grant] = []  # what the kernel lost, for an undo if the commit fails
        with (
            self.store.locked(),
            self._undo_on_state_error(now, (), removed),
            self.store.transaction(durable=kind == "revoke") as tx,
        ):
            gone = tx.select(select, params)
            if keep is not None:
                gone = [g for g in gone if keep(g)]
            if not gone:
                return []
            tx.delete(g.key for g in gone)
            self._commit_batch(tx, now, (), (), [g.key for g in gone], lambda: tx.live(now))
            removed += gone
        for g in gone:
            self.events.emit(
                Event.for_key(
                    kind,
                    g.key,
                    time=now,
                    instance=self.instance,
                    expires=g.expires,
                    reason=reason,
                    client=g.client,
                )
            )
        return gone

    def reap(self, now: float) -> list[Grant]:
        """Remove every expired grant from kernel and state in one batch."""
        return self._remove("expire", "expires <= ?", (now,), now)

    def revoke(
        self,
        ip: Address | Network,
        proto: str | None,
        port: int | None,
        now: float,
        reason: str = "revoked by admin",
    ) -> list[Grant]:
        """Remove at once every grant that lets some address of `ip` in (optionally of one
        proto and/or port): for an address, its own grants and the network grants
        (``open_prefix``) that contain it; for a network, every grant of an address in it
        and every network grant overlapping it. Afterwards no address of `ip` is let in."""
        net = ipaddress.ip_network(ip)
        where = "1"
        params: list[object] = []
        if net.num_addresses == 1:  # its own row, or a network's (the text has a '/')
            where = "(ip = ? OR instr(ip, '/') > 0)"
            params.append(str(net.network_address))
        if proto:
            where, params = where + " AND proto = ?", [*params, proto]
        if port:
            where, params = where + " AND port = ?", [*params, port]
        return self._remove(
            "revoke", where, tuple(params), now, reason, lambda g: g.key.overlaps(net)
        )

    def revoke_client(
        self, client: str, now: float, reason: str = "client revoked by admin"
    ) -> list[Grant]:
        """Remove every grant the enrolled client `client` opened or renewed last."""
        return self._remove("revoke", "client = ?", (client,), now, reason)

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
                Event.for_key(
                    "expire",
                    g.key,
                    time=now,
                    instance=self.instance,
                    expires=g.expires,
                    client=g.client,
                )
            )
        return len(live)

    def drift(self, now: float) -> Drift:
        """Compare the kernel with the state file, key by key.

        Missing: live in the state file, not in the kernel. Extra: in the kernel but not in
        the state file at all (an expired grant the reaper has not removed yet is neither).
        """
        with self.store.transaction() as tx:
            grants = tx.all()
            listed = self.firewall.listed()
        live = {g.key for g in grants if g.expires > now}
        known = {g.key for g in grants}
        seen: set[GrantKey] = set()
        drift = Drift()
        for key in listed:
            if key in seen:
                drift.duplicates.append(key)
            seen.add(key)
        drift.missing = sorted(live - seen)
        drift.extra = sorted(seen - known)
        return drift

    def check(self, now: float, *, full: bool = False) -> str | None:
        """Has the kernel lost or gained anything behind our back? What, or None.

        The cheap test (for the daemon, about once a second) counts per address family:
        the kernel must hold at least the live grants and at most all grants of the state
        file (expired ones stay until reaped), and the backend's own objects (chains, hook)
        must be there. `full` also compares every key (:meth:`drift`). Runs under the state
        lock, so a concurrent webknockctl or reaper never looks like drift.
        """
        with self.store.transaction() as tx:
            counts = tx.counts(now)
            held, problems = census(self.firewall)
        for family in (4, 6):
            live, total = counts[family]
            if not live <= held.get(family, 0) <= total:
                problems.append(
                    f"IPv{family}: kernel holds {held.get(family, 0)} grant(s), state file "
                    f"{live} live of {total}"
                )
        if not problems and full:
            drift = self.drift(now)
            if not drift.clean:
                problems.append(
                    f"{len(drift.missing)} missing, {len(drift.extra)} extra, "
                    f"{len(drift.duplicates)} duplicate grant(s)"
                )
        return "; ".join(problems) or None


def census(firewall: Firewall) -> tuple[dict[int, int], list[str]]:
    """Grants the kernel holds per family, and what is wrong with the backend's objects
    (each backend counts in its own cheapest way: :meth:`Firewall.census`)."""
    return firewall.census()
