"""Installation checks for ``webknockctl check-config``: files, owners, modes, backend."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from webknock.config import STATE_FILE_SUFFIXES, ConfigError, ServerConfig
from webknock.filemodes import Problem, mode_problems
from webknock.keys import KeysError, load_keys, load_server_key
from webknock.server.clients import SUFFIX, load_clients
from webknock.server.hooks import hook_problems


def _v2_on(cfg: ServerConfig) -> bool:
    """Protocol v2 is spoken iff the server key file is there."""
    return os.path.lexists(cfg.server_key_file)


def _key_file_problems(
    path: Path, load: Callable[[Path], object], what: str, why: str
) -> list[Problem]:
    """A key file that must load and be root's alone (0600): `why` says what a wider mode
    would give away."""
    problems: list[Problem] = []
    try:
        load(path)
    except KeysError as exc:
        problems.append(("error", str(exc)))
    return problems + mode_problems(path, uid=0, gid=None, mode=0o600, what=what, wider_is=why)


def _v2_problems(cfg: ServerConfig) -> list[Problem]:
    """The server key, the clients directory and every client file; and that some
    protocol is on at all."""
    problems: list[Problem] = []
    if _v2_on(cfg):
        problems += _key_file_problems(
            cfg.server_key_file,
            load_server_key,
            "server key",
            "whoever can read it can sign replies as this server; only webknockd needs it",
        )
    elif cfg.keys_file is None:
        problems.append(
            (
                "error",
                f"{cfg.source}: no protocol enabled: neither [server] keys_file (v1) nor a "
                f"server key {cfg.server_key_file} (v2; webknockctl client add makes it)",
            )
        )
    directory = cfg.clients_dir
    clients, load_problems = load_clients(directory)
    problems += [("error", str(p)) for p in load_problems]
    names: list[str] = []
    if os.path.lexists(directory):
        # Whoever can change a client file or the directory can enrol a key of their own.
        problems += mode_problems(directory, uid=0, gid=None, mode=0o755, what="clients directory")
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            pass  # load_clients said why
    for name in names:
        path = directory / name
        if name.startswith(".") or not name.endswith(SUFFIX):
            problems.append(
                (
                    "warning",
                    f"{path}: ignored by webknockd (only NAME{SUFFIX} files are clients)",
                )
            )
        else:
            problems += mode_problems(path, uid=0, gid=None, mode=0o644, what="client file")
    if _v2_on(cfg) and cfg.keys_file is None and not clients:
        problems.append(("warning", f"no usable client in {directory}: nobody can knock"))
    return problems


def check_installation(cfg: ServerConfig) -> list[Problem]:
    """Everything an admin should fix, most serious first."""
    from webknock.server.firewall import FirewallError, forward_choice, make_firewall
    from webknock.spool.mount import layout, web_identity

    problems: list[Problem] = []
    try:
        web = web_identity(cfg)
    except ConfigError as exc:
        return [("error", str(exc))]
    if web.uid == 0:
        problems.append(
            ("error", f"{cfg.source}: [server] web_user {web.user} is root: no privilege boundary")
        )
    if cfg.keys_file is not None:  # protocol v1
        problems += _key_file_problems(
            cfg.keys_file,
            load_keys,
            "keys file",
            "whoever can read the keys can open the firewall; only webknockd needs them",
        )
    problems += _v2_problems(cfg)
    problems += mode_problems(cfg.source, uid=0, gid=None, mode=0o644, what="config file")
    devices: dict[int, list[str]] = {}
    for path, uid, gid, mode in layout(cfg.spool, web.gid):
        problems += mode_problems(
            path,
            uid=uid,
            gid=gid,
            mode=mode,
            what="spool directory",
            # the CGIs' doorbells are writable for "others": only this mode keeps them out
            wider_is="others could answer a CGI" if path == cfg.spool.waits else "",
        )
        try:
            devices.setdefault(os.lstat(path).st_dev, []).append(path.name)
        except OSError:
            pass
    if os.path.isdir(cfg.spool.root) and not os.path.ismount(cfg.spool.root):
        problems.append(
            (
                "warning",
                f"spool {cfg.spool.root} is not its own size-bounded tmpfs: the web user can "
                f"fill the file system it is on; run: webknockctl prepare-spool",
            )
        )
    if len(devices) > 1:  # the daemon claims and answers by rename(2)
        problems.append(
            (
                "error",
                f"spool {cfg.spool.root} spans {len(devices)} file systems "
                f"({'; '.join(', '.join(names) for names in devices.values())}): "
                "requests cannot be claimed; keep it on one",
            )
        )
    problems += mode_problems(cfg.state_file, uid=0, gid=None, mode=0o600, what="state file")
    problems += mode_problems(
        cfg.state_file.parent, uid=0, gid=None, mode=0o755, what="state directory"
    )
    for suffix in STATE_FILE_SUFFIXES[1:]:
        problems += mode_problems(
            Path(f"{cfg.state_file}{suffix}"),
            uid=0,
            gid=None,
            mode=0o600,
            what="state file",
            optional=True,
        )
    # Whoever can rename entries in these directories can swap what root reads.
    parents: dict[Path, list[str]] = {}
    for parent, what in (
        (cfg.source.parent, "config"),
        (cfg.keys_file.parent if cfg.keys_file is not None else None, "keys"),
        (cfg.server_key_file.parent if _v2_on(cfg) else None, "server key"),
        (cfg.clients_dir.parent if os.path.lexists(cfg.clients_dir) else None, "clients' parent"),
        (cfg.spool.root.parent, "spool's parent"),
    ):
        if parent is not None:
            parents.setdefault(parent, []).append(what)
    for path, whats in parents.items():
        what = f"{', '.join(whats)} directory"
        problems += mode_problems(path, uid=0, gid=None, mode=0o755, what=what)
    from webknock.server.notify.problems import notify_problems  # audit log and [notify]

    problems += notify_problems(cfg)
    problems += hook_problems(cfg)
    if os.geteuid() == 0:
        try:  # logs the backend and the effective forward setting (container ports)
            firewall = make_firewall(cfg, follow_kernel=True)
        except FirewallError as exc:
            problems.append(("error", str(exc)))
        else:
            warning = forward_choice(cfg, type(firewall)).warning
            if warning:
                problems.append(("warning", f"{cfg.source}: [server] {warning}"))
    problems.sort(key=lambda p: p[0] != "error")
    return problems
