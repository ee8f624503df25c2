"""The options of ``install.sh server``: checked, normalised, asked for on a terminal."""

from __future__ import annotations

import pwd
import re
from dataclasses import dataclass

from webknock.config import BACKENDS, INSTANCE_NAME, MAX_TIME
from webknock.install.console import UsageError
from webknock.install.host import Host
from webknock.install.paths import DEFAULT_INSTANCE, PATH_RE
from webknock.install.webserver import WEB_SERVERS, default_web_server
from webknock.urls import check_url

#: As [server] url accepts it, with a path.


@dataclass
class ServerOptions:
    """What the admin asked for; None (or "") is "not given"."""

    instance: str = DEFAULT_INSTANCE
    tcp_ports: str | None = None
    udp_ports: str | None = None
    max_time: str = ""
    backend: str = ""
    protect: str = ""
    web_user: str = ""
    web_server: str = ""
    cgi_dir: str = ""
    url: str = ""
    url_given: bool = False
    v1: bool = False
    root: str = ""
    no_apt: bool = False
    no_start: bool = False
    yes: bool = False


def norm_ports(flag: str, text: str) -> str:
    """``"22, 2222 80"`` → ``"22, 2222, 80"``; raises UsageError naming `flag`."""
    out = []
    for item in text.replace(",", " ").split():
        if not re.fullmatch(r"[0-9]{1,5}", item) or not 1 <= int(item) <= 65535:
            raise UsageError(f"{flag}: {item} is not a port from 1 to 65535")
        out.append(str(int(item)))
    return ", ".join(out)


def validate(opts: ServerOptions) -> None:
    """Check and normalise every given option; raises UsageError naming it."""
    if not INSTANCE_NAME.fullmatch(opts.instance):
        raise UsageError(f"--instance: {opts.instance}: use letters, digits, _ or - (at most 16)")
    if opts.tcp_ports:
        opts.tcp_ports = norm_ports("--tcp-ports", opts.tcp_ports)
    if opts.udp_ports:
        opts.udp_ports = norm_ports("--udp-ports", opts.udp_ports)
    if opts.max_time and (
        not re.fullmatch(r"[0-9]{1,6}", opts.max_time) or not 1 <= int(opts.max_time) <= MAX_TIME
    ):
        raise UsageError(
            f"--max-time: {opts.max_time} is not a number of seconds from 1 to {MAX_TIME}"
        )
    if (opts.backend or "auto") not in BACKENDS:
        raise UsageError("--backend: auto, iptables or nftables")
    if (opts.protect or "no") not in ("yes", "no"):
        raise UsageError("--protect: yes or no")
    if (opts.web_server or "none") not in WEB_SERVERS:
        raise UsageError("--web-server: nginx, apache or none")
    if opts.cgi_dir and not PATH_RE.fullmatch(opts.cgi_dir):
        raise UsageError(
            f"--cgi-dir: {opts.cgi_dir} must be an absolute path of letters, digits and ._/+-"
        )
    if opts.url:
        try:
            check_url(opts.url)
        except ValueError as exc:
            raise UsageError(f"--url: {exc}") from None
    if opts.web_user:
        try:
            pwd.getpwnam(opts.web_user)
        except KeyError:
            raise UsageError(f"--web-user: no such user {opts.web_user}") from None


def default_url_path(opts: ServerOptions, cgi_copy_name: str | None) -> str:
    if cgi_copy_name:
        return f"/cgi-bin/{cgi_copy_name}"
    return "/webknock" if opts.instance == DEFAULT_INSTANCE else f"/webknock-{opts.instance}"


def ask(host: Host, question: str, default: str) -> str:
    host.console.out.write(f"{question} [{default}]: ")
    host.console.out.flush()
    answer = host.stdin.readline().strip()
    return answer or default


def ask_settings(
    host: Host, opts: ServerOptions, *, config_exists: bool, cgi_copy_name: str | None
) -> None:
    """On a terminal without --yes: ask for what no option gave (the port settings only
    for a new config), then check the answers."""
    if opts.yes or not host.terminal:
        return
    host.console.say(
        f"webknock server setup (instance {opts.instance}); Enter keeps the [default]."
    )
    if not config_exists:
        if opts.tcp_ports is None:
            answer = ask(host, "TCP ports clients may open (none: -)", "22")
            opts.tcp_ports = "" if answer == "-" else answer
        if opts.udp_ports is None:
            answer = ask(host, "UDP ports clients may open (none: -)", "-")
            opts.udp_ports = "" if answer == "-" else answer
        opts.max_time = opts.max_time or ask(host, "Longest grant in seconds", "3600")
        opts.protect = opts.protect or ask(
            host, "Close the offered ports to everyone without a grant (yes/no)", "no"
        )
    opts.web_server = opts.web_server or ask(
        host, "Web server (nginx/apache/none)", default_web_server(host)
    )
    if not opts.url:
        path = default_url_path(opts, cgi_copy_name)
        opts.url = ask(host, "Knock URL clients use", f"https://{host.fqdn()}{path}")
    validate(opts)
