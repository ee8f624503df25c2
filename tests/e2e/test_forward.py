"""Container-published ports (``[server] forward``) in a real kernel, without Docker.

The lab's server namespace plays a Docker host: a bridge with a "container" namespace
behind it (203.0.113.2 and 2001:db8:c::2, listening on tcp/80 and udp/5300), forwarding
on, and Docker's own NAT and FORWARD rules for both families (iptables-nft, as Docker
writes them): the offered port 2222 and the offered udp/51820 are published to the
container by DNAT, and so is 8080, which webknock does not offer. Docker's FORWARD jumps to DOCKER-USER first; the Podman-like case
has no DOCKER-USER (and a bridge named podman0), so webknock's jump sits atop FORWARD.

Each case runs webknockd with ``protect = yes`` and ``forward = auto`` (found by the
bridge or by DOCKER-USER) and checks with real connections from the client namespace: a
published offered port open to everyone before webknock, closed once it runs, open only
for the granted address after a grant, closed again on expiry and on revoke (a connection
already open survives it); a port not offered stays Docker's; a restart with ``forward =
no`` removes the forward path; teardown leaves no rule of ours and Docker's rules as they
were.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.lab import (
    CLIENT4,
    CLIENT6,
    LISTENER,
    OTHER4,
    OTHER6,
    SERVER4,
    SERVER6,
    Agent,
    Lab,
    Netns,
    Site,
    stop_process,
    wait_until,
)

pytestmark = pytest.mark.kernel

#: The container network per family: (network, the host's bridge address, the container).
CONTAINER_NET = {
    4: ("203.0.113.0/24", "203.0.113.1", "203.0.113.2"),
    6: ("2001:db8:c::/64", "2001:db8:c::1", "2001:db8:c::2"),
}
PUBLISHED, NOT_OFFERED, PUBLISHED_UDP = 2222, 8080, 51820
CONTAINER_TCP, CONTAINER_UDP = 80, 5300


@dataclass(frozen=True)
class Case:
    backend: str
    docker: bool  # Docker's DOCKER-USER chain (else Podman-like: a podman0 bridge only)

    @property
    def bridge(self) -> str:
        return "docker0" if self.docker else "podman0"


CASES = {
    "iptables-docker": Case("iptables", True),
    "iptables-podman": Case("iptables", False),
    "nftables-docker": Case("nftables", True),
}


def docker_rules(case: Case, family: int) -> str:
    """The host's NAT and filter rules of one family as Docker writes them for one container
    publishing tcp/80 as 2222 and 8080 and udp/5300 as 51820 (DOCKER-USER only in the
    Docker case)."""
    br = case.bridge
    net, _, container = CONTAINER_NET[family]
    to_addr = container if family == 4 else f"[{container}]"
    dnat = "".join(
        f"-A DOCKER ! -i {br} -p {p} -m {p} --dport {port} "
        f"-j DNAT --to-destination {to_addr}:{to}\n"
        for p, port, to in (
            ("tcp", PUBLISHED, CONTAINER_TCP),
            ("tcp", NOT_OFFERED, CONTAINER_TCP),
            ("udp", PUBLISHED_UDP, CONTAINER_UDP),
        )
    )
    accept = "".join(
        f"-A DOCKER -d {container} ! -i {br} -o {br} -p {p} -m {p} --dport {port} -j ACCEPT\n"
        for p, port in (("tcp", CONTAINER_TCP), ("udp", CONTAINER_UDP))
    )
    user = (":DOCKER-USER - [0:0]\n", "-A FORWARD -j DOCKER-USER\n", "-A DOCKER-USER -j RETURN\n")
    if not case.docker:
        user = ("", "", "")
    return (
        "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n:DOCKER - [0:0]\n"
        "-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
        f"-A POSTROUTING -s {net} ! -o {br} -j MASQUERADE\n"
        f"-A DOCKER -i {br} -j RETURN\n{dnat}COMMIT\n"
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        f":DOCKER - [0:0]\n{user[0]}{user[1]}"
        f"-A FORWARD -o {br} -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n"
        f"-A FORWARD -o {br} -j DOCKER\n"
        f"-A FORWARD -i {br} ! -o {br} -j ACCEPT\n"
        f"{accept}{user[2]}COMMIT\n"
    )


@dataclass
class Published:
    """The lab with its container, the site (not started) and the client's agent."""

    lab: Lab
    container: Netns
    site: Site
    agent: Agent
    case: Case

    def ctl(self, *args: str) -> str:
        return self.site.ctl(self.lab.server, *args).stdout

    def open(self, src: str, port: int = PUBLISHED, timeout: float = 1.0) -> bool:
        return self.agent.tcp_open(SERVER6 if ":" in src else SERVER4, src, port, timeout)

    def ours(self) -> list[str]:
        """Every rule line, chain or table of this instance left in the host's firewall."""
        host = self.lab.server
        found = []
        for tool in ("iptables-save", "ip6tables-save"):
            found += [ln for ln in host.run([tool]).stdout.splitlines() if "WEBKNOCK" in ln]
        tables = host.run(["nft", "list", "tables"]).stdout
        found += [ln for ln in tables.splitlines() if "webknock" in ln]
        listed = json.loads(host.run(["nft", "-j", "list", "chains"]).stdout)["nftables"]
        chains = [i["chain"] for i in listed if "chain" in i]
        return found + [
            f"nft chain {c['table']} {c['name']}" for c in chains if "webknock" in c["table"]
        ]


