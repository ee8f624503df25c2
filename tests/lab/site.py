"""The repository's webknock deployed into a temp dir by the installer's own code
(webknock.install with the temp dir as root prefix): the entry points, config, keys, the
spool on its own tmpfs; a venv made from Debian's /usr/bin/python3 that the web user can
run; webknockd started with the unit's capabilities."""

from __future__ import annotations

import dataclasses
import grp
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
from webknock.config import ConfigError, ServerConfig, load
from webknock.install.files import temp_beside
from webknock.install.host import Host
from webknock.install.paths import ServerLayout
from webknock.install.server import install_entry_points, install_spool, prepare_log_dir
from webknock.install.serverconf import NewConfig, config_text, with_settings
from webknock.install.serverkeys import ensure_server_key, write_v1_keys
from webknock.install.service import unit_caps
from webknock.install.venv import site_packages
from webknock.keys import load_keys, load_server_key

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


class Site:
    """The repository's webknock deployed into a temp dir by the installer's own code
    (:mod:`webknock.install`, with the temp dir as its root prefix): entry points, keys,
    config, spool and log dir. Only the venv is the lab's (links into the shared one).

    `settings` are the config's: the fields of :class:`NewConfig` (the installer's text)
    and the lab's extras (``ipset``, ``result_timeout``, what a test adds), set with
    :func:`with_settings`; :meth:`write_config` writes them again. `url` is the config's
    knock URL; "" (the default) leaves it out, so the profiles `client add` prints have
    none and the client side fills in the URL of its link."""

    def __init__(
        self,
        *,
        backend: str = "iptables",
        protect: bool = False,
        max_time: int = 3600,
        extra: dict[str, str] | None = None,
        instance: str = "webknock",
        url: str = "",
    ) -> None:
        require_root()
        self.root = Path(tempfile.mkdtemp(prefix="webknock-site-"))
        os.chmod(self.root, 0o755)
        self.host = Host(src=REPO)
        self.layout = ServerLayout(str(self.root))
        self.inst = self.layout.instance(instance)
        self.spool = self.inst.spool_dir
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = self.inst.daemon_log
        try:
            self._install(backend, protect, max_time, extra or {}, url)
        except BaseException:
            self.close()
            raise

    def _install(
        self, backend: str, protect: bool, max_time: int, extra: dict[str, str], url: str
    ) -> None:
        self.url = url
        self.python, self.site_packages = self._make_venv()
        ours = self.site_packages / "webknock"
        shutil.copytree(REPO / "webknock", ours, ignore=shutil.ignore_patterns("__pycache__"))
        run([str(self.python), "-m", "compileall", "-q", str(ours)])
        install_entry_points(self.host, self.layout)
        self.cgi = self.layout.cgi
        self.etc = self.layout.etc
        self.etc.mkdir(mode=0o755, parents=True)
        self.layout.state_dir.mkdir(mode=0o700, parents=True)
        prepare_log_dir(self.layout)
        # v1 on (the lab's agent knocks with the shared keys); v2 clients are enrolled per
        # test (`webknockctl client add`).
        self.keys_file = self.inst.keys
        write_v1_keys(self.keys_file)
        self.keys = load_keys(self.keys_file)
        self.clients_dir = self.inst.clients_dir
        self.state = self.inst.state_file
        self.config = self.inst.config
        self.write_config(
            {
                "tcp_ports": ", ".join(map(str, TCP_PORTS)),
                "udp_ports": ", ".join(map(str, UDP_PORTS)),
                "max_time": str(max_time),
                "url": url,
                "backend": backend,
                "web_user": "www-data",
                "protect": "yes" if protect else "no",
                "keys_file": str(self.keys_file),
                "ipset": "no",  # the linear chain unless a test asks for ipset (extra)
                "result_timeout": "5",
                **extra,
            }
        )
        cfg = load(self.config)
        ensure_server_key(cfg)
        self.server_key = load_server_key(cfg.server_key_file)
        self._mount_spool(cfg)

    def _mount_spool(self, cfg: ServerConfig) -> None:
        """The spool on its own bounded tmpfs, laid out by the installer's
        :func:`install_spool` (in this mount namespace, before any namespace's process
        starts, so all of them see it)."""
        gid = grp.getgrnam("www-data").gr_gid
        install_spool(self.host, cfg, gid, mount=True)
        if not os.path.ismount(self.spool):
            raise LabError(f"cannot mount a tmpfs on {self.spool}")

    def write_config(self, settings: dict[str, str]) -> None:
        """Write the config: the installer's text (:func:`config_text`) for the
        :class:`NewConfig` fields of `settings`, the rest set with :func:`with_settings`
        (an empty value leaves the key out); checked with :func:`webknock.config.load` before
        it takes its place."""
        self.settings = dict(settings)
        fields = {f.name for f in dataclasses.fields(NewConfig)}
        missing = fields - settings.keys()
        if missing:
            raise LabError(f"settings lack {sorted(missing)}")
        values = {k: v for k, v in settings.items() if k in fields}
        keys = values.pop("keys_file")
        new = NewConfig(**values, keys_file=Path(keys) if keys else None)
        extra = {k: v for k, v in settings.items() if k not in fields}
        text = with_settings(config_text(self.inst, new), extra)
        tmp = temp_beside(self.config, text, 0o644)
        try:
            load(tmp)
        except ConfigError as exc:
            os.unlink(tmp)
            raise LabError(f"the lab's config does not validate: {exc}") from None
        os.replace(tmp, self.config)

    def _make_venv(self) -> tuple[Path, Path]:
        """A venv from /usr/bin/python3 laid out as install.sh makes it; its python and its
        site-packages.

        The site-packages holds webknock (the caller copies it) and the server's
        dependencies (links into the shared venv): all the CGI sees, as it starts without
        site (-IS). A .pth adds the shared venv's test tools behind them for the daemon,
        webknockctl and the client, which start with site."""
        venv = self.layout.venv
        venv.parent.mkdir(mode=0o755, parents=True)
        run(
            ["/usr/bin/python3", "-m", "venv", "--without-pip", "--system-site-packages", str(venv)]
        )
        deps, ours = site_packages(shared_venv()), site_packages(venv)
        if not deps.is_dir() or not ours.is_dir():
            raise LabError(f"cannot find site-packages of the venvs ({deps}, {ours})")
        for name in installed_files(deps, server_requirements()):
            (ours / name).symlink_to(deps / name)
        (ours / "webknock-lab.pth").write_text(f"{deps}\n")
        return venv / "bin" / "python3", ours

    def env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "WEBKNOCK_CONFIG": str(self.config),
            "LANG": "C.UTF-8",
        }
        return env

    def ctl(self, ns: Netns, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = [str(self.layout.sbin / "webknockctl"), "--config", str(self.config), *args]
        return ns.run(argv, check=check, env=self.env())

    def start_daemon(self, ns: Netns) -> None:
        """Start webknockd with the systemd unit's capabilities and nothing more (as
        install.sh starts it where systemd does not run)."""
        argv = [
            "setpriv",
            "--no-new-privs",
            f"--bounding-set={unit_caps(REPO)}",
            str(self.layout.sbin / "webknockd"),
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
        if os.path.ismount(self.spool):
            raise LabError(f"{self.spool} is still mounted; {self.root} left in place")
        shutil.rmtree(self.root, ignore_errors=True)
