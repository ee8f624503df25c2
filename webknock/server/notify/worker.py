"""Deliver events off the apply path: a bounded queue, one thread, batches, retries.

The sink call (``sender(event)``) only puts the event into a queue, so a slow or dead
mail or web server never delays a grant. A background thread collects what arrives
within ``window`` seconds into one batch and hands it to ``deliver``; a failing
delivery is retried ``retries`` times with exponential backoff, then logged and dropped
(the audit trail still has every event).
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from webknock.server.events import Event

log = logging.getLogger("webknock.server.notify")

MAX_QUEUE = 10000
MAX_BACKOFF = 300.0
#: On exit (daemon stop, end of a webknockctl command) pending events get this long
#: (below the 15 s systemd stop timeout).
CLOSE_GRACE = 8.0

Deliver = Callable[[Sequence[Event]], None]


class BackgroundSender:
    """An event sink that delivers accepted events in batches from a worker thread."""

    def __init__(
        self,
        name: str,
        deliver: Deliver,
        *,
        accept: Callable[[Event], bool],
        window: float = 0.0,
        max_batch: int = 500,
        retries: int = 3,
        retry_delay: float = 5.0,
        max_queue: int = MAX_QUEUE,
    ) -> None:
        self.name = name
        self.deliver = deliver
        self.accept = accept
        self.window = window
        self.max_batch = max_batch
        self.retries = retries
        self.retry_delay = retry_delay
        self.queue: queue.Queue[Event] = queue.Queue(max_queue)
        self.closing = threading.Event()
        self.thread: threading.Thread | None = None
        self.lock = threading.Lock()
        self.sent = 0  # batches delivered
        self.failed = 0  # batches given up on
        self.dropped = 0  # events refused by a full queue

    def __call__(self, event: Event) -> None:
        """The sink: never blocks, never raises."""
        if not self.accept(event) or self.closing.is_set():
            return
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.error("%s: queue full, not notifying about %s", self.name, event.describe())
            return
        self._start()

    def _start(self) -> None:
        with self.lock:
            if self.thread is None:
                self.thread = threading.Thread(
                    target=self._run, name=f"webknock-{self.name}", daemon=True
                )
                self.thread.start()
                atexit.register(self.close)

    def _run(self) -> None:
        while True:
            try:
                first = self.queue.get(timeout=0.5)
            except queue.Empty:
                if self.closing.is_set():
                    return
                continue
            batch = [first]
            deadline = time.monotonic() + self.window
            while len(batch) < self.max_batch and not self.closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:  # short waits: close() must not wait for the window
                    batch.append(self.queue.get(timeout=min(left, 0.1)))
                except queue.Empty:
                    continue
            while len(batch) < self.max_batch:  # whatever is already queued goes along
                try:
                    batch.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            self._send(batch)

    def _send(self, batch: list[Event]) -> None:
        attempts = 1 + self.retries
        for attempt in range(1, attempts + 1):
            try:
                self.deliver(batch)
            except Exception as exc:
                last = exc
                if attempt < attempts and not self.closing.is_set():
                    delay = min(self.retry_delay * 2 ** (attempt - 1), MAX_BACKOFF)
                    log.warning(
                        "%s: attempt %d/%d failed (%s); retrying in %.1f s",
                        self.name,
                        attempt,
                        attempts,
                        exc,
                        delay,
                    )
                    self.closing.wait(delay)  # closing: one last try at once, then give up
                    continue
                break
            else:
                self.sent += 1
                return
        self.failed += 1
        what = "; ".join(e.describe() for e in batch[:5]) + (" ..." if len(batch) > 5 else "")
        log.error(
            "%s: gave up after %d attempt(s) (%s): not delivered: %s",
            self.name,
            attempt,
            last,
            what,
        )

    def close(self, timeout: float = CLOSE_GRACE) -> None:
        """Send what is queued now (no batch window, no more backoff), then stop."""
        self.closing.set()
        thread = self.thread
        if thread is not None and thread.is_alive():
            thread.join(timeout)
            if thread.is_alive():
                log.error(
                    "%s: still delivering after %g s at exit; %d more event(s) not sent",
                    self.name,
                    timeout,
                    self.queue.qsize(),
                )
