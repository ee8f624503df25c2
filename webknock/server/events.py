"""Grant events (open, renew, expire, revoke, reject) and where they go.

The engine reports every change as an :class:`Event`; sinks (the log, the audit
trail, notifications) subscribe. A sink never blocks or fails the apply path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from webknock.addresses import Address
from webknock.server.grants import GrantKey

log = logging.getLogger("webknock.server.events")

KINDS = ("open", "renew", "expire", "revoke", "reject")


@dataclass(frozen=True)
class Event:
    """One thing that happened to one grant (or one rejected request).

    `ip`: the address, or the network of a client's ``open_prefix`` (``198.51.100.0/24``);
    then ``extra["peer"]`` of an open or renew is the address the knock came from."""

    kind: str
    time: float
    instance: str
    ip: str
    proto: str = ""
    port: int = 0
    expires: float | None = None
    reason: str = ""
    user_agent: str = ""
    source: str = ""  # what root knows asked for it: knock, admin (never the spool's word)
    client: str | None = None  # v2: the enrolled client's name
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def for_key(
        cls,
        kind: str,
        key: GrantKey,
        *,
        time: float,
        instance: str,
        expires: float | None = None,
        user_agent: str = "",
        reason: str = "",
        source: str = "",
        client: str | None = None,
        peer: Address | None = None,
    ) -> Event:
        return cls(
            kind,
            time,
            instance,
            key.ip_text,
            key.proto,
            key.port,
            expires,
            reason,
            user_agent,
            source,
            client,
            {"peer": str(peer)} if peer is not None else {},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "event": self.kind,
            "time": round(self.time, 3),
            "instance": self.instance,
            "ip": self.ip,
        }
        if self.proto:
            out.update(proto=self.proto, port=self.port)
        if self.expires is not None:
            out["expires"] = int(self.expires)
        if self.reason:
            out["reason"] = self.reason
        if self.source:
            out["source"] = self.source
        if self.client:
            out["client"] = self.client
        if self.user_agent:
            out["user_agent"] = self.user_agent
        out.update(self.extra)
        return out

    def describe(self) -> str:
        what = f"{self.ip} {self.proto}/{self.port}" if self.proto else self.ip
        who = [f"client {self.client}"] if self.client else []
        if self.extra.get("peer"):
            who.append(f"from {self.extra['peer']}")
        if who:
            what += f" ({', '.join(who)})"
        tail = f" until {int(self.expires)}" if self.expires is not None else ""
        why = f": {self.reason}" if self.reason else ""
        return f"{self.kind} {what}{tail}{why}"


Sink = Callable[[Event], None]


def log_sink(event: Event) -> None:
    """One log line per event."""
    level = logging.WARNING if event.kind == "reject" else logging.INFO
    log.log(level, "%s", event.describe())


class EventBus:
    """Fans events out to sinks; a failing sink is logged, never raised."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks: list[Sink] = list(sinks)
        self._held: list[Event] | None = None

    def add(self, sink: Sink) -> None:
        self.sinks.append(sink)

    @contextmanager
    def held(self) -> Iterator[None]:
        """Queue what is emitted inside the block and deliver it, in order, when the block
        ends (also by an exception): the daemon answers the waiting CGIs first, then logs,
        audits and notifies. Nested use delivers at the outermost end."""
        if self._held is not None:
            yield
            return
        self._held = []
        try:
            yield
        finally:
            queued, self._held = self._held, None
            for event in queued:
                self.emit(event)

    def emit(self, event: Event) -> None:
        if self._held is not None:
            self._held.append(event)
            return
        for sink in self.sinks:
            try:
                sink(event)
            except Exception:
                log.exception("event sink %r failed", sink)
