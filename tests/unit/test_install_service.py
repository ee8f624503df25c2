"""webknock.install: Debian packages, and starting and stopping webknockd (systemd unit or
direct), with the commands recorded by a fake runner and a real lock holder."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from tests.unit.fixtures.install.fakehost import err, fake_host, out, runner
from webknock.install import apt, service
from webknock.install.console import InstallError
from webknock.install.paths import InstanceLayout, ServerLayout
from webknock.install.serverconf import NewConfig, write_config

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer chowns (root)")


def instance(tmp_path: Path) -> InstanceLayout:
    """An instance below `tmp_path` with a config (the daemon's lock is beside its state)."""
    layout = ServerLayout(str(tmp_path))
    inst = layout.instance("webknock")
    layout.etc.mkdir(parents=True)
    layout.state_dir.mkdir(parents=True)
    write_config(inst, NewConfig("22", "", "600", "", "auto", "www-data", "no", None))
    return inst


def test_missing_packages_are_installed_with_apt_get() -> None:
    host = fake_host()
    pkgs = apt.server_packages(host, "iptables", "nginx")
    assert pkgs[:6] == ["python3-venv", "iptables", "ipset", "nginx", "fcgiwrap", "spawn-fcgi"]
    apt.apt_install(host, pkgs, no_apt=False)
    calls = runner(host).calls
    assert [c[-1] for c in calls if c[0] == "dpkg-query"] == pkgs
    assert runner(host).commands("apt-get") == [
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *pkgs[1:]],
    ]
    assert f"installing Debian packages: {' '.join(pkgs[1:])}" in out(host)


def test_no_apt_only_warns() -> None:
    host = fake_host()
    apt.apt_install(host, ["python3-venv", "nftables"], no_apt=True)
    assert not runner(host).commands("apt-get")
    assert "missing Debian packages (not installed: --no-apt/--root): nftables" in err(host)


def test_systemd_unit_that_fails_shows_its_journal(tmp_path: Path) -> None:
    inst = instance(tmp_path)
    host = fake_host()
    host.systemd = True
    fake = runner(host)
    failed = subprocess.CompletedProcess(["systemctl"], 0, "", "")
    fake.answers = {
        "systemctl -q is-active": subprocess.CompletedProcess(["systemctl"], 3, "", ""),
        "systemctl -q is-failed": failed,
        "journalctl": subprocess.CompletedProcess(["journalctl"], 0, "boom\n", ""),
    }
    with pytest.raises(InstallError, match=r"webknockd@webknock.service did not start"):
        service.start_daemon(host, inst)
    unit = "webknockd@webknock.service"
    assert fake.calls == [
        ["systemctl", "daemon-reload"],
        ["systemctl", "-q", "is-active", unit],
        ["systemctl", "enable", "-q", unit],
        ["systemctl", "restart", unit],
        ["systemctl", "-q", "is-failed", unit],
        ["journalctl", "-u", unit, "-n", "20", "--no-pager"],
    ]
    assert "    boom" in err(host)


HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, str(os.getpid()).encode())
    print("locked", flush=True)
    time.sleep(60)
    """
)


def hold_lock(inst: InstanceLayout) -> subprocess.Popen[str]:
    """A process holding the daemon's lock of `inst`, as a running webknockd does."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, f"{inst.state_file}.daemon"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_direct_start_waits_for_restored_and_a_rerun_stops_the_old_daemon(
    tmp_path: Path,
) -> None:
    inst = instance(tmp_path)
    host = fake_host()
    started: list[list[str]] = []
    holders: list[subprocess.Popen[str]] = []

    def start(argv: Sequence[str], *, log: Path) -> Callable[[], bool]:
        started.append(list(argv))
        holders.append(hold_lock(inst))
        with open(log, "a") as fh:
            fh.write("webknockd: restored 0 grants\n")
        return lambda: holders[-1].poll() is None

    host.runner.start = start  # type: ignore[method-assign]
    try:
        service.start_daemon(host, inst)
        first = holders[0]
        assert f"webknockd running, pid {first.pid}" in out(host)
        assert inst.pidfile.read_text() == f"{first.pid}\n"
        assert started == [
            [
                "setpriv", "--no-new-privs", "--bounding-set",
                "-all,+net_admin,+net_raw,+chown,+dac_read_search",
                f"{tmp_path}/usr/local/sbin/webknockd", "--config", str(inst.config),
            ]
        ]  # fmt: skip
        assert oct(inst.daemon_log.stat().st_mode & 0o777) == oct(0o640)
        assert "nothing starts it at boot without systemd" in out(host)

        host.sleep = time.sleep  # the old daemon must really go
        service.start_daemon(host, inst)
        assert first.wait(10) == -15, "stopped with SIGTERM"
        assert f"stopping webknockd (instance webknock, pid {first.pid})" in out(host)
        assert inst.pidfile.read_text() == f"{holders[1].pid}\n"
    finally:
        for proc in holders:
            proc.kill()
            proc.communicate(timeout=10)  # also closes its stdout


def test_direct_start_that_fails_shows_the_log(tmp_path: Path) -> None:
    inst = instance(tmp_path)
    host = fake_host()
    inst.layout.log_dir.mkdir(parents=True)
    inst.daemon_log.write_text("webknockd: error: no such backend\n")
    with pytest.raises(InstallError, match="webknockd did not start"):
        service.start_daemon(host, inst)
    assert "    webknockd: error: no such backend" in err(host)
    assert not inst.pidfile.exists()
