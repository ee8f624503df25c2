"""A throwaway network lab for end-to-end tests, the demo and benchmarks (root only).

``Lab`` builds a server and a client network namespace joined by a veth pair,
with documentation addresses only (192.0.2.0/24, 2001:db8::/64). ``Site``
deploys the repository's webknock into a temp dir as the installer would
(a venv made from Debian's /usr/bin/python3 that the web user can run, the
CGI shim, config, keys, spool). ``Nginx`` and ``Apache`` serve the CGI from
the shipped snippets in ``etc/``. Everything is removed on exit, also on error.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
AGENT = Path(__file__).with_name("agent.py")
LISTENER = Path(__file__).with_name("listener.py")

SERVER4, CLIENT4, OTHER4 = "192.0.2.1", "192.0.2.10", "192.0.2.20"
SERVER6, CLIENT6, OTHER6 = "2001:db8::1", "2001:db8::10", "2001:db8::20"
PREFIX4, PREFIX6 = 24, 64
TCP_PORTS = (22, 2222)
UDP_PORTS = (51820,)
NOT_OFFERED_TCP = 2223

_counter = itertools.count()


def stop_process(proc: subprocess.Popen[Any], grace: float = 5) -> None:
    """Terminate a child, kill it if it lingers, and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(5)


def wait_for(predicate: Callable[[], object], seconds: float, step: float = 0.05) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if predicate():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def wait_until(predicate: Callable[[], object], seconds: float, step: float = 0.2) -> bool:
    """Whether `predicate()` held within `seconds`."""
    return wait_for(predicate, seconds, step) is not None


class LabError(RuntimeError):
    """The lab could not be built or a lab process misbehaved."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise LabError with its stderr on failure."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()[:2000]}")
    return proc


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


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, firewalls)")


class Netns:
    """One network namespace; every process started in it is killed on delete."""

    def __init__(self, name: str) -> None:
        self.name = name
        run(["ip", "netns", "add", name])
        self.run(["ip", "link", "set", "lo", "up"])

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return run(self.cmd(argv), **kw)

    def popen(
        self, argv: Sequence[str], log: Path | None = None, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - owned by the child
        try:
            return subprocess.Popen(
                self.cmd(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    def pids(self) -> list[int]:
        return namespace_pids(self.name)

    def delete(self) -> None:
        delete_namespace(self.name)


def namespace_pids(name: str) -> list[int]:
    out = run(["ip", "netns", "pids", name], check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def delete_namespace(name: str) -> None:
    """Kill every process in the namespace `name` (TERM, then KILL), then delete it; also
    for a namespace whose owner died without cleaning up."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in namespace_pids(name):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 3
        while namespace_pids(name) and time.monotonic() < deadline:
            time.sleep(0.05)
    run(["ip", "netns", "del", name], check=False)


class Lab:
    """Server and client namespaces on one veth link, v4 and v6, firewall open until set."""

    def __init__(self, tag: str = "t") -> None:
        require_root()
        self.id = f"{os.getpid() % 100000}{next(_counter)}"
        self.nets: list[Netns] = []
        try:
            self.server = self._ns(f"wk{tag}s{self.id}")
            self.client = self._ns(f"wk{tag}c{self.id}")
            veth_s, veth_c = f"wks{self.id}", f"wkc{self.id}"
            run(
                [
                    "ip",
                    "link",
                    "add",
                    veth_s,
                    "netns",
                    self.server.name,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    veth_c,
                    "netns",
                    self.client.name,
                ]
            )
            self.server_if, self.client_if = veth_s, veth_c
            for ns, dev, a4, a6 in (
                (self.server, veth_s, SERVER4, SERVER6),
                (self.client, veth_c, CLIENT4, CLIENT6),
            ):
                ns.run(["ip", "addr", "add", f"{a4}/{PREFIX4}", "dev", dev])
                ns.run(["ip", "-6", "addr", "add", f"{a6}/{PREFIX6}", "dev", dev, "nodad"])
                ns.run(["ip", "link", "set", dev, "up"])
        except BaseException:
            self.close()
            raise

    def _ns(self, name: str) -> Netns:
        ns = Netns(name)
        self.nets.append(ns)
        return ns

    def add_client_address(self, addr: str) -> None:
        """Give the client another source address (v4 or v6) on the link."""
        if ":" in addr:
            self.client.run(
                ["ip", "-6", "addr", "add", f"{addr}/{PREFIX6}", "dev", self.client_if, "nodad"]
            )
        else:
            self.client.run(["ip", "addr", "add", f"{addr}/{PREFIX4}", "dev", self.client_if])

    def close(self) -> None:
        for ns in reversed(self.nets):
            ns.delete()
        self.nets.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


