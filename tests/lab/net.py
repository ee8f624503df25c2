"""The lab's network: namespaces, the veth links between server and client namespaces
(documentation addresses only), and the server's host firewall policy."""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.lab.proc import require_root, run

SERVER4, CLIENT4, OTHER4 = "192.0.2.1", "192.0.2.10", "192.0.2.20"


SERVER6, CLIENT6, OTHER6 = "2001:db8::1", "2001:db8::10", "2001:db8::20"


PREFIX4, PREFIX6 = 24, 64


TCP_PORTS = (22, 2222)


UDP_PORTS = (51820,)


NOT_OFFERED_TCP = 2223


_counter = itertools.count()


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


@dataclass(frozen=True)
class Link:
    """One server's link to the client namespace: each side's address per family."""

    server4: str
    client4: str
    server6: str
    client6: str


#: The lab's server link (192.0.2.0/24, 2001:db8::/64).
FIRST_LINK = Link(SERVER4, CLIENT4, SERVER6, CLIENT6)


#: A second server's link (198.51.100.0/24, 2001:db8:1::/64), see :meth:`Lab.add_server`.
SECOND_LINK = Link("198.51.100.1", "198.51.100.10", "2001:db8:1::1", "2001:db8:1::10")


class Lab:
    """Server and client namespaces on one veth link, v4 and v6, firewall open until set;
    :meth:`add_server` links more server namespaces to the same client."""

    def __init__(self, tag: str = "t") -> None:
        require_root()
        self.id = f"{os.getpid() % 100000}{next(_counter)}"
        self.tag = tag
        self.nets: list[Netns] = []
        try:
            self.server = self._ns(f"wk{tag}s{self.id}")
            self.client = self._ns(f"wk{tag}c{self.id}")
            self.server_if, self.client_if = self._link(self.server, FIRST_LINK, "")
        except BaseException:
            self.close()
            raise

    def _link(self, server: Netns, link: Link, suffix: str) -> tuple[str, str]:
        """A veth pair from `server` to the client with `link`'s addresses; its two ends."""
        veth_s, veth_c = f"wks{self.id}{suffix}", f"wkc{self.id}{suffix}"
        pair = f"{veth_s} netns {server.name} type veth peer name {veth_c} netns {self.client.name}"
        run(["ip", "link", "add", *pair.split()])
        for ns, dev, a4, a6 in (
            (server, veth_s, link.server4, link.server6),
            (self.client, veth_c, link.client4, link.client6),
        ):
            ns.run(["ip", "addr", "add", f"{a4}/{PREFIX4}", "dev", dev])
            ns.run(["ip", "-6", "addr", "add", f"{a6}/{PREFIX6}", "dev", dev, "nodad"])
            ns.run(["ip", "link", "set", dev, "up"])
        return veth_s, veth_c

    def add_server(self, link: Link = SECOND_LINK) -> Netns:
        """Another server namespace, linked to the client by a veth pair of its own with
        `link`'s addresses (a prefix no other link of the lab uses); deleted on close."""
        suffix = f"n{len(self.nets)}"
        ns = self._ns(f"wk{self.tag}s{self.id}{suffix}")
        self._link(ns, link, suffix)
        return ns

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
