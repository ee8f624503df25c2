"""The refusal log's rate limit: anyone can send bad packets, and the web user can forge any
number of spool files, so refusals are logged one by one only up to REFUSAL_LINES per
housekeeping round, then counted and summarised in one line each round."""

from __future__ import annotations

import logging

log = logging.getLogger("webknockd")

#: At most this many refusals are logged one by one per housekeeping round.
REFUSAL_LINES = 100


class RefusalLog:
    """Counts what was refused since the last `summarise`."""

    def __init__(self) -> None:
        self.malformed = 0  # malformed spool files (one line per round, never one each)
        self.lines = 0  # refusals logged one by one
        self.unlogged = 0  # refusals past REFUSAL_LINES

    def refused(self, message: str, *args: object) -> None:
        """Log one refusal (`message` % `args`) while this round's lines last, else count it."""
        if self.lines < REFUSAL_LINES:
            self.lines += 1
            log.info(message, *args)
        else:
            self.unlogged += 1

    def summarise(self) -> None:
        """Log what was counted instead of logged, and start a new round."""
        if self.malformed:
            log.warning("refused %d malformed spool file(s)", self.malformed)
            self.malformed = 0
        if self.unlogged:
            log.warning("refused %d more request(s), not logged one by one", self.unlogged)
        self.lines = self.unlogged = 0
