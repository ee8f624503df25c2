"""How webknockd runs: the systemd unit, the cron fallback, log rotation, and starting and
stopping the daemon (systemd where it is PID 1, else directly: own session, the unit's
capability bounding set, log in ``/var/log/webknock/INSTANCE.log``)."""

from __future__ import annotations

import os
import re
import signal
from pathlib import Path

from webknock.install.console import InstallError
from webknock.install.files import remove, write_file
from webknock.install.host import Host
from webknock.install.paths import InstanceLayout, ServerLayout

#: The paths of the shipped unit that move below --root.
UNIT_PATHS = (
    "/usr/local/sbin/",
    "/etc/webknock/",
    "/var/spool/webknock",
    "/run/webknock",
    "/var/lib/webknock",
    "/var/log/webknock",
)
_JOB = re.compile(r"^[^#\s].* reap")


def cron_line(layout: ServerLayout, config: Path) -> str:
    ctl = f"{layout.sbin}/webknockctl"
    return f"* * * * * root test -x {ctl} && {ctl} --config {config} reap -q"


def cron_update(host: Host, layout: ServerLayout, config: Path, *, add: bool) -> None:
    """Add (or remove) the reap line of `config` in the cron file; the file goes when it
    has no job left."""
    try:
        lines = layout.cron_file.read_text().splitlines()
        lines = [ln for ln in lines if f" --config {config} reap" not in ln]
    except FileNotFoundError:
        shipped = (host.src / "etc/cron.d/webknock").read_text().splitlines()
        lines = [ln for ln in shipped if not ln.startswith("*")]
    if add:
        lines.append(cron_line(layout, config))
    if any(_JOB.match(ln) for ln in lines):
        layout.cron_file.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        write_file(layout.cron_file, "\n".join(lines) + "\n", 0o644)
    else:
        remove(layout.cron_file)


def unit_text(host: Host, layout: ServerLayout) -> str:
    """The shipped unit with its paths below the root prefix."""
    text = (host.src / "etc/systemd/webknockd@.service").read_text()
    if layout.root:
        for path in UNIT_PATHS:
            text = text.replace(path, layout.root + path)
    return text


def install_unit(host: Host, layout: ServerLayout) -> None:
    layout.unit.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file(layout.unit, unit_text(host, layout), 0o644)


def unit_caps(src: Path) -> str:
    """The capability bounding set of the unit in source tree `src`, for setpriv, e.g.
    ``-all,+net_admin`` (the unit's sandbox without systemd)."""
    text = (src / "etc/systemd/webknockd@.service").read_text()
    found = re.search(r"^CapabilityBoundingSet=(.*)$", text, re.M)
    caps = found[1].split() if found else []
    return "-all" + "".join(f",+{c.removeprefix('CAP_').lower()}" for c in caps)


def daemon_pid(config: Path) -> int | None:
    """PID of the running webknockd of `config` (it holds its lock), or None; None too
    when the config or the daemon's code (the venv) is gone."""
    from webknock.config import ConfigError, load

    try:
        cfg = load(config)
        from webknock.server.daemon import daemon_running
    except (ConfigError, ImportError):
        return None
    return daemon_running(cfg)


def stop_direct_daemon(host: Host, inst: InstanceLayout) -> None:
    """Stop a webknockd started without systemd (TERM, then KILL after 15 s)."""
    pid = daemon_pid(inst.config)
    if not pid or pid <= 0:
        return
    host.console.step(f"stopping webknockd (instance {inst.name}, pid {pid})")
    _signal(pid, signal.SIGTERM)
    for _ in range(150):
        if daemon_pid(inst.config) is None:
            break
        host.sleep(0.1)
    else:
        host.console.warn(f"webknockd pid {pid} did not stop within 15 s; killing it")
        _signal(pid, signal.SIGKILL)
        host.sleep(0.5)
    remove(inst.pidfile)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def start_direct_daemon(host: Host, inst: InstanceLayout) -> None:
    """(Re)start webknockd without systemd and wait until it has restored its grants."""
    layout = inst.layout
    stop_direct_daemon(host, inst)
    layout.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    layout.log_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    os.chmod(layout.log_dir, 0o750)  # noqa: S103 (group adm reads the logs)
    log = inst.daemon_log
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640)
    os.fchmod(fd, 0o640)
    offset = os.fstat(fd).st_size
    os.close(fd)
    host.console.step(f"systemd is not running: starting webknockd directly (log {log})")
    argv = ["setpriv", "--no-new-privs", "--bounding-set", unit_caps(host.src)]
    alive = host.runner.start(
        [*argv, f"{layout.sbin}/webknockd", "--config", str(inst.config)], log=log
    )
    for _ in range(150):
        pid = daemon_pid(inst.config)
        if pid and "restored" in _log_since(log, offset):
            write_file(inst.pidfile, f"{pid}\n", 0o644)
            host.console.say(f"    webknockd running, pid {pid}")
            return
        if not alive() and not pid:
            break
        host.sleep(0.1)
    tail = _log_since(log, 0).splitlines()[-20:]
    host.console.indented("\n".join(tail), err=True)
    raise InstallError(f"webknockd did not start (log above, {log})")


def _log_since(log: Path, offset: int) -> str:
    try:
        with open(log, "rb") as fh:
            fh.seek(offset)
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def start_daemon(host: Host, inst: InstanceLayout) -> None:
    """Enable and (re)start webknockd of `inst`: the unit under systemd, else directly."""
    if not host.systemd:
        start_direct_daemon(host, inst)
        host.console.say(
            "    note: nothing starts it at boot without systemd; run this installer again or"
        )
        host.console.say(
            f"    start {inst.layout.sbin}/webknockd --config {inst.config} from your init system"
        )
        return
    unit, run = inst.unit_name, host.runner.run
    host.console.step(f"enabling and (re)starting {unit}")
    run(["systemctl", "daemon-reload"])
    if run(["systemctl", "-q", "is-active", unit]).returncode != 0 and daemon_pid(inst.config):
        stop_direct_daemon(host, inst)  # started directly before; systemd takes over
    for argv in (["systemctl", "enable", "-q", unit], ["systemctl", "restart", unit]):
        proc = run(argv)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(argv)} failed: {proc.stderr.strip()}")
    for _ in range(100):
        if daemon_pid(inst.config):
            return
        if run(["systemctl", "-q", "is-failed", unit]).returncode == 0:
            break
        host.sleep(0.1)
    journal = run(["journalctl", "-u", unit, "-n", "20", "--no-pager"])
    host.console.indented(journal.stdout, err=True)
    raise InstallError(f"{unit} did not start (journalctl -u {unit})")


def stop_unit(host: Host, inst: InstanceLayout) -> None:
    """Disable and stop the unit of `inst` if systemd knows it as enabled or active."""
    if not host.systemd:
        return
    run, unit = host.runner.run, inst.unit_name
    enabled = run(["systemctl", "-q", "is-enabled", unit]).returncode == 0
    if enabled or run(["systemctl", "-q", "is-active", unit]).returncode == 0:
        host.console.say(f"    stopping {unit}")
        run(["systemctl", "disable", "-q", "--now", unit])
