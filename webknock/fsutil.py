"""Atomic file writes with explicit modes (temp file in the same directory + os.replace)."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomic(
    path: str | Path,
    data: bytes,
    mode: int,
    *,
    uid: int = -1,
    gid: int = -1,
    fsync: bool = True,
) -> None:
    """Write `data` to `path` so readers see the old file or the whole new one, never a part.

    The temp file is a dot-file beside the target (readers skip dot-files), created with
    O_EXCL and `mode`, owned by `uid`/`gid` when given, fsynced, then renamed into place.
    """
    # String operations, not pathlib's: this is on the path of every knock, CGI and daemon.
    head, name = os.path.split(os.fspath(path))
    tmp = os.path.join(head, f".{name}.{os.urandom(6).hex()}.tmp")  # not `secrets`: CGI path
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # umask must not weaken or widen what we asked for
        if uid != -1 or gid != -1:
            os.fchown(fd, uid, gid)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quiet(tmp)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quiet(tmp)
        raise


def _unlink_quiet(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
