"""Housekeeping of the spool (root): whatever the web user leaves or plants there goes,
without a log line per tick and without slowing the decision path.

The web user can create anything in ``requests/`` and ``waits/``: files of any size,
names and times, FIFOs, links, directories it makes unremovable for a root without
CAP_DAC_OVERRIDE (mode 0500 with a file inside). :func:`remove_entry` removes all of
it: a directory is first given to root (CAP_CHOWN) and opened up, through descriptors
that never follow a link. What still cannot be removed is logged once and skipped.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

from webknock.config import SpoolPaths
from webknock.spool import MAX_REQUEST_BYTES, TEMP_SUFFIX
from webknock.spool.reader import REQUEST_ID, request_name_id

log = logging.getLogger("webknockd")

#: A temp file older than this was abandoned by its CGI.
TMP_TTL = 60.0
#: An entry whose time lies further ahead than this was dated by hand: it goes at once.
FUTURE_SLACK = 60.0
#: rejected/ keeps at most this many refused requests for the admin.
KEEP_REJECTED = 1000
#: Deepest directory tree :func:`remove_entry` walks (the web user can nest them).
MAX_DEPTH = 64
#: At most this many entries the housekeeping could not remove are remembered (logged once).
MAX_STUCK = 10000

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def remove_entry(parent: str, name: str) -> None:
    """Remove ``parent/name`` whatever it is; directories are given to root and emptied
    first. Raises OSError when something in it cannot be removed."""
    pfd = os.open(parent, _DIR_FLAGS)
    try:
        _remove_at(pfd, name, 0)
    finally:
        os.close(pfd)


def _remove_at(dir_fd: int, name: str, depth: int) -> None:
    st = os.lstat(name, dir_fd=dir_fd)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return
    if depth >= MAX_DEPTH:
        raise OSError(f"directory tree deeper than {MAX_DEPTH}")
    fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    try:
        if (os.fstat(fd).st_uid, os.fstat(fd).st_gid) != (0, 0):
            os.fchown(fd, 0, 0)  # now nobody but root may change it (CAP_CHOWN)
        os.fchmod(fd, 0o700)  # root owns it: its mode is root's to set
        for child in os.listdir(fd):
            _remove_at(fd, child, depth + 1)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dir_fd)


class SpoolKeeper:
    """Prunes one instance's spool and sets refused requests aside."""

    def __init__(
        self,
        paths: SpoolPaths,
        bell_ttl: float,
        clock: Callable[[], float],
    ) -> None:
        self.paths = paths
        self.bell_ttl = bell_ttl
        self.clock = clock
        self._stuck: set[tuple[str, int]] = set()  # (directory, inode) logged once already

    def set_aside(self, path: Path, name: str) -> None:
        """Move a refused request into rejected/ (root only) under a name of its own; only a
        small regular file is kept for the admin, anything else is removed."""
        target = self.paths.rejected / f"{name[:80]}.{int(self.clock())}.{os.urandom(4).hex()}"
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("cannot look at spool entry %r: %s", name[:80], exc.strerror)
            return
        keep = stat.S_ISREG(st.st_mode) and st.st_size <= MAX_REQUEST_BYTES
        if keep:
            try:
                os.rename(path, target)
                return
            except OSError:
                pass  # removed in place below
        self.remove(str(path.parent), path.name, st.st_ino)

    def is_stuck(self, parent: str, inode: int) -> bool:
        """Whether the entry could not be removed before (and was logged then)."""
        return (parent, inode) in self._stuck

    def remove(self, parent: str, name: str, inode: int) -> bool:
        """Remove an entry; one that cannot be is logged the first time only."""
        try:
            remove_entry(parent, name)
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            key = (parent, inode)
            if key not in self._stuck:
                if len(self._stuck) >= MAX_STUCK:
                    self._stuck.clear()
                self._stuck.add(key)
                log.error(
                    "cannot remove spool entry %s/%r: %s (skipped from now on)",
                    parent,
                    name[:80],
                    exc,
                )
            return False

    def prune(self) -> None:
        """Remove abandoned temp files and doorbells, anything of an unexpected name or
        kind, entries dated in the future, and all but the newest KEEP_REJECTED rejects."""
        now = self.clock()
        planted = 0
        planted += self._prune_dir(str(self.paths.requests), now, self._request_entry)
        planted += self._prune_dir(str(self.paths.waits), now, self._bell_entry)
        if planted:
            log.warning(
                "removed %d unexpected spool entr%s", planted, "y" if planted == 1 else "ies"
            )
        self._prune_rejected()

    def _request_entry(self, name: str, st: os.stat_result) -> float | None:
        """How long an entry of requests/ may stay (None: unexpected, goes at once)."""
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_REQUEST_BYTES:
            return None
        if name.startswith(".") and name.endswith(TEMP_SUFFIX):
            return TMP_TTL if REQUEST_ID.fullmatch(name[1 : -len(TEMP_SUFFIX)]) else None
        if request_name_id(name) is not None:
            return TMP_TTL  # claimed by the next drain; one left this long is stuck
        return None

    def _bell_entry(self, name: str, st: os.stat_result) -> float | None:
        if not stat.S_ISFIFO(st.st_mode) or not REQUEST_ID.fullmatch(name):
            return None
        return self.bell_ttl

    def _prune_dir(
        self, directory: str, now: float, lifetime: Callable[[str, os.stat_result], float | None]
    ) -> int:
        planted = 0
        with os.scandir(directory) as it:
            entries = list(it)
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            if (directory, st.st_ino) in self._stuck:
                continue
            ttl = lifetime(e.name, st)
            age = now - st.st_mtime
            if ttl is not None and -FUTURE_SLACK <= age <= ttl:
                continue
            if self.remove(directory, e.name, st.st_ino) and ttl is None:
                planted += 1  # what could not be removed has a log line of its own
        return planted

    def _prune_rejected(self) -> None:
        rejected: list[tuple[float, str]] = []
        with os.scandir(self.paths.rejected) as it:
            for e in it:
                try:
                    rejected.append((e.stat(follow_symlinks=False).st_mtime, e.name))
                except OSError:
                    continue
        rejected.sort()
        for _, name in rejected[:-KEEP_REJECTED]:
            self.remove(str(self.paths.rejected), name, 0)
