"""Owner and mode checks of one path, shared by every ``check-config`` module (a leaf:
it imports nothing of webknock's)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

Problem = tuple[str, str]  # ("error" | "warning", message)


def mode_problems(
    path: Path,
    *,
    uid: int,
    gid: int | None,
    mode: int,
    what: str,
    optional: bool = False,
    wider_is: str = "",
) -> list[Problem]:
    """Owner, group and mode of one path. Anything that lets a user other than root change
    what root reads or writes (wrong owner, a write bit wider than expected, a symlink) is
    an error; a wrong group or a read bit too many is a warning, unless `wider_is` says
    why any bit too many is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [] if optional else [("warning", f"{what} {path} does not exist yet")]
    except OSError as exc:
        return [("error", f"{what} {path}: {exc.strerror}")]
    out: list[Problem] = []
    if stat.S_ISLNK(st.st_mode):
        out.append(("error", f"{what} {path} is a symlink"))
    if st.st_uid != uid:
        out.append(
            (
                "error",
                f"{what} {path} is owned by uid {st.st_uid}, expected {uid}; "
                f"run: chown {uid} {path}",
            )
        )
    if gid is not None and st.st_gid != gid:
        out.append(
            (
                "warning",
                f"{what} {path} has group {st.st_gid}, expected {gid}; run: chgrp {gid} {path}",
            )
        )
    actual = stat.S_IMODE(st.st_mode)
    wider = actual & ~mode
    if wider:
        level = "error" if wider & 0o022 or wider_is else "warning"
        writable = "writable by others than root" if wider & 0o022 else "readable by more users"
        who = wider_is or writable
        out.append(
            (
                level,
                f"{what} {path} has mode {actual:04o}, wider than {mode:04o} ({who}); "
                f"run: chmod {mode:04o} {path}",
            )
        )
    return out
