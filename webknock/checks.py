"""Installation checks for ``webknockctl check-config``: files, owners, modes, backend."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from webknock.config import ConfigError, ServerConfig
from webknock.keys import KeysError, load_keys

Problem = tuple[str, str]  # ("error" | "warning", message)


def _mode_problems(path: Path, *, uid: int, gid: int | None, mode: int, what: str) -> list[Problem]:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [("warning", f"{what} {path} does not exist yet")]
    except OSError as exc:
        return [("error", f"{what} {path}: {exc.strerror}")]
    out: list[Problem] = []
    if stat.S_ISLNK(st.st_mode):
        out.append(("error", f"{what} {path} is a symlink"))
    if st.st_uid != uid:
        out.append(("warning", f"{what} {path} is owned by uid {st.st_uid}, expected {uid}"))
    if gid is not None and st.st_gid != gid:
        out.append(("warning", f"{what} {path} has group {st.st_gid}, expected {gid}"))
    actual = stat.S_IMODE(st.st_mode)
    if actual & ~mode:
        out.append(
            (
                "warning",
                f"{what} {path} has mode {actual:04o}, wider than {mode:04o}; "
                f"run: chmod {mode:04o} {path}",
            )
        )
    return out


def check_installation(cfg: ServerConfig) -> list[Problem]:
    """Everything an admin should fix, most serious first."""
    from webknock.firewall import FirewallError, make_firewall
    from webknock.spooldirs import layout, web_identity

    problems: list[Problem] = []
    try:
        web = web_identity(cfg)
    except ConfigError as exc:
        return [("error", str(exc))]
    try:
        load_keys(cfg.keys_file)
    except KeysError as exc:
        problems.append(("error", str(exc)))
    problems += _mode_problems(cfg.keys_file, uid=0, gid=web.gid, mode=0o640, what="keys file")
    problems += _mode_problems(cfg.source, uid=0, gid=None, mode=0o644, what="config file")
    for path, uid, gid, mode in layout(cfg.spool, web.gid):
        problems += _mode_problems(path, uid=uid, gid=gid, mode=mode, what="spool directory")
    problems += _mode_problems(cfg.state_file, uid=0, gid=None, mode=0o600, what="state file")
    problems += _mode_problems(
        cfg.state_file.parent, uid=0, gid=None, mode=0o755, what="state directory"
    )
    if os.geteuid() == 0:
        try:
            make_firewall(cfg)
        except FirewallError as exc:
            problems.append(("error", str(exc)))
    problems.sort(key=lambda p: p[0] != "error")
    return problems
