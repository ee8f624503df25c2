"""Webhook: one JSON POST per event (stdlib urllib, bounded timeout)."""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence

from webknock import __version__
from webknock.server.audit import record
from webknock.server.events import Event
from webknock.server.notify.settings import NotifySettings

log = logging.getLogger("webknock.server.notify")


class Webhook:
    """POSTs each event as ``application/json`` (the audit line of the event); a non-2xx
    answer is a failure.

    Used with batches of one event, so a retry never repeats an accepted POST.
    """

    def __init__(self, settings: NotifySettings) -> None:
        self.url = settings.webhook_url
        self.timeout = settings.webhook_timeout

    def post(self, event: Event) -> None:
        body = json.dumps(record(event), separators=(",", ":")).encode()
        req = urllib.request.Request(  # noqa: S310 - the scheme is checked in settings
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": f"webknock/{__version__}",
            },
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:  # noqa: S310
                status = resp.status
        except urllib.error.HTTPError as exc:
            exc.close()
            raise OSError(f"{self.url} answered {exc.code} {exc.reason}") from None
        except urllib.error.URLError as exc:
            raise OSError(f"{self.url}: {exc.reason}") from None
        if not 200 <= status < 300:
            raise OSError(f"{self.url} answered {status}")

    def __call__(self, events: Sequence[Event]) -> None:
        for ev in events:
            self.post(ev)
