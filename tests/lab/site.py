"""The repository's webknock deployed into a temp dir as the installer lays it out: a venv
made from Debian's /usr/bin/python3 that the web user can run, the CGI shim, config, keys,
the spool on its own tmpfs, and webknockd started with the unit's capabilities."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.lab.net import TCP_PORTS, UDP_PORTS, Netns
from tests.lab.proc import LabError, require_root, run, stop_process

REPO = Path(__file__).resolve().parents[2]


def shared_venv() -> Path:
    """The venv made by tests/run from /usr/bin/python3 (holds pycryptodome, filelock, ...)."""
    venv = Path(os.environ.get("WEBKNOCK_VENV", "/var/tmp/webknock-venv"))
    if not (venv / "bin" / "python3").exists():
        raise LabError(f"{venv} missing: run tests/run (it builds the venv) first")
    return venv


def server_requirements() -> list[str]:
    """The distributions the server needs (requirements.txt without the client's)."""
    names = []
    for line in (REPO / "requirements.txt").read_text().splitlines():
        spec = line.split("#")[0].strip()
        name = re.split(r"[=<>!~\[; ]", spec, maxsplit=1)[0]
        if name and name != "requests":
            names.append(name)
    return names


def installed_files(site_packages: Path, distributions: Sequence[str]) -> list[str]:
    """The top-level names in `site_packages` that make up `distributions` (their packages,
    modules and .dist-info), from each one's RECORD."""
    wanted = {re.sub(r"[-_.]+", "_", d).lower() for d in distributions}
    found: dict[str, list[str]] = {}
    for info in site_packages.glob("*.dist-info"):
        dist = re.sub(
            r"[-_.]+", "_", info.name.removesuffix(".dist-info").rsplit("-", 1)[0]
        ).lower()
        if dist in wanted:
            rows = (info / "RECORD").read_text().splitlines()
            tops = {row.split(",", 1)[0].split("/", 1)[0] for row in rows}
            found[dist] = [t for t in tops if t not in ("", "__pycache__") and t[:2] != ".."]
    if missing := wanted - found.keys():
        raise LabError(f"{site_packages}: {sorted(missing)} not installed (run tests/run)")
    return sorted({t for tops in found.values() for t in tops})


def shim_for(source: Path, python: Path) -> str:
    """An entry point as install.sh writes it: `source` with `python` as its interpreter,
    the interpreter's flags kept."""
    first, rest = source.read_text().split("\n", 1)
    flags = first.partition(" ")[2]
    return f"#!{python}{' ' + flags if flags else ''}\n{rest}"


#: Where a site's spool goes: a tmpfs, like /run on a production host.
RUNTIME_TMPFS = "/dev/shm"


UNIT = REPO / "etc" / "systemd" / "webknockd@.service"


def unit_bounding_set() -> str:
    """The unit's CapabilityBoundingSet= as setpriv's --bounding-set (e.g. -all,+net_admin)."""
    for line in UNIT.read_text().splitlines():
        if line.startswith("CapabilityBoundingSet="):
            caps = line.split("=", 1)[1].split()
            return ",".join(["-all", *(f"+{c.removeprefix('CAP_').lower()}" for c in caps)])
    raise LabError(f"{UNIT} has no CapabilityBoundingSet=")


class Site:
    """The repository's webknock deployed into a temp dir, as the installer lays it out."""

    def __init__(
        self,
        *,
        backend: str = "iptables",
        protect: bool = False,
        max_time: int = 3600,
        extra: dict[str, str] | None = None,
        instance: str = "webknock",
    ) -> None:
        require_root()
        self.root = Path(tempfile.mkdtemp(prefix="webknock-site-"))
        os.chmod(self.root, 0o755)
        self.python, self.site_packages = self._make_venv()
        ours = self.site_packages / "webknock"
        shutil.copytree(REPO / "webknock", ours, ignore=shutil.ignore_patterns("__pycache__"))
        run([str(self.python), "-m", "compileall", "-q", str(ours)])
        self.cgi = self.root / "cgi-bin" / "webknock.cgi"
        self.cgi.parent.mkdir(mode=0o755)
        self.cgi.write_text(shim_for(REPO / "cgi-bin" / "webknock.cgi", self.python))
        os.chmod(self.cgi, 0o755)
        self.etc = self.root / "etc"
        self.etc.mkdir(mode=0o755)
        from webknock.keys import format_keys
        from webknock.protocol.v1 import Keys

        self.keys = Keys.generate()
        self.keys_file = self.etc / "keys.ini"
        self.keys_file.write_text(format_keys(self.keys))
        os.chmod(self.keys_file, 0o600)  # root's alone: the web user holds no secret
        from webknock.keys import create_server_key

        # v2: the server key where the config's default looks for it (as install.sh makes
        # it); clients are enrolled per test (`webknockctl client add`).
        self.server_key = create_server_key(self.etc / f"{instance}.server-key")
        self.clients_dir = self.etc / f"{instance}.clients"
        # On tmpfs, as install.sh puts it (/run/webknock): /dev/shm is tmpfs on every Debian
        # host, where this one's /run may be on disk.
        self.runtime = Path(tempfile.mkdtemp(prefix="webknock-run-", dir=RUNTIME_TMPFS))
        os.chmod(self.runtime, 0o755)
        self.spool = self.runtime / "spool"
        self._mount_spool()
        self.state = self.root / "state" / "grants.db"
        settings = {
            "instance": instance,
            "tcp_ports": ", ".join(map(str, TCP_PORTS)),
            "udp_ports": ", ".join(map(str, UDP_PORTS)),
            "max_time": str(max_time),
            "keys_file": str(self.keys_file),
            "spool_dir": str(self.spool),
            "state_file": str(self.state),
            "backend": backend,
            "ipset": "no",  # the linear chain unless a test asks for ipset (extra)
            "protect": "yes" if protect else "no",
            "web_user": "www-data",
            "result_timeout": "5",
        }
        settings.update(extra or {})
        self.config = self.etc / "webknock.ini"
        self.write_config(settings)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = self.root / "webknockd.log"

    def _mount_spool(self) -> None:
        """The spool's own bounded tmpfs, mounted as the unit's ExecStartPre does (in this
        mount namespace, before any namespace's process starts, so all of them see it)."""
        import grp

        from webknock.config import SpoolPaths
        from webknock.spool.mount import mount_spool

        if not mount_spool(SpoolPaths(self.spool), grp.getgrnam("www-data").gr_gid):
            raise LabError(f"cannot mount a tmpfs on {self.spool}")

    def write_config(self, settings: dict[str, str]) -> None:
        self.settings = dict(settings)
        text = "[server]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items() if v != "")
        self.config.write_text(text)
        os.chmod(self.config, 0o644)

    def _make_venv(self) -> tuple[Path, Path]:
        """A venv from /usr/bin/python3 laid out as install.sh makes it; its python and its
        site-packages.

        The site-packages holds webknock (the caller copies it) and the server's
        dependencies (links into the shared venv): all the CGI sees, as it starts without
        site (-IS). A .pth adds the shared venv's test tools behind them for the daemon,
        webknockctl and the client, which start with site."""
        venv = self.root / "venv"
        run(
            ["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)]
        )
        deps = shared_venv() / "lib"
        site_dirs = sorted(deps.glob("python3*/site-packages"))
        ours = sorted((venv / "lib").glob("python3*/site-packages"))
        if not site_dirs or not ours:
            raise LabError("cannot find site-packages of the venvs")
        for name in installed_files(site_dirs[0], server_requirements()):
            (ours[0] / name).symlink_to(site_dirs[0] / name)
        (ours[0] / "webknock-lab.pth").write_text(f"{site_dirs[0]}\n")
        return venv / "bin" / "python3", ours[0]

    def env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "WEBKNOCK_CONFIG": str(self.config),
            "LANG": "C.UTF-8",
        }
        return env

    def ctl(self, ns: Netns, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.python), "-m", "webknock.ctl.cli", "--config", str(self.config), *args]
        return ns.run(argv, check=check, env=self.env())

    def start_daemon(self, ns: Netns) -> None:
        """Start webknockd with the systemd unit's capabilities and nothing more (as
        install.sh starts it where systemd does not run)."""
        argv = [
            "setpriv",
            "--no-new-privs",
            f"--bounding-set={unit_bounding_set()}",
            str(self.python),
            "-m",
            "webknock.server.daemon",
            "--config",
            str(self.config),
            "-v",
        ]
        offset = self.daemon_log.stat().st_size if self.daemon_log.exists() else 0
        self.daemon = ns.popen(argv, log=self.daemon_log, env=self.env())
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise LabError(f"webknockd exited {self.daemon.returncode}:\n{self.log_tail()}")
            if "restored" in self.daemon_log.read_bytes()[offset:].decode(errors="replace"):
                return
            time.sleep(0.05)
        raise LabError(f"webknockd did not start:\n{self.log_tail()}")

    def stop_daemon(self, *, kill: bool = False) -> None:
        if self.daemon is None:
            return
        if kill:
            self.daemon.kill()
        stop_process(self.daemon, 10)
        self.daemon = None

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.daemon_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return "(no log)"

    def close(self) -> None:
        from webknock.config import SpoolPaths
        from webknock.spool.mount import unmount_spool

        self.stop_daemon()
        unmount_spool(SpoolPaths(self.spool))
        shutil.rmtree(self.root, ignore_errors=True)
        shutil.rmtree(self.runtime, ignore_errors=True)
