"""The web server side: which one to use, the nginx + fcgiwrap or Apache snippet of an
instance (the shipped one with this instance's paths and URL path), what to tell the
admin, and which of the web server's files still include a snippet."""

from __future__ import annotations

import os
from pathlib import Path

from webknock.install.console import InstallError
from webknock.install.files import write_file
from webknock.install.host import Host
from webknock.install.paths import InstanceLayout

WEB_SERVERS = ("nginx", "apache", "none")
SHIPPED = {"nginx": "etc/nginx/webknock.conf", "apache": "etc/apache2/webknock.conf"}


def default_web_server(host: Host) -> str:
    """The one installed (nginx first), else nginx."""
    for name, binary in (("nginx", "nginx"), ("apache", "apache2")):
        if host.which(binary) or os.access(f"/usr/sbin/{binary}", os.X_OK):
            return name
    return "nginx"


def _substitute(text: str, old: str, new: str, *, optional: bool = False) -> str:
    if old not in text and not optional:
        raise InstallError(f"shipped snippet no longer contains {old!r}")
    return text.replace(old, new)


def snippet_text(
    host: Host, web_server: str, inst: InstanceLayout, url_path: str, cgi: Path, url: str
) -> str:
    """The shipped snippet of `web_server` for instance `inst`, served at `url_path`."""
    snippet = inst.snippet(web_server)
    assert snippet is not None
    text = (host.src / SHIPPED[web_server]).read_text().rstrip("\n")
    if web_server == "nginx":
        text = _substitute(text, "location = /webknock {", f"location = {url_path} {{")
        text = _substitute(text, "/etc/webknock/nginx-webknock.conf", str(snippet), optional=True)
    else:
        text = _substitute(text, "ScriptAlias /webknock ", f"ScriptAlias {url_path} ")
        text = _substitute(text, "<Location /webknock>", f"<Location {url_path}>")
        text = _substitute(text, "/etc/webknock/apache-webknock.conf", str(snippet), optional=True)
    text = _substitute(text, "/usr/lib/cgi-bin/webknock.cgi", str(cgi))
    text = _substitute(text, "/etc/webknock/webknock.ini", str(inst.config))
    text = _substitute(text, "https://HOST/webknock", url, optional=True)
    return text + "\n"


def write_snippet(
    host: Host, web_server: str, inst: InstanceLayout, url_path: str, cgi: Path, url: str
) -> Path | None:
    """Write the snippet (0644) and return its path; None for web server none."""
    snippet = inst.snippet(web_server)
    if snippet is not None:
        write_file(snippet, snippet_text(host, web_server, inst, url_path, cgi, url), 0o644)
    return snippet


def url_path(url: str) -> str:
    """``https://host/a/b?x`` → ``/a/b``."""
    rest = url.split("://", 1)[-1]
    path = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    for mark in "?#":
        path = path.split(mark, 1)[0]
    return path


def snippet_users(root: str, snippet: Path) -> list[str]:
    """``FILE:LINE:TEXT`` of every line of the web servers' configs (below `root`) that
    names `snippet` (as the web server sees it) and is not a comment."""
    name = str(snippet)[len(root) :] if root and str(snippet).startswith(root) else str(snippet)
    found = []
    for top in (Path(root + "/etc/nginx"), Path(root + "/etc/apache2")):
        if not top.is_dir():
            continue
        for path in sorted(p for p in top.rglob("*") if p.is_file()):
            try:
                lines = path.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for number, line in enumerate(lines, 1):
                if name in line and not line.lstrip().startswith("#"):
                    found.append(f"{path}:{number}:{line}")
    return found


def print_web_instructions(
    host: Host,
    web_server: str,
    snippet: Path | None,
    cgi_copy: Path | None,
    cgi: Path,
    inst: InstanceLayout,
    url: str,
) -> None:
    say = host.console.say
    host_part = url.split("://", 1)[-1].split("/", 1)[0]
    if cgi_copy is not None:
        say(f"CGI: {cgi_copy} (this instance's config built in). With Debian's Apache:")
        say("    a2enmod cgid && a2enconf serve-cgi-bin && systemctl reload apache2")
        say(f"  clients use the URL under which your web server runs it: {url}")
    if web_server == "nginx" and snippet is not None:
        say(
            f"nginx + fcgiwrap: add this line inside the server {{ }} block that serves {host_part}"
        )
        say("(HTTPS), e.g. in /etc/nginx/sites-available/default:")
        say(f"    include {snippet};")
        say("then: nginx -t && systemctl reload nginx && systemctl enable --now fcgiwrap.socket")
        say("(without systemd: apt-get install spawn-fcgi; service fcgiwrap start;")
        say(f" service nginx reload: fcgiwrap's init script needs spawn-fcgi). {snippet}:")
        host.console.indented(snippet.read_text())
    elif web_server == "apache" and snippet is not None:
        say(f"Apache: add this line inside the <VirtualHost> that serves {host_part} (HTTPS):")
        say(f"    Include {snippet}")
        say(f"then: a2enmod cgid && apachectl configtest && systemctl reload apache2. {snippet}:")
        host.console.indented(snippet.read_text())
    elif cgi_copy is None:
        say(f"Web server: none chosen. Serve {cgi} as a CGI at {url} with")
        say(f"WEBKNOCK_CONFIG={inst.config} in its environment (snippets: {inst.layout.share}/).")
