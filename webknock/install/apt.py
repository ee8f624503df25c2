"""Debian packages: which ones the server and the client need, installed when missing."""

from __future__ import annotations

import os

from webknock.install.console import InstallError
from webknock.install.host import Host

CLIENT_PACKAGES = ("python3-venv",)


def server_packages(host: Host, backend: str, web_server: str) -> list[str]:
    """The packages a server with `backend` and `web_server` needs."""
    pkgs = ["python3-venv"]
    if backend == "iptables":
        pkgs += ["iptables", "ipset"]
    elif backend == "nftables":
        pkgs += ["nftables", "python3-nftables"]
    else:
        pkgs += ["nftables", "python3-nftables", "iptables", "ipset"]
    if web_server == "nginx":
        pkgs += ["nginx", "fcgiwrap"]
        # Without systemd as PID 1, Debian's fcgiwrap init script needs spawn-fcgi
        # (without it, `service fcgiwrap start` silently does nothing).
        if not host.systemd:
            pkgs.append("spawn-fcgi")
    elif web_server == "apache":
        pkgs.append("apache2")
    if host.which("cron") is None and not _executable("/usr/sbin/cron"):
        pkgs.append("cron")
    return pkgs


def _executable(path: str) -> bool:
    return os.access(path, os.X_OK)


def missing(host: Host, packages: list[str]) -> list[str]:
    """Those of `packages` dpkg does not list as installed."""
    out = []
    for pkg in packages:
        proc = host.runner.run(["dpkg-query", "-W", "-f=${Status}\n", pkg])
        if "install ok installed" not in proc.stdout:
            out.append(pkg)
    return out


def apt_install(host: Host, packages: list[str], *, no_apt: bool) -> None:
    """Install the missing ones of `packages` with apt-get; with `no_apt` only warn."""
    need = missing(host, packages)
    if not need:
        return
    if no_apt:
        host.console.warn(
            f"missing Debian packages (not installed: --no-apt/--root): {' '.join(need)}"
        )
        return
    host.console.step(f"installing Debian packages: {' '.join(need)}")
    env = {**host.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need],
    ):
        proc = host.runner.run(argv, env=env)
        if proc.returncode != 0:
            raise InstallError(f"{' '.join(argv[:2])} failed: {proc.stderr.strip()[-2000:]}")
