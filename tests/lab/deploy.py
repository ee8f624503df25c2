"""A whole server for a test, the demo or a benchmark: site, host policy, web server,
webknockd and listeners in a server namespace, and a client agent; a second server in the
same lab; diagnostics when a test fails."""

from __future__ import annotations

import contextlib
import json
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.lab.net import (
    FIRST_LINK,
    NOT_OFFERED_TCP,
    OTHER4,
    OTHER6,
    SECOND_LINK,
    TCP_PORTS,
    UDP_PORTS,
    Lab,
    Link,
    Netns,
    close_server_firewall,
)
from tests.lab.proc import LabError, stop_process
from tests.lab.site import Site
from tests.lab.web import WEB_SERVERS, Apache, Nginx, _wait_listening

AGENT = Path(__file__).with_name("agent.py")


LISTENER = Path(__file__).with_name("listener.py")


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
    client_addresses: Sequence[str] = (),
    **deploy_kw: Any,
) -> Iterator[Deployment]:
    """A whole server: lab, site, firewall policy, web server, daemon, listeners (see
    :func:`deploy`); `client_addresses` are more source addresses of the client."""
    with contextlib.ExitStack() as stack:
        lab = Lab(server[0])
        stack.callback(lab.close)
        for addr in client_addresses:
            lab.add_client_address(addr)
        yield deploy(stack, lab, lab.server, server, **deploy_kw)


@contextlib.contextmanager
def watched_deployment(
    server: str = "nginx",
    *,
    client_addresses: Sequence[str] = (OTHER4, OTHER6),
    **deploy_kw: Any,
) -> Iterator[Deployment]:
    """:func:`deployment` for a test: the client also has `client_addresses` (by default
    the second address of each family, for "another address stays refused"), and the
    daemon's and web server's logs are printed when the test fails."""
    with deployment(server, client_addresses=client_addresses, **deploy_kw) as d, reported(d):
        yield d


@contextlib.contextmanager
def second_server(d: Deployment, server: str = "nginx", **deploy_kw: Any) -> Iterator[Deployment]:
    """Another server in `d`'s lab: a namespace of its own reached by `d`'s client over
    SECOND_LINK, with its own site, web server, daemon and listeners; removed on exit."""
    with contextlib.ExitStack() as stack:
        ns = d.lab.add_server(SECOND_LINK)
        stack.callback(ns.delete)
        yield deploy(stack, d.lab, ns, server, link=SECOND_LINK, **deploy_kw)


def deploy(
    stack: contextlib.ExitStack,
    lab: Lab,
    ns: Netns,
    server: str = "nginx",
    *,
    link: Link = FIRST_LINK,
    backend: str = "iptables",
    protect: bool = False,
    close_firewall: bool = True,
    delegate: bool | None = None,
    **site_kw: Any,
) -> Deployment:
    """A site served by `server` (nginx or apache) on `link` in `ns`, its host policy,
    webknockd and listeners; `stack` undoes each.

    `delegate`: the host policy accepts the offered ports and leaves them to webknock's
    protect mode (default: only for the nftables backend, where nothing else can work)."""
    site = Site(backend=backend, protect=protect, **site_kw)
    stack.callback(site.close)
    if close_firewall:
        close_server_firewall(ns, backend, backend == "nftables" if delegate is None else delegate)
    web = WEB_SERVERS[server](ns, site, link=link)
    stack.callback(web.close)
    site.start_daemon(ns)
    listeners = start_listeners(ns, site)
    stack.callback(stop_process, listeners)
    return Deployment(lab, site, web, Agent(lab.client, site), server_ns=ns, link=link)


@contextlib.contextmanager
def reported(*deployments: Deployment) -> Iterator[None]:
    """Print the deployments' diagnostics (webknockd's and the web server's log) when the
    block fails, then let the failure through."""
    try:
        yield
    except BaseException:
        for d in deployments:
            print(d.diagnostics())
        raise


class Deployment:
    """What a test needs: the lab, the site, the web server and a client agent; `server`
    is the namespace the site runs in (the lab's own unless :func:`second_server`), `link`
    its addresses."""

    def __init__(
        self,
        lab: Lab,
        site: Site,
        web: Nginx | Apache,
        agent: Agent,
        *,
        server_ns: Netns | None = None,
        link: Link = FIRST_LINK,
    ) -> None:
        self.lab, self.site, self.web, self.agent = lab, site, web, agent
        self.server = server_ns or lab.server
        self.link = link

    def ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.site.ctl(self.server, *args, check=check)

    def list_json(self) -> list[dict[str, Any]]:
        grants: list[dict[str, Any]] = json.loads(self.ctl("list", "--json").stdout)
        return grants

    def iptables_rules(self, family: int = 4) -> list[str]:
        tool = "iptables-save" if family == 4 else "ip6tables-save"
        out = self.server.run([tool, "-t", "filter"]).stdout
        return [ln for ln in out.splitlines() if ln.startswith("-A")]

    def diagnostics(self) -> str:
        where = self.server.name
        parts = [f"--- webknockd log ({where})\n{self.site.log_tail()}"]
        for log in (getattr(self.web, "log", None),):
            if log and Path(log).exists():
                text = Path(log).read_text()[-3000:]
                parts.append(f"--- {self.web.name} log ({where})\n{text}")
        return "\n".join(parts)