BASE_FIREWALL = """*filter
:INPUT DROP [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A INPUT -p tcp -m tcp --dport 80 -j ACCEPT
{extra}COMMIT
"""


#: The nftables host policy: a table of the admin's own. Every base chain on the input hook
#: must accept a packet, so an accept in webknock's table cannot override this drop; the
#: admin accepts the offered ports here and lets webknock (protect = yes) keep them closed.
NFT_BASE_FIREWALL = """table inet labhost {{
    chain input {{
        type filter hook input priority filter; policy drop;
        iif lo accept
        ct state established,related accept
        meta l4proto ipv6-icmp accept
        tcp dport 80 accept
{extra}    }}
}}
"""


def delegated_ports() -> str:
    """The offered ports, for a host policy that leaves them to webknock's protect mode."""
    tcp = ", ".join(map(str, TCP_PORTS))
    udp = ", ".join(map(str, UDP_PORTS))
    return f"tcp dport {{ {tcp} }} accept\nudp dport {{ {udp} }} accept\n"


def close_server_firewall(ns: Netns, backend: str = "iptables", delegate: bool = False) -> None:
    """Host policy of the e2e server: INPUT DROP except loopback, established and HTTP
    (and the offered ports when `delegate`), as iptables rules or, for the nftables
    backend, as an nft table of the host's own."""
    if backend == "nftables":
        extra = "".join(f"        {ln}\n" for ln in delegated_ports().splitlines() if delegate)
        ns.run(["nft", "-f", "-"], input=NFT_BASE_FIREWALL.format(extra=extra))
        return
    ports = ""
    if delegate:
        ports = "".join(f"-A INPUT -p tcp -m tcp --dport {p} -j ACCEPT\n" for p in TCP_PORTS)
        ports += "".join(f"-A INPUT -p udp -m udp --dport {p} -j ACCEPT\n" for p in UDP_PORTS)
    ns.run(["iptables-restore"], input=BASE_FIREWALL.format(extra=ports))
    icmp6 = "-A INPUT -p ipv6-icmp -j ACCEPT\n"
    ns.run(["ip6tables-restore"], input=BASE_FIREWALL.format(extra=icmp6 + ports))


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


def _substitute(text: str, site: Site, replacements: dict[str, str]) -> str:
    """Point a shipped snippet at the site's files (the only change made to it)."""
    mapping = {
        "/usr/lib/cgi-bin/webknock.cgi": str(site.cgi),
        "/etc/webknock/webknock.ini": str(site.config),
        **replacements,
    }
    for old, new in mapping.items():
        if old not in text:
            raise LabError(f"shipped snippet no longer contains {old!r}")
        text = text.replace(old, new)
    return text


def _wait_listening(
    ns: Netns, port: int, proc: subprocess.Popen[bytes], what: str, log: Path
) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            raise LabError(f"{what} exited {proc.returncode}: {text[-2000:]}")
        out = ns.run(["ss", "-Hltn", f"sport = :{port}"], check=False).stdout
        if out.strip():
            return
        time.sleep(0.05)
    raise LabError(f"{what} is not listening on port {port}")


