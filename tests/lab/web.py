"""nginx + fcgiwrap and Apache (mod_cgid) serving a site's CGI in a server namespace, each
a whole server config around the snippet the installer writes for the site."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

from tests.lab.net import FIRST_LINK, Link, Netns
from tests.lab.proc import LabError, run, stop_process
from tests.lab.site import Site
from webknock.install.files import write_file
from webknock.install.webserver import snippet_text, url_path


def write_site_snippet(
    site: Site, web_server: str, dest: Path, link: Link, replace: dict[str, str] | None = None
) -> Path:
    """Write to `dest` (0644) the installer's snippet of `web_server` for `site`
    (:func:`snippet_text`: the shipped one with the site's CGI, config, URL path and URL;
    without a url in the site's config, /webknock on `link`), with each of `replace` (a
    lab-only path) replaced as well; returns `dest`."""
    url = site.url or f"http://{link.server4}/webknock"
    text = snippet_text(site.host, web_server, site.inst, url_path(url), site.cgi, url)
    for old, new in (replace or {}).items():
        if old not in text:
            raise LabError(f"the {web_server} snippet no longer contains {old!r}")
        text = text.replace(old, new)
    write_file(dest, text, 0o644)
    return dest


def fcgiwrap_argv(sock: Path | str, children: int = 4) -> list[str]:
    """fcgiwrap as the web user (www-data) with `children` workers on unix socket `sock`,
    as Debian's fcgiwrap.service runs it (the lab's and the installer e2e's one start)."""
    return [
        "setpriv",
        "--reuid=www-data",
        "--regid=www-data",
        "--init-groups",
        "fcgiwrap",
        "-c",
        str(children),
        "-s",
        f"unix:{sock}",
    ]


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
    """nginx + fcgiwrap in the server namespace, around the installer's nginx snippet.

    Plain HTTP on port 80 of the server's addresses on `link`. `https` (or
    :meth:`enable_https` on a running one) also serves the site on port 443 with a
    self-signed certificate for those addresses; the host firewall
    (:func:`close_server_firewall`) lets only port 80 in, so a test opens 443."""

    name = "nginx"
    HTTPS_PORT = 443

    def __init__(
        self, ns: Netns, site: Site, *, https: bool = False, link: Link = FIRST_LINK
    ) -> None:
        self.ns, self.site, self.link = ns, site, link
        self.cert: Path | None = None  # the self-signed certificate (PEM) once HTTPS is on
        self.spki: str | None = None  # base64 of SHA-256 over its public key (for pinning)
        self.dir = site.root / "nginx"
        self.dir.mkdir(mode=0o755)
        rundir = self.dir / "run"  # fcgiwrap runs as the web user and creates its socket here
        rundir.mkdir(mode=0o755)
        shutil.chown(rundir, "www-data", "www-data")
        sock = rundir / "fcgiwrap.sock"
        self.snippet = write_site_snippet(
            site, "nginx", self.dir / "webknock.conf", link, {"/run/fcgiwrap.socket": str(sock)}
        )
        shutil.copy("/etc/nginx/fastcgi_params", self.dir)  # as in Debian's /etc/nginx
        conf = self.conf = self.dir / "nginx.conf"
        if https:
            self._make_certificate()
        self._write_conf()
        self.log = self.dir / "error.log"
        self.fcgi = ns.popen(
            fcgiwrap_argv(sock),
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
        listen {self.link.server4}:{self.HTTPS_PORT} ssl;
        listen [{self.link.server6}]:{self.HTTPS_PORT} ssl;
        ssl_certificate {self.cert};
        ssl_certificate_key {self.dir}/tls.key;
        include {self.snippet};
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
        listen {self.link.server4}:80;
        listen [{self.link.server6}]:80;
        include {self.snippet};
    }}
{tls}}}
""")

    def _make_certificate(self) -> None:
        """A self-signed P-256 certificate for the link's server addresses, valid two days."""
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
                f"subjectAltName=IP:{self.link.server4},IP:{self.link.server6}",
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
    """Apache httpd with mod_cgid in the server namespace, around the installer's snippet."""

    name = "apache"

    def __init__(self, ns: Netns, site: Site, *, link: Link = FIRST_LINK) -> None:
        self.ns, self.site, self.link = ns, site, link
        self.dir = site.root / "apache"
        self.dir.mkdir(mode=0o755)
        self.snippet = write_site_snippet(site, "apache", self.dir / "webknock.conf", link)
        modules = "/usr/lib/apache2/modules"
        conf = self.dir / "httpd.conf"
        conf.write_text(f"""ServerRoot /etc/apache2
ServerName webknock-test
Listen {link.server4}:80
Listen [{link.server6}]:80
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
    Include {self.snippet}
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
