"""Create and repair the spool with its owners and modes, on a tmpfs of its own (root only).

The web user can write into the spool, so the spool is bounded: :func:`mount_spool`
gives it a tmpfs of MOUNT_SIZE bytes and MOUNT_INODES entries, so a hostile web user can
fill the spool but not ``/run`` for the rest of the host. Mounting needs CAP_SYS_ADMIN,
which webknockd does not keep: the unit mounts before it starts it
(``webknockctl prepare-spool``), and so do the installer and the test lab.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path

from webknock.config import ConfigError, ServerConfig, SpoolPaths

log = logging.getLogger(__name__)

#: The spool's own tmpfs: room for thousands of knocks in flight (a request is at most
#: a few KiB), not for filling the host's memory.
MOUNT_SIZE = "16m"
MOUNT_INODES = 16384


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
        (paths.waits, 0, gid, 0o1730),
    ]


#: Directories earlier versions made and this one no longer uses: results/ (the daemon
#: hands each answer through the CGI's doorbell), seen/ (replay marks and bad-packet
#: counts are root's, in the state file).
RETIRED = ("results", "seen")


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


def mount_spool(paths: SpoolPaths, gid: int) -> bool:
    """Mount a size- and inode-bounded tmpfs on the spool's root unless one is there; True
    if the spool is now on its own mount. Needs CAP_SYS_ADMIN; without it (or without
    mount(8)) logs why and returns False."""
    root = paths.root
    root.mkdir(mode=0o750, parents=True, exist_ok=True)
    if os.path.ismount(root):
        return True
    options = f"size={MOUNT_SIZE},nr_inodes={MOUNT_INODES},mode=0750,uid=0,gid={gid}"
    argv = ["mount", "-t", "tmpfs", "-o", f"{options},nosuid,nodev,noexec"]
    try:
        proc = subprocess.run(
            [*argv, "webknock-spool", str(root)], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        log.warning("cannot mount a tmpfs on the spool %s: %s", root, exc)
        return False
    if proc.returncode != 0:
        log.warning("cannot mount a tmpfs on the spool %s: %s", root, proc.stderr.strip())
        return False
    return True


def unmount_spool(paths: SpoolPaths) -> None:
    """Unmount the spool's tmpfs, if it has one (uninstall, the test lab)."""
    if os.path.ismount(paths.root):
        subprocess.run(["umount", "-l", str(paths.root)], check=False, capture_output=True)