class Nginx:
    """nginx + fcgiwrap in the server namespace, configured from etc/nginx/webknock.conf.

    Plain HTTP on port 80. `https` (or :meth:`enable_https` on a running one) also serves
    the site on port 443 with a self-signed certificate for SERVER4 and SERVER6; the host
    firewall (:func:`close_server_firewall`) lets only port 80 in, so a test opens 443."""

    name = "nginx"
    HTTPS_PORT = 443

    def __init__(self, ns: Netns, site: Site, *, https: bool = False) -> None:
        self.ns, self.site = ns, site
        self.cert: Path | None = None  # the self-signed certificate (PEM) once HTTPS is on
        self.spki: str | None = None  # base64 of SHA-256 over its public key (for pinning)
        self.dir = site.root / "nginx"
        self.dir.mkdir(mode=0o755)
        rundir = self.dir / "run"  # fcgiwrap runs as the web user and creates its socket here
        rundir.mkdir(mode=0o755)
        shutil.chown(rundir, "www-data", "www-data")
        sock = rundir / "fcgiwrap.sock"
        snippet = _substitute(
            (REPO / "etc/nginx/webknock.conf").read_text(),
            site,
            {"/run/fcgiwrap.socket": str(sock)},
        )
        (self.dir / "webknock.conf").write_text(snippet)
        shutil.copy("/etc/nginx/fastcgi_params", self.dir)  # as in Debian's /etc/nginx
        conf = self.conf = self.dir / "nginx.conf"
        if https:
            self._make_certificate()
        self._write_conf()
        self.log = self.dir / "error.log"
        self.fcgi = ns.popen(
            [
                "setpriv",
                "--reuid=www-data",
                "--regid=www-data",
                "--init-groups",
                "fcgiwrap",
                "-c",
                "4",
                "-s",
                f"unix:{sock}",
            ],
            log=self.dir / "fcgiwrap.log",
            env=site.env(),
        )
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not sock.exists():
            raise LabError("fcgiwrap did not create its socket")
        self.proc = ns.popen(["nginx", "-c", str(conf), "-g", "daemon off;"], log=self.log)
        _wait_listening(ns, 80, self.proc, "nginx", self.log)
        if https:
            _wait_listening(ns, self.HTTPS_PORT, self.proc, "nginx (https)", self.log)

    def _write_conf(self) -> None:
        tls = ""
        if self.cert is not None:
            tls = f"""    server {{
        listen {SERVER4}:{self.HTTPS_PORT} ssl;
        listen [{SERVER6}]:{self.HTTPS_PORT} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.dir}/tls.key;
        include {self.dir}/webknock.conf;
    }}
"""
        self.conf.write_text(f"""user www-data;
worker_processes 1;
pid {self.dir}/nginx.pid;
error_log {self.dir}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {self.dir}/body;
    fastcgi_temp_path {self.dir}/fastcgi;
    proxy_temp_path {self.dir}/proxy;
    scgi_temp_path {self.dir}/scgi;
    uwsgi_temp_path {self.dir}/uwsgi;
    server {{
        listen {SERVER4}:80;
        listen [{SERVER6}]:80;
        include {self.dir}/webknock.conf;
    }}
{tls}}}
""")

    def _make_certificate(self) -> None:
        """A self-signed P-256 certificate for SERVER4 and SERVER6, valid for two days."""
        import base64
        import hashlib

        key, cert = self.dir / "tls.key", self.dir / "tls.crt"
        run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                str(key),
                "-out",
                str(cert),
                "-days",
                "2",
                "-subj",
                "/CN=webknock-lab",
                "-addext",
                f"subjectAltName=IP:{SERVER4},IP:{SERVER6}",
            ]
        )
        os.chmod(key, 0o600)  # nginx's master (root) reads it
        public = run(["openssl", "x509", "-in", str(cert), "-noout", "-pubkey"]).stdout
        der = subprocess.run(
            ["openssl", "pkey", "-pubin", "-outform", "DER"],
            input=public.encode(),
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        self.spki = base64.b64encode(hashlib.sha256(der).digest()).decode()
        self.cert = cert

    def enable_https(self) -> Path:
        """Also serve the site on port 443 (nginx reloads); return the certificate."""
        if self.cert is None:
            self._make_certificate()
            self._write_conf()
            self.ns.run(["nginx", "-c", str(self.conf), "-s", "reload"])
            _wait_listening(self.ns, self.HTTPS_PORT, self.proc, "nginx (https)", self.log)
        assert self.cert is not None
        return self.cert

    def close(self) -> None:
        for proc in (self.proc, self.fcgi):
            stop_process(proc)


class Apache:
    """Apache httpd with mod_cgid in the server namespace, from etc/apache2/webknock.conf."""

    name = "apache"

    def __init__(self, ns: Netns, site: Site) -> None:
        self.ns, self.site = ns, site
        self.dir = site.root / "apache"
        self.dir.mkdir(mode=0o755)
        snippet = _substitute((REPO / "etc/apache2/webknock.conf").read_text(), site, {})
        (self.dir / "webknock.conf").write_text(snippet)
        modules = "/usr/lib/apache2/modules"
        conf = self.dir / "httpd.conf"
        conf.write_text(f"""ServerRoot /etc/apache2
ServerName webknock-test
Listen {SERVER4}:80
Listen [{SERVER6}]:80
PidFile {self.dir}/httpd.pid
ErrorLog {self.dir}/error.log
LogLevel warn
User www-data
Group www-data
ScriptSock {self.dir}/cgid.sock
DefaultRuntimeDir {self.dir}
LoadModule mpm_event_module {modules}/mod_mpm_event.so
LoadModule authz_core_module {modules}/mod_authz_core.so
LoadModule alias_module {modules}/mod_alias.so
LoadModule env_module {modules}/mod_env.so
LoadModule cgid_module {modules}/mod_cgid.so
LoadModule mime_module {modules}/mod_mime.so
TypesConfig /etc/mime.types
<Directory />
    Require all denied
</Directory>
<Directory {site.cgi.parent}>
    Options +ExecCGI
    Require all granted
</Directory>
<VirtualHost *:80>
    Include {self.dir}/webknock.conf
</VirtualHost>
""")
        self.log = self.dir / "error.log"
        self.proc = ns.popen(
            ["apache2", "-f", str(conf), "-DFOREGROUND"],
            log=self.dir / "out.log",
            env={**site.env(), "APACHE_RUN_DIR": str(self.dir)},
        )
        _wait_listening(ns, 80, self.proc, "apache2", self.dir / "out.log")

    def close(self) -> None:
        stop_process(self.proc, 10)


WEB_SERVERS: dict[str, type[Nginx] | type[Apache]] = {"nginx": Nginx, "apache": Apache}


class Agent:
    """Runs tests/lab/agent.py in a namespace: knocks and connection probes as a client would."""

    def __init__(self, ns: Netns, site: Site) -> None:
        self.ns, self.site = ns, site

    def call(self, action: str, wall: float = 60, **params: Any) -> Any:
        payload = json.dumps({"action": action, "keys": self.site.keys.to_hex(), **params})
        proc = self.ns.run(
            [str(self.site.python), str(AGENT)],
            input=payload,
            timeout=wall,
            check=False,
            env=self.site.env(),
        )
        if proc.returncode != 0:
            raise LabError(f"agent {action} failed: {proc.stderr.strip()[-2000:]}")
        return json.loads(proc.stdout)

    def hold(self, server: str, src: str, port: int) -> subprocess.Popen[str]:
        """Start a held TCP connection; write a line to its stdin to test it again."""
        payload = json.dumps(
            {
                "action": "hold",
                "keys": self.site.keys.to_hex(),
                "server": server,
                "src": src,
                "port": port,
            }
        )
        proc = subprocess.Popen(
            self.ns.cmd([str(self.site.python), str(AGENT)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=self.site.env(),
        )
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(payload + "\n")
        proc.stdin.flush()
        if proc.stdout.readline().strip() != "connected":
            proc.kill()
            proc.communicate(timeout=5)
            raise LabError("held connection could not be established")
        return proc

    def knock(
        self,
        server: str,
        src: str,
        ports: list[tuple[str, int]],
        time: int = 3600,
        ip: str | None = None,
        path: str = "/webknock",
    ) -> dict[str, Any]:
        """One openports request from `src`; returns {"status": N, "reply": {...}|None}."""
        result: dict[str, Any] = self.call(
            "openports", server=server, src=src, ports=ports, time=time, ip=ip or src, path=path
        )
        return result

    def getinfo(self, server: str, src: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("getinfo", server=server, src=src, path="/webknock")
        return result

    def tcp_open(self, server: str, src: str, port: int, timeout: float = 1.0) -> bool:
        return bool(self.call("tcp", server=server, src=src, port=port, timeout=timeout)["open"])

    def udp_open(self, server: str, src: str, port: int, timeout: float = 1.0) -> bool:
        return bool(self.call("udp", server=server, src=src, port=port, timeout=timeout)["open"])


def start_listeners(ns: Netns, site: Site) -> subprocess.Popen[bytes]:
    """TCP accept and UDP echo on the offered ports (and one not offered), v4 and v6."""
    ports = {"tcp": [*TCP_PORTS, NOT_OFFERED_TCP], "udp": list(UDP_PORTS)}
    proc = ns.popen(
        [str(site.python), str(LISTENER), json.dumps(ports)], log=site.root / "listener.log"
    )
    _wait_listening(ns, TCP_PORTS[0], proc, "listener", site.root / "listener.log")
    return proc


@contextlib.contextmanager
def deployment(
    server: str = "nginx",
    *,
    backend: str = "iptables",
    protect: bool = False,
    close_firewall: bool = True,
    delegate: bool | None = None,
    **site_kw: Any,
) -> Iterator[Deployment]:
    """A whole server: lab, site, firewall policy, web server, daemon, listeners.

    `delegate`: the host policy accepts the offered ports and leaves them to webknock's
    protect mode (default: only for the nftables backend, where nothing else can work)."""
    with contextlib.ExitStack() as stack:
        lab = Lab(server[0])
        stack.callback(lab.close)
        site = Site(backend=backend, protect=protect, **site_kw)
        stack.callback(site.close)
        if close_firewall:
            close_server_firewall(
                lab.server, backend, backend == "nftables" if delegate is None else delegate
            )
        web = WEB_SERVERS[server](lab.server, site)
        stack.callback(web.close)
        site.start_daemon(lab.server)
        listeners = start_listeners(lab.server, site)
        stack.callback(stop_process, listeners)
        yield Deployment(lab, site, web, Agent(lab.client, site))


class Deployment:
    """What a test needs: the lab, the site, the web server and a client agent."""

    def __init__(self, lab: Lab, site: Site, web: Nginx | Apache, agent: Agent) -> None:
        self.lab, self.site, self.web, self.agent = lab, site, web, agent

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.site.ctl(self.lab.server, *args, check=check)

    def list_json(self) -> list[dict[str, Any]]:
        grants: list[dict[str, Any]] = json.loads(self.ctl("list", "--json").stdout)
        return grants

    def iptables_rules(self, family: int = 4) -> list[str]:
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        out = self.lab.server.run([tool, "-t", "filter"]).stdout
        return [ln for ln in out.splitlines() if ln.startswith("-A")]

    def diagnostics(self) -> str:
        parts = [f"--- webknockd log\n{self.site.log_tail()}"]
        for log in (getattr(self.web, "log", None),):
            if log and Path(log).exists():
                parts.append(f"--- {self.web.name} log\n" + Path(log).read_text()[-3000:])
        return "\n".join(parts)


if __name__ == "__main__":  # pragma: no cover
    print(__doc__, file=sys.stderr)
