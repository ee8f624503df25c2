"""Claiming spool requests: webknockd renames each into ``claimed/``, out of the web user's
reach, before it reads a byte of it; a batch is at most MAX_BATCH requests.

Only names of requests are claimed: whatever else the web user plants in ``requests/`` is the
housekeeping's (:mod:`webknock.spool.housekeeping`), and never takes a valid request's place
in a batch.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

from webknock.config import SpoolPaths
from webknock.spool.housekeeping import SpoolKeeper
from webknock.spool.reader import request_name_id

log = logging.getLogger("webknockd")

MAX_BATCH = 5000


class Claimed(NamedTuple):
    """A spool entry the daemon has taken out of the web user's reach (claimed/)."""

    name: str
    path: str
    arrived: float  # its ctime before the claim: when the CGI put it there, or later
    inode: int
    leftover: bool = False  # found in claimed/ after a crash: it may have burnt its mark


class Claimer:
    """Takes requests out of ``requests/``; after `rescan` is set, also hands back what is
    left in ``claimed/`` (a crash's leftovers)."""

    def __init__(self, spool: SpoolPaths, keeper: SpoolKeeper) -> None:
        self.keeper = keeper
        self.rescan = True  # look for claimed/ leftovers at start (the tick sets it again)
        self._requests = str(spool.requests)
        self._claimed = str(spool.claimed)

    def take(self, names: Iterable[str] | None = None) -> list[Claimed]:
        """Claim up to MAX_BATCH new requests (rename into claimed/); return what is claimed:
        those, or after a `rescan` everything in claimed/ (leftovers of a crash included).

        `names` are what inotify reported arriving; without them requests/ is listed."""
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
        return self._with_leftovers(taken)

    def _with_leftovers(self, taken: list[Claimed]) -> list[Claimed]:
        """Everything in claimed/, up to MAX_BATCH: `taken` as it is, the rest as leftovers."""
        # What was just claimed is fresh, not a leftover: the web user may name a copy of
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

    @staticmethod
    def full(batch: list[Claimed]) -> bool:
        """Whether `batch` took as many as a batch holds (more may be waiting)."""
        return len(batch) >= MAX_BATCH


def spool_backlog(spool: SpoolPaths) -> int:
    """Requests waiting in the spool: claimed ones and those not yet claimed (a CGI's dot
    temp file is not one yet); raises OSError."""
    return len(os.listdir(spool.claimed)) + sum(
        1 for n in os.listdir(spool.requests) if not n.startswith(".")
    )
