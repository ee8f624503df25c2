"""``install.sh uninstall``: remove server instances, then the shared parts when none is
left. Keys, config, state and log stay unless --purge. A snippet the web server still
includes stays (with the line to remove first), and so does the instance's manifest, so the
next run removes it. Each step can be re-run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from webknock.config import STATE_FILE_SUFFIXES, ConfigError, ServerConfig, SpoolPaths, load
from webknock.install import service
from webknock.install.console import InstallError
from webknock.install.files import is_our_shim, remove, rmdir_quiet
from webknock.install.host import Host
from webknock.install.manifest import read_manifest
from webknock.install.paths import PATH_RE, InstanceLayout, ServerLayout
from webknock.install.venv import activate
from webknock.install.webserver import snippet_users
from webknock.spool.mount import RETIRED, layout, unmount_spool


def state_files(state_file: Path) -> list[Path]:
    """The state file and the files beside it that webknockd and webknockctl make."""
    return [Path(f"{state_file}{suffix}") for suffix in STATE_FILE_SUFFIXES]


def remove_spool(host: Host, spool: Path) -> None:
    """Only the layout webknockd made, its tmpfs, then the folder if it is empty."""
    if not PATH_RE.fullmatch(str(spool)) or str(spool) == "/" or not spool.is_dir():
        return
    paths = SpoolPaths(spool)
    made = [path for path, *_ in layout(paths, 0) if path != paths.root]
    for sub in (*made, *(spool / name for name in RETIRED)):  # earlier versions' too
        if sub.is_dir() and not sub.is_symlink():
            shutil.rmtree(sub)
    if os.path.ismount(spool):
        unmount_spool(paths)
    if not rmdir_quiet(spool):
        host.console.warn(f"kept {spool}: it holds files webknock did not make")


def _config(path: Path) -> ServerConfig | None:
    try:
        return load(path)
    except ConfigError:
        return None


def stop_and_teardown(host: Host, inst: InstanceLayout) -> None:
    """Stop the daemon (unit or direct) and remove the firewall objects (real system only)."""
    service.stop_unit(host, inst)
    service.stop_direct_daemon(host, inst)
    if not inst.config.is_file():
        return
    ctl = inst.layout.sbin / "webknockctl"
    if not os.access(ctl, os.X_OK):
        host.console.warn(f"{ctl} is gone: remove the firewall objects of {inst.name} by hand")
        return
    host.console.say("    removing the firewall chain/table (webknockctl teardown)")
    proc = host.runner.run([str(ctl), "--config", str(inst.config), "teardown"])
    host.console.indented(proc.stdout)
    if proc.returncode != 0:
        host.console.indented(proc.stderr, err=True)
        raise InstallError("webknockctl teardown failed; fix the error above and re-run uninstall")


def uninstall_instance(host: Host, layout: ServerLayout, name: str, *, purge: bool) -> None:
    say = host.console.say
    inst = layout.instance(name)
    if not inst.manifest.is_file() and not inst.config.is_file():
        say(f"instance {name}: not installed")
        return
    host.console.step(f"removing instance {name}")
    activate(layout.venv)
    cfg = _config(inst.config) if inst.config.is_file() else None
    if not layout.root:
        stop_and_teardown(host, inst)
    service.cron_update(host, layout, inst.config, add=False)
    manifest = read_manifest(inst.manifest, name)
    for copy in map(Path, manifest.cgi_copies):
        if is_our_shim(copy, layout.python):
            remove(copy)
        elif copy.exists():
            host.console.warn(f"kept {copy}: not the CGI install.sh wrote")
    held = []
    for snippet in map(Path, manifest.snippets):
        if not snippet.exists():
            continue
        # Never leave the web server broken: a snippet its config still includes stays,
        # with the line to remove first.
        users = snippet_users(layout.root, snippet)
        if users:
            host.console.warn(
                f"kept {snippet}: the web server still includes it; remove this line, reload "
                "the web server, then run uninstall again:"
            )
            host.console.indented("\n".join(users), err=True, by="        ")
            held.append(str(snippet))
            continue
        remove(snippet)
    if cfg is not None:
        remove_spool(host, cfg.spool_dir)
    remove(inst.pidfile)
    server_key = cfg.server_key_file if cfg else inst.server_key
    clients = cfg.clients_dir if cfg else inst.clients_dir
    keys = inst.keys
    if purge:
        for path in (inst.config, keys, server_key, inst.daemon_log):
            remove(path)
        if PATH_RE.fullmatch(str(clients)) and clients.is_dir() and not clients.is_symlink():
            shutil.rmtree(clients)
        if cfg is not None:
            for path in state_files(cfg.state_file):
                remove(path)
            if cfg.audit_log is not None:
                remove(cfg.audit_log)
        say("    purged config, keys, state and log")
    else:
        kept = [inst.config, keys, server_key, clients, inst.daemon_log]
        if cfg is not None:
            kept.insert(4, cfg.state_file)
        kept = [p for p in kept if p.exists()]
        if kept:
            say(f"    kept {' '.join(map(str, kept))} (--purge deletes them)")
    if held:  # remembered, so that the next uninstall removes the snippet
        say(
            f"    kept its record {inst.manifest} until the web server no longer includes "
            + " ".join(held)
        )
    else:
        remove(inst.manifest)
    if purge:
        for folder in (layout.state_dir, layout.log_dir, layout.etc):
            rmdir_quiet(folder)


def remove_shared(host: Host, layout: ServerLayout, *, purge: bool) -> None:
    """No instance left: entry points, unit, cron file, log rotation, the venv."""
    host.console.step("no instance left: removing the shared parts")
    for path in (layout.sbin / "webknockd", layout.sbin / "webknockctl"):
        if is_our_shim(path, layout.python):
            remove(path)
        elif path.exists():
            host.console.warn(f"kept {path}: not the entry point install.sh wrote")
    if layout.unit.is_file():
        remove(layout.unit)
        if not layout.root and host.systemd:
            host.runner.run(["systemctl", "daemon-reload"])
    service.cron_update(host, layout, Path("/nonexistent"), add=False)
    remove(layout.logrotate)
    shutil.rmtree(layout.opt, ignore_errors=True)
    for folder in (layout.run_dir, layout.state_dir, layout.log_dir, layout.etc):
        rmdir_quiet(folder)
    for folder in (layout.state_dir, layout.etc, layout.log_dir):
        if folder.is_dir():
            note = "it holds files webknock did not make" if purge else "--purge empties it"
            host.console.say(
                f"    kept {folder}: {note}" if purge else f"    kept {folder} ({note})"
            )


def uninstall(host: Host, root: str, instance: str, *, every: bool, purge: bool) -> None:
    """``install.sh uninstall [--instance NAME | --all] [--purge]``."""
    layout = ServerLayout(root)
    names = layout.installed_instances() if every else [instance]
    for name in names:
        uninstall_instance(host, layout, name, purge=purge)
    left = layout.installed_instances()
    if left:
        host.console.say(f"instances still installed: {' '.join(left)} (shared parts kept)")
    elif layout.opt.is_dir() or layout.unit.exists() or (layout.sbin / "webknockd").exists():
        remove_shared(host, layout, purge=purge)
    host.console.say("Done.")