def build_container(lab: Lab, case: Case) -> Netns:
    """The container namespace behind a bridge of the server namespace, its listener on,
    and the host's forwarding and Docker's rules."""
    host = lab.server
    container = Netns(f"wkf{lab.id}k")
    lab.nets.append(container)  # deleted with the lab
    br, veth = case.bridge, f"wkv{lab.id}"
    host.run(["ip", "link", "add", br, "type", "bridge"])
    run_args = f"{veth} type veth peer name eth0 netns {container.name}"
    host.run(["ip", "link", "add", *run_args.split()])
    host.run(["ip", "link", "set", veth, "master", br, "up"])
    for family, (net, gateway, addr) in CONTAINER_NET.items():
        length, ip = net.split("/")[1], ["ip", f"-{family}"]
        host.run([*ip, "addr", "add", f"{gateway}/{length}", "dev", br, "nodad"])
        container.run([*ip, "addr", "add", f"{addr}/{length}", "dev", "eth0", "nodad"])
    host.run(["ip", "link", "set", br, "up"])
    container.run(["ip", "link", "set", "eth0", "up"])
    for family, (_, gateway, _) in CONTAINER_NET.items():
        container.run(["ip", f"-{family}", "route", "add", "default", "via", gateway])
    host.run(["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    host.run(["iptables-restore"], input=docker_rules(case, 4))
    host.run(["ip6tables-restore"], input=docker_rules(case, 6))

    def settled() -> bool:  # link-local addresses past DAD: the container can reach its router
        shown = host.run(["ip", "-6", "addr", "show", "dev", br]).stdout
        return "tentative" not in shown + container.run(["ip", "-6", "addr"]).stdout

    if not wait_until(settled, 10):
        raise AssertionError("IPv6 addresses of the container link still tentative after 10 s")
    return container


@contextlib.contextmanager
def published(case: Case) -> Iterator[Published]:
    with contextlib.ExitStack() as stack:
        lab = Lab("f")
        stack.callback(lab.close)
        lab.add_client_address(OTHER4)
        lab.add_client_address(OTHER6)
        container = build_container(lab, case)
        site = Site(backend=case.backend, protect=True, extra={"forward": "auto"})
        stack.callback(site.close)
        ports = json.dumps({"tcp": [CONTAINER_TCP], "udp": [CONTAINER_UDP]})
        log = site.root / "container.log"
        listener = container.popen([str(site.python), str(LISTENER), ports], log=log)
        stack.callback(stop_process, listener)

        def listening() -> bool:
            return bool(container.run(["ss", "-Hltn", f"sport = :{CONTAINER_TCP}"]).stdout)

        if not wait_until(listening, 15):
            raise AssertionError(f"the container's listener did not start: {log.read_text()}")
        pub = Published(lab, container, site, Agent(lab.client, site), case)
        try:
            yield pub
        except BaseException:
            print(f"--- webknockd log\n{site.log_tail()}")
            print(lab.server.run(["iptables-save"]).stdout)
            print(lab.server.run(["nft", "list", "ruleset"]).stdout)
            raise


@pytest.fixture(params=sorted(CASES))
def pub(request: pytest.FixtureRequest) -> Iterator[Published]:
    with published(CASES[request.param]) as p:
        yield p


def test_a_published_port_is_closed_until_knocked_and_closes_again(pub: Published) -> None:
    a, site = pub.agent, pub.site
    assert pub.open(OTHER4) and pub.open(OTHER6), "published to everyone before webknock runs"
    site.start_daemon(pub.lab.server)
    assert "forward on (forward = auto:" in site.log_tail(200)
    checked = site.ctl(pub.lab.server, "check-config", check=False).stderr
    assert "INFO forward on (forward = auto:" in checked, "check-config reports it"
    assert not any(map(pub.open, (CLIENT4, OTHER4, CLIENT6))), "closed to everyone"
    assert not a.udp_open(SERVER4, CLIENT4, PUBLISHED_UDP)
    assert pub.open(OTHER4, NOT_OFFERED), "a port not offered stays Docker's business"

    pub.ctl("grant", CLIENT4, "--port", str(PUBLISHED), "--time", "3")
    granted = time.monotonic()
    assert pub.open(CLIENT4), "open for the granted address"
    assert not pub.open(OTHER4), "and for no other"
    assert not a.udp_open(SERVER4, CLIENT4, PUBLISHED_UDP), "nor for a port not granted"
    report = json.loads(site.ctl(pub.lab.server, "status", "--json", check=False).stdout)
    assert report["firewall_agrees"] is True, report
    assert wait_until(lambda: not pub.open(CLIENT4, timeout=0.3), 15), "closed on expiry"
    assert time.monotonic() - granted > 2.5

    pub.ctl("grant", CLIENT6, "--port", str(PUBLISHED), "--time", "600")
    assert pub.open(CLIENT6) and not pub.open(OTHER6), "IPv6 alike"
    assert not pub.open(CLIENT4), "expired, and not the v6 grant's"

    pub.ctl("grant", CLIENT4, "--proto", "udp", "--port", str(PUBLISHED_UDP), "--time", "600")
    assert a.udp_open(SERVER4, CLIENT4, PUBLISHED_UDP) and not a.udp_open(
        SERVER4, OTHER4, PUBLISHED_UDP
    )
    pub.ctl("grant", CLIENT4, "--port", str(PUBLISHED), "--time", "600")
    assert pub.open(CLIENT4)
    held = a.hold(SERVER4, CLIENT4, PUBLISHED)
    try:
        pub.ctl("revoke", CLIENT4, "--proto", "tcp")
        assert not pub.open(CLIENT4), "closed on revoke"
        assert held.stdin is not None and held.stdout is not None
        held.stdin.write("\n")
        held.stdin.flush()
        assert json.loads(held.stdout.read()) == {"first": True, "second": True}, "kept"
    finally:
        held.kill()
        held.communicate(timeout=5)

    site.stop_daemon()
    site.write_config({**site.settings, "forward": "no"})
    site.start_daemon(pub.lab.server)
    assert pub.open(OTHER4) and pub.open(OTHER6), "forward = no: Docker's business again"
    assert [r for r in pub.ours() if "FWD" in r or "forward" in r] == []
    assert pub.ours(), "the INPUT side stays"

    site.stop_daemon()
    pub.ctl("teardown")
    assert pub.ours() == [], "teardown leaves nothing of ours"
    assert pub.open(OTHER4) and pub.open(OTHER6), "Docker's own rules are as they were"
    if pub.case.docker:
        host = pub.lab.server
        assert "-A DOCKER-USER -j RETURN" in host.run(["iptables-save"]).stdout


@pytest.mark.parametrize("backend", ["iptables", "nftables"])
def test_docker_arriving_after_webknockd_started_sets_no_process_against_another(
    backend: str,
) -> None:
    """forward = auto is decided by webknockd when it starts. A DOCKER-USER chain made
    later (Docker installed meanwhile) must not make webknockctl build the forward path
    that webknockd then tears down again, or the other way round: both keep webknockd's
    choice until it restarts."""
    with contextlib.ExitStack() as stack:
        lab = Lab("g")
        stack.callback(lab.close)
        site = Site(backend=backend, protect=True, extra={"forward": "auto"})
        stack.callback(site.close)
        site.start_daemon(lab.server)
        assert "forward off (forward = auto: no container runtime found)" in site.log_tail(200)
        lab.server.run(["iptables", "-N", "DOCKER-USER"])  # as Docker makes it at its start
        if backend == "nftables":
            lab.server.run(["nft", "add table ip filter; add chain ip filter DOCKER-USER"])
        granted = site.ctl(lab.server, "-v", "grant", CLIENT4, "--port", str(PUBLISHED))
        assert "forward off (forward = auto: as webknockd set it up (without it))" in (
            granted.stderr
        )
        time.sleep(2.5)  # webknockd's self-repair check runs every tick
        report = json.loads(site.ctl(lab.server, "status", "--json", check=False).stdout)
        assert report["firewall_agrees"] is True, report
        assert "does not hold" not in site.log_tail(200)
        assert "FWD" not in lab.server.run(["iptables-save"]).stdout
        site.stop_daemon()
        site.start_daemon(lab.server)  # a restart takes Docker into account
        assert "forward on (forward = auto:" in site.log_tail(200)
        status = json.loads(site.ctl(lab.server, "status", "--json", check=False).stdout)
        assert status["firewall_agrees"] is True, status
        site.stop_daemon()
