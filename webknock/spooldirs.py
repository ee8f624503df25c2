"""Create and repair the spool directories with their owners and modes (root only)."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

from webknock.config import ConfigError, ServerConfig, SpoolPaths


@dataclass(frozen=True)
class WebIdentity:
    """The web user the CGI runs as."""

    user: str
    uid: int
    gid: int


def web_identity(cfg: ServerConfig) -> WebIdentity:
    try:
        pw = pwd.getpwnam(cfg.web_user)
    except KeyError:
        raise ConfigError(
            f"{cfg.source}: [server] web_user: no such user {cfg.web_user!r}"
        ) from None
    return WebIdentity(cfg.web_user, pw.pw_uid, pw.pw_gid)


def layout(paths: SpoolPaths, gid: int) -> list[tuple[Path, int, int, int]]:
    """(path, uid, gid, mode) of every spool directory."""
    return [
        (paths.root, 0, gid, 0o750),
        (paths.requests, 0, gid, 0o1730),
        (paths.claimed, 0, 0, 0o700),
        (paths.rejected, 0, 0, 0o700),
        (paths.seen, 0, gid, 0o1730),
        (paths.waits, 0, gid, 0o1730),
    ]


#: Directories earlier versions made and this one no longer uses (results/: the daemon
#: now hands each result through the CGI's doorbell).
RETIRED = ("results",)


def prepare_spool(paths: SpoolPaths, gid: int) -> None:
    """Create missing directories and fix owner/mode of existing ones (never follow links);
    remove the retired ones."""
    paths.root.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    for name in RETIRED:
        try:
            st = os.lstat(paths.root / name)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(paths.root / name)  # fd-based: never follows a link planted inside
    for path, uid, group, mode in layout(paths, gid):
        try:
            os.mkdir(path, mode)
        except FileExistsError:
            pass
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            raise OSError(f"{path} exists and is not a directory")
        if (st.st_uid, st.st_gid) != (uid, group):
            os.lchown(path, uid, group)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)
