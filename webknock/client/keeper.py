"""Keep grants alive: renew at a third of the granted time, re-knock when our address moves."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from webknock.client.errors import ClientError, ConfigError
from webknock.client.knocker import Grant, Knocker
from webknock.client.profile import format_ports

log = logging.getLogger(__name__)

MAX_BACKOFF = 60.0


def describe(grant: Grant) -> str:
    until = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(grant.expires))
    return f"opened {format_ports(grant.ports)} for {grant.ip} until {until} ({grant.seconds} s)"


class _Labelled(logging.LoggerAdapter):  # type: ignore[type-arg]
    """Prefix every line with `label: ` (none when the label is empty)."""

    def __init__(self, logger: logging.Logger, label: str) -> None:
        super().__init__(logger, {})
        self.label = label

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return (f"{self.label}: {msg}" if self.label else msg), kwargs


@dataclass
class _Track:
    """Per family: the last grant, the local address it was made from, when to knock next."""

    knocker: Knocker
    due: float
    local: str | None = None
    grant: Grant | None = None
    failures: int = 0
    unroutable: bool = False


class Keeper:
    """Renews each knocker's grant until `stop` is set; one status line per event."""

    def __init__(
        self,
        knockers: list[Knocker],
        stop: threading.Event,
        *,
        poll: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        label: str = "",
    ) -> None:
        self.stop, self.poll, self.clock = stop, poll, clock
        self.tracks = [_Track(k, due=clock()) for k in knockers]
        self.log = _Labelled(log, label)  # fan-out: each line names its profile

    def adopt(self, grant: Grant, knocker: Knocker, local: str | None) -> None:
        """Start from a grant made just now (exec knocks before it starts the command)."""
        for track in self.tracks:
            if track.knocker is knocker:
                track.grant, track.local = grant, local
                track.due = self.clock() + self.renew_in(grant)

    @staticmethod
    def renew_in(grant: Grant) -> float:
        return max(1.0, grant.seconds / 3)

    def _knock(self, track: _Track) -> None:
        fam = track.knocker.family
        try:
            grant = track.knocker.knock()
        except ConfigError:
            raise
        except ClientError as exc:
            track.failures += 1
            delay = min(MAX_BACKOFF, 2.0 ** (track.failures - 1))
            if track.grant is not None:
                delay = min(delay, self.renew_in(track.grant))
            track.due = self.clock() + delay
            self.log.warning(
                "[%s] knock failed (%d in a row): %s; retrying in %.0f s",
                fam,
                track.failures,
                exc.message,
                delay,
            )
            return
        if track.failures:
            self.log.info("[%s] knock works again after %d failures", fam, track.failures)
        track.grant, track.failures = grant, 0
        track.due = self.clock() + self.renew_in(grant)
        self.log.info("[%s] %s; next renewal in %.0f s", fam, describe(grant), self.renew_in(grant))

    def step(self) -> float:
        """Check addresses, knock whatever is due; return how long to wait."""
        now = self.clock()
        for track in self.tracks:
            local = track.knocker.transport.local_address()
            if local is None:
                if not track.unroutable:
                    self.log.warning("[%s] no route to the server right now", track.knocker.family)
                track.unroutable = True
            else:
                if track.local is not None and local != track.local:
                    self.log.info(
                        "[%s] local address changed %s -> %s: knocking again now",
                        track.knocker.family,
                        track.local,
                        local,
                    )
                    track.due, track.failures = now, 0
                track.local, track.unroutable = local, False
            if self.clock() >= track.due:
                self._knock(track)
        wait = min(t.due for t in self.tracks) - self.clock()
        return max(0.0, min(wait, self.poll))

    def run(self, *, quiet: bool = False) -> None:
        """Loop until `stop` is set (SIGTERM/SIGINT, or the end of the exec'd command);
        say so unless `quiet` (exec: the command's end says it)."""
        while not self.stop.is_set():
            self.stop.wait(self.step())
        if not quiet:
            self.log.info("stopped")
