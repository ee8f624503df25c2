"""The timeout backends (nftables sets, iptables + ipset) in a real kernel.

Each test builds a lab (server and client namespaces, nginx + fcgiwrap, webknockd) and
checks with real connections from the client namespace: a port refused before the knock
is open after it, and refused again after revoke or after the kernel's own timeout, which
closes it with the daemon stopped. The kernel's elements are read back with ``nft -j`` or
``ipset save``: one element per grant, its timeout set on open and replaced on renew.

For nftables the host policy is an nft table of the host's own that accepts the offered
ports (they are delegated to webknock) and webknock runs with ``protect = yes``; for
iptables + ipset the host policy is the lab's iptables INPUT DROP.

Network grants (a v2 client's ``open_prefix``) are checked on every backend, the linear
iptables chain included: another address of the network gets through, one outside does
not, an address grant inside a network grant lives beside it, and revoke by client, by
address or by expiry closes it. An ipset of the layout before network grants
(``hash:ip,port``) is replaced on start with its grant kept and no connection refused.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.test_v2 import posts, v2_form
from tests.lab import (
    CLIENT4,
    CLIENT6,
    OTHER4,
    OTHER6,
    SERVER4,
    SERVER6,
    Deployment,
    Lab,
    Site,
    close_server_firewall,
    deployment,
    wait_until,
    watched_deployment,
)
from webknock.protocol import transport, v2

pytestmark = pytest.mark.kernel

BACKENDS: dict[str, dict[str, Any]] = {
    "nftables": {"backend": "nftables", "protect": True},
    "ipset": {"backend": "iptables", "extra": {"ipset": "yes"}},
}

Held = dict[tuple[str, str, int], int]


@pytest.fixture(params=sorted(BACKENDS))
def d(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    with watched_deployment("nginx", client_addresses=(OTHER4,), **BACKENDS[request.param]) as dep:
        yield dep


def is_nft(d: Deployment) -> bool:
    return d.site.settings["backend"] == "nftables"


def held(d: Deployment) -> list[tuple[tuple[str, str, int], int]]:
    """Every element the kernel holds for the instance, with its remaining seconds."""
    ns = d.lab.server
    found: list[tuple[tuple[str, str, int], int]] = []
    if is_nft(d):
        out = ns.run(["nft", "-j", "list", "table", "inet", "webknock"]).stdout
        for item in json.loads(out)["nftables"]:
            spec = item.get("set")
            if not spec:
                continue
            for elem in spec.get("elem", []):
                e = elem["elem"]
                ip, port = e["val"]["concat"]
                found.append(((ip, spec["name"][:3], port), e.get("expires", e["timeout"])))
        return found
    for name in ("WEBKNOCK4", "WEBKNOCK6"):
        for line in ns.run(["ipset", "save", name]).stdout.splitlines():
            m = re.fullmatch(rf"add {name} (\S+),(tcp|udp):(\d+) timeout (\d+)", line)
            if m:
                found.append(((m[1], m[2], int(m[3])), int(m[4])))
    return found


def status(d: Deployment) -> tuple[int, dict[str, Any]]:
    proc = d.ctl("status", "--json", check=False)
    report: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, report


def test_grant_renew_revoke(d: Deployment) -> None:
    a = d.agent
    assert not a.tcp_open(SERVER4, CLIENT4, 22), "port must start closed"
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]
    assert a.tcp_open(SERVER4, CLIENT4, 22)
    assert not a.tcp_open(SERVER4, OTHER4, 22), "another address stays refused"
    assert not a.tcp_open(SERVER4, CLIENT4, 2222), "a port not asked for stays refused"
    ((key, left),) = held(d)
    assert key == (CLIENT4, "tcp", 22) and 590 <= left <= 600

    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=1800)["reply"]["success"]
    ((key, left),) = held(d)
    assert key == (CLIENT4, "tcp", 22) and 1790 <= left <= 1800, "timeout replaced in place"
    assert a.tcp_open(SERVER4, CLIENT4, 22)
    (grant,) = d.list_json()
    assert grant["renew_count"] == 1 and 1790 <= grant["remaining"] <= 1800

    assert a.knock(SERVER6, CLIENT6, [("tcp", 22), ("udp", 51820)], time=600)["reply"]["success"]
    assert a.tcp_open(SERVER6, CLIENT6, 22) and a.udp_open(SERVER6, CLIENT6, 51820)
    assert sorted(k for k, _ in held(d)) == [
        (CLIENT4, "tcp", 22),
        (CLIENT6, "tcp", 22),
        (CLIENT6, "udp", 51820),
    ]
    code, report = status(d)
    assert code == 0 and report["firewall_agrees"] is True

    d.ctl("revoke", CLIENT4)
    assert not a.tcp_open(SERVER4, CLIENT4, 22)
    d.ctl("revoke", CLIENT6, "--proto", "udp")
    assert not a.udp_open(SERVER6, CLIENT6, 51820) and a.tcp_open(SERVER6, CLIENT6, 22)
    assert [k for k, _ in held(d)] == [(CLIENT6, "tcp", 22)]


PROBE = """
import socket, struct, sys, time
ok = refused = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.settimeout(0.5)
        s.bind((sys.argv[2], 0))
        try:
            s.connect((sys.argv[3], 22))
            ok += 1
        except OSError:
            refused += 1
print(ok, refused)
"""


def listen_drops(d: Deployment) -> int:
    """SYNs the server dropped because a listener's accept queue was full (CPU contention)."""
    out = d.lab.server.run(["nstat", "-asz", "TcpExtListenDrops"]).stdout
    return int(out.split("TcpExtListenDrops")[1].split()[0])


def test_renewals_leave_no_gap(d: Deployment) -> None:
    """Connects in a tight loop while the grant is renewed again and again: none refused.

    A refused connect that the kernel counts as a listen drop (the lab's listener, starved
    of CPU by the renewing processes, let its accept queue fill) is not a firewall gap.
    """
    assert d.agent.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]
    out = d.site.root / "probe.out"
    drops = listen_drops(d)
    probe = d.lab.client.popen([str(d.site.python), "-c", PROBE, "4", CLIENT4, SERVER4], log=out)
    renewals = 0
    try:
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            renewals += 1
            d.ctl("grant", CLIENT4, "--port", "22", "--time", str(600 + renewals))
    finally:
        probe.wait(15)
    ok, refused = map(int, out.read_text().split())
    assert renewals >= 5 and ok > 100, (renewals, ok)
    gap = refused - (listen_drops(d) - drops)
    assert gap <= 0, f"{gap} of {ok + refused} connects refused during {renewals} renewals"
    ((key, left),) = held(d)
    assert key == (CLIENT4, "tcp", 22) and left > 600 + renewals - 5


def test_kernel_expires_a_grant_with_the_daemon_stopped(d: Deployment) -> None:
    a, site = d.agent, d.site
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=2)["reply"]["success"]
    assert a.knock(SERVER6, CLIENT6, [("tcp", 2222)], time=600)["reply"]["success"]
    site.stop_daemon(kill=True)
    assert a.tcp_open(SERVER4, CLIENT4, 22)
    assert wait_until(lambda: not a.tcp_open(SERVER4, CLIENT4, 22, timeout=0.3), 6), (
        "the kernel did not close the grant on time"
    )
    assert [k for k, _ in held(d)] == [(CLIENT6, "tcp", 2222)]
    assert a.tcp_open(SERVER6, CLIENT6, 2222), "the long grant stays"
    site.start_daemon(d.lab.server)
    assert [(g["ip"], g["port"]) for g in d.list_json()] == [(CLIENT6, 2222)]
    assert wait_until(lambda: d.ctl("list", "--all", "--json").stdout.count('"ip"') == 1, 5)


def test_reconcile_after_a_flush_restores_remaining_time(d: Deployment) -> None:
    a, site, ns = d.agent, d.site, d.lab.server
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]
    assert a.knock(SERVER6, CLIENT6, [("udp", 51820)], time=300)["reply"]["success"]
    site.stop_daemon(kill=True)
    time.sleep(2.1)
    if is_nft(d):
        ns.run(["nft", "flush", "set", "inet", "webknock", "tcp4"])
        ns.run(["nft", "flush", "set", "inet", "webknock", "udp6"])
    else:
        ns.run(["ipset", "flush", "WEBKNOCK4"])
        ns.run(["ipset", "flush", "WEBKNOCK6"])
    assert not a.tcp_open(SERVER4, CLIENT4, 22)
    if is_nft(d):  # and an element nobody granted
        ns.run(["nft", "add element inet webknock tcp4 { 192.0.2.20 . 22 timeout 60s }"])
    else:
        ns.run(["ipset", "add", "WEBKNOCK4", f"{OTHER4},tcp:22", "timeout", "60"])
    code, report = status(d)
    assert code == 3 and report["firewall_agrees"] is False
    assert report["drift"]["missing"] == ["192.0.2.10:tcp/22", "[2001:db8::10]:udp/51820"]
    assert report["drift"]["extra"] == [f"{OTHER4}:tcp/22"]

    out = d.ctl("reconcile").stdout
    assert "2 live grant(s)" in out
    left = dict(held(d))
    assert 590 <= left[(CLIENT4, "tcp", 22)] <= 598, "restored with its remaining time"
    assert 290 <= left[(CLIENT6, "udp", 51820)] <= 298
    assert a.tcp_open(SERVER4, CLIENT4, 22) and a.udp_open(SERVER6, CLIENT6, 51820)
    assert not a.tcp_open(SERVER4, OTHER4, 22), "reconcile removed the extra element"
    assert sorted(left) == [(CLIENT4, "tcp", 22), (CLIENT6, "udp", 51820)]

    def repaired() -> bool:
        return a.tcp_open(SERVER4, CLIENT4, 22, timeout=0.3) and not a.tcp_open(
            SERVER4, OTHER4, 22, timeout=0.3
        )

    if is_nft(d):  # flushing the whole table removes the chain too, protect's drop included
        ns.run(["nft", "flush", "table", "inet", "webknock"])
        assert a.tcp_open(SERVER4, OTHER4, 22), "a flushed table protects nothing"
    else:
        ns.run(["ipset", "flush"])
        assert not a.tcp_open(SERVER4, CLIENT4, 22)
    site.start_daemon(ns)
    assert repaired() and a.udp_open(SERVER6, CLIENT6, 51820), "restored on start"
    assert status(d)[0] == 0
    ns.run(["nft", "flush", "table", "inet", "webknock"] if is_nft(d) else ["ipset", "flush"])
    assert wait_until(repaired, 15), "the running daemon did not repair a flush"
    assert status(d)[0] == 0


@pytest.mark.parametrize("backend", sorted(BACKENDS))
def test_protect_on_and_off(backend: str) -> None:
    """Host policy accepts the offered ports: protect decides whether they need a knock."""
    kw = {**BACKENDS[backend], "protect": False}
    with deployment("nginx", delegate=True, **kw) as d:
        d.lab.add_client_address(OTHER4)
        a, site, ns = d.agent, d.site, d.lab.server
        assert a.tcp_open(SERVER4, OTHER4, 22), "protect off: the host policy decides"
        assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]

        site.write_config({**site.settings, "protect": "yes"})
        site.stop_daemon()
        site.start_daemon(ns)
        assert not a.tcp_open(SERVER4, OTHER4, 22), "protect on: a knock is needed"
        assert not a.udp_open(SERVER6, CLIENT6, 51820)
        assert a.tcp_open(SERVER4, CLIENT4, 22), "the grant survives the switch"
        held_conn = a.hold(SERVER4, CLIENT4, 22)
        try:
            d.ctl("revoke", CLIENT4)
            assert not a.tcp_open(SERVER4, CLIENT4, 22)
            assert held_conn.stdin is not None and held_conn.stdout is not None
            held_conn.stdin.write("\n")
            held_conn.stdin.flush()
            assert json.loads(held_conn.stdout.read()) == {"first": True, "second": True}
        finally:
            held_conn.kill()
            held_conn.communicate(timeout=5)

        site.write_config({**site.settings, "protect": "no"})
        site.stop_daemon()
        site.start_daemon(ns)
        assert a.tcp_open(SERVER4, OTHER4, 22), "protect off again"


def test_teardown_removes_only_ours_and_auto_prefers_nftables() -> None:
    """Two instances and a foreign table/set: teardown of one leaves the rest alone."""
    with Lab("k") as lab:
        ns = lab.server
        close_server_firewall(ns, "nftables")
        ns.run(["nft", "add table inet other; add set inet other s { type ipv4_addr; }"])
        ns.run(["ipset", "create", "OTHER", "hash:ip"])
        sites = [Site(backend="auto"), Site(backend="iptables", instance="second")]
        try:
            sites[1].write_config({**sites[1].settings, "ipset": "yes"})
            first = sites[0].ctl(ns, "-v", "grant", CLIENT4, "--port", "22", "--time", "60")
            assert "backend auto: chose nftables" in first.stderr
            sites[1].ctl(ns, "grant", CLIENT4, "--port", "22", "--time", "60")
            tables = ns.run(["nft", "list", "tables"]).stdout.split()
            assert {"labhost", "other", "webknock"} <= set(tables)
            assert set(ns.run(["ipset", "list", "-n"]).stdout.split()) == {
                "OTHER",
                "WK-second4",
                "WK-second6",
            }
            sites[0].ctl(ns, "teardown")
            assert "webknock" not in ns.run(["nft", "list", "tables"]).stdout.split()
            assert "WK-second" in ns.run(["iptables-save"]).stdout, "other instance kept"
            sites[1].ctl(ns, "teardown")
            assert set(ns.run(["ipset", "list", "-n"]).stdout.split()) == {"OTHER"}
            assert "WK-second" not in ns.run(["iptables-save"]).stdout
            assert "WK-second" not in ns.run(["ip6tables-save"]).stdout
            assert {"labhost", "other"} <= set(ns.run(["nft", "list", "tables"]).stdout.split())
        finally:
            for site in sites:
                site.close()


# -- network grants (open_prefix) ---------------------------------------------------------

#: Every backend, the linear iptables chain (the lab's default: ipset = no) too.
ALL_BACKENDS: dict[str, dict[str, Any]] = {**BACKENDS, "iptables": {"backend": "iptables"}}
#: In the /28 of CLIENT4 (192.0.2.0/28) and the /124 of CLIENT6 (2001:db8::10/124);
#: OTHER4 (192.0.2.20) and OTHER6 (2001:db8::20) are outside them, on the same link.
INSIDE4, INSIDE6 = "192.0.2.11", "2001:db8::11"


def knock_v2(d: Deployment, key: v2.SigningKey, src: str, ports: list[str], seconds: int) -> Any:
    """One v2 openports from `src` for `src`; the verified reply body."""
    server = d.site.server_key
    body = {
        "api": "openports",
        "ts": int(time.time()),
        "nonce": v2.new_nonce(),
        "ip": src,
        "ports": ports,
        "time": seconds,
    }
    form = v2_form(key, server, body)
    ((status, raw),) = posts(d, [(src, form)])
    assert status == 200, status
    return json.loads(v2.verify_reply(server.public, transport.decode_v2_field(form[3:]), raw))


def opened(d: Deployment) -> set[str]:
    """What the kernel lets in, read from whichever backend runs: ``ADDR[/LEN] proto/port``."""
    ns, found = d.lab.server, set()
    if is_nft(d):
        out = json.loads(ns.run(["nft", "-j", "list", "table", "inet", "webknock"]).stdout)
        for item in out["nftables"]:
            spec = item.get("set") or {}
            m = re.fullmatch(r"(tcp|udp)[46](?:_(\d+))?", spec.get("name", ""))
            if m is None:
                continue
            for elem in spec.get("elem", []):
                ip, port = (elem["elem"]["val"] if "elem" in elem else elem)["concat"]
                found.add(f"{ip}{'/' + m[2] if m[2] else ''} {m[1]}/{port}")
    elif d.site.settings["ipset"] == "yes":
        for name in ("WEBKNOCK4", "WEBKNOCK6"):
            for line in ns.run(["ipset", "save", name]).stdout.splitlines():
                m = re.fullmatch(rf"add {name} (\S+),(tcp|udp):(\d+) timeout \d+", line)
                if m:
                    found.add(f"{m[1]} {m[2]}/{m[3]}")
    else:
        rule = (
            r"-A WEBKNOCK-GRANTS -s (\S+?)(?:/32|/128)? -p (tcp|udp) -m \2 --dport (\d+) -j ACCEPT"
        )
        for family in (4, 6):
            for line in d.iptables_rules(family):
                m = re.fullmatch(rule, line)
                if m:
                    found.add(f"{m[1]} {m[2]}/{m[3]}")
    return found


@pytest.mark.parametrize("backend", sorted(ALL_BACKENDS))
def test_a_network_grant_lets_its_network_in_until_revoked_or_expired(backend: str) -> None:
    with deployment("nginx", **ALL_BACKENDS[backend]) as d:
        try:
            for addr in (INSIDE4, OTHER4, INSIDE6, OTHER6):
                d.lab.add_client_address(addr)
            a = d.agent
            alice, bob = v2.SigningKey.generate(), v2.SigningKey.generate()
            d.ctl("client", "add", "alice", "--key", alice.public_text(), "--open-prefix", "28,124")
            d.ctl("client", "add", "bob", "--key", bob.public_text())
            assert not a.tcp_open(SERVER4, INSIDE4, 22), "port must start closed"

            reply = knock_v2(d, alice, CLIENT4, ["tcp/22"], 600)
            assert (reply["ip"], reply["net"]) == (CLIENT4, "192.0.2.0/28")
            assert a.tcp_open(SERVER4, CLIENT4, 22)
            assert a.tcp_open(SERVER4, INSIDE4, 22), "another address of the network"
            assert not a.tcp_open(SERVER4, OTHER4, 22), "an address outside it"
            assert not a.tcp_open(SERVER4, INSIDE4, 2222), "a port not asked for"
            assert opened(d) == {"192.0.2.0/28 tcp/22"}
            (grant,) = d.list_json()
            assert (grant["ip"], grant["client"]) == ("192.0.2.0/28", "alice")

            # from another address of the network: the same grant, renewed
            assert knock_v2(d, alice, INSIDE4, ["tcp/22"], 900)["net"] == "192.0.2.0/28"
            (grant,) = d.list_json()
            assert grant["renew_count"] == 1 and 890 <= grant["remaining"] <= 900
            # bob, without open_prefix, from inside alice's network: a grant of its own
            assert "net" not in knock_v2(d, bob, INSIDE4, ["tcp/22"], 600)
            assert opened(d) == {"192.0.2.0/28 tcp/22", f"{INSIDE4} tcp/22"}
            code, report = status(d)
            assert code == 0 and report["firewall_agrees"] is True, report

            # our objects emptied behind our back: the running daemon puts the network back
            if is_nft(d):  # the chain loses its rules (the network set's among them)
                d.lab.server.run(["nft", "flush", "table", "inet", "webknock"])
            elif d.site.settings["ipset"] == "yes":
                d.lab.server.run(["ipset", "flush", "WEBKNOCK4"])
            else:
                d.lab.server.run(["iptables", "-F", "WEBKNOCK-GRANTS"])

            def repaired() -> bool:
                return (
                    opened(d) == {"192.0.2.0/28 tcp/22", f"{INSIDE4} tcp/22"}
                    and status(d)[0] == 0
                    and a.tcp_open(SERVER4, CLIENT4, 22, timeout=0.3)
                    and not a.tcp_open(SERVER4, OTHER4, 22, timeout=0.3)
                )

            assert wait_until(repaired, 15), "the running daemon did not repair it"

            out = d.ctl("revoke", "--client", "alice").stdout
            assert out == "revoked 192.0.2.0/28:tcp/22\n"
            assert not a.tcp_open(SERVER4, CLIENT4, 22), "the network closed"
            assert a.tcp_open(SERVER4, INSIDE4, 22), "bob's own grant stays"
            knock_v2(d, alice, CLIENT4, ["tcp/22"], 600)
            assert a.tcp_open(SERVER4, CLIENT4, 22)
            assert d.ctl("revoke", CLIENT4).stdout == "revoked 192.0.2.0/28:tcp/22\n", (
                "an address revokes the network grant that contains it"
            )
            assert not a.tcp_open(SERVER4, CLIENT4, 22) and a.tcp_open(SERVER4, INSIDE4, 22)
            assert opened(d) == {f"{INSIDE4} tcp/22"}

            # IPv6, UDP, and an expiry (by the kernel's timeout, or by the reaper)
            reply = knock_v2(d, alice, CLIENT6, ["udp/51820"], 3)
            assert reply["net"] == "2001:db8::10/124"
            assert a.udp_open(SERVER6, INSIDE6, 51820), "another address of the network"
            assert not a.udp_open(SERVER6, OTHER6, 51820), "an address outside it"
            assert "2001:db8::10/124 udp/51820" in opened(d)
            assert wait_until(lambda: not a.udp_open(SERVER6, INSIDE6, 51820, timeout=0.3), 8)
            assert wait_until(lambda: opened(d) == {f"{INSIDE4} tcp/22"}, 5), opened(d)
            assert wait_until(lambda: len(d.ctl("list", "--all", "--json").stdout) < 500, 5)
            assert [g["ip"] for g in d.list_json()] == [INSIDE4]
            assert status(d)[0] == 0
        except BaseException:
            print(d.diagnostics())
            raise


OLD_LAYOUT = """*filter
:WEBKNOCK - [0:0]
-I INPUT 1 -j WEBKNOCK
-A WEBKNOCK -m set --match-set WEBKNOCK{family} src,dst -j ACCEPT
COMMIT
"""


def test_an_ipset_of_the_layout_before_network_grants_is_replaced_keeping_its_grant(
    d: Deployment,
) -> None:
    """The sets and chain as the version before network grants made them (hash:ip,port),
    holding a live grant: webknockd's start replaces each set while connections go on."""
    if is_nft(d):
        pytest.skip("the nftables layout only gained sets: nothing to replace")
    a, site, ns = d.agent, d.site, d.lab.server
    d.ctl("grant", CLIENT4, "--port", "22", "--time", "600")
    site.stop_daemon()
    d.ctl("teardown")  # ours gone; the state file keeps the grant
    for family, tool, addr in ((4, "iptables-restore", CLIENT4), (6, "ip6tables-restore", "")):
        name = f"WEBKNOCK{family}"
        inet = "inet" if family == 4 else "inet6"
        ns.run(["ipset", "create", name, "hash:ip,port", "family", inet, "timeout", "0"])
        if addr:
            ns.run(["ipset", "add", name, f"{addr},tcp:22", "timeout", "500"])
        ns.run([tool, "--noflush"], input=OLD_LAYOUT.format(family=family))
    assert "Type: hash:ip,port" in ns.run(["ipset", "list", "-t", "WEBKNOCK4"]).stdout
    assert a.tcp_open(SERVER4, CLIENT4, 22)

    out = site.root / "probe.out"
    drops = listen_drops(d)
    probe = d.lab.client.popen([str(site.python), "-c", PROBE, "4", CLIENT4, SERVER4], log=out)
    try:
        time.sleep(0.5)
        site.start_daemon(ns)
    finally:
        probe.wait(15)
    ok, refused = map(int, out.read_text().split())
    gap = refused - (listen_drops(d) - drops)
    assert ok > 20 and gap <= 0, f"{gap} of {ok + refused} connects refused while replacing"
    for name in ("WEBKNOCK4", "WEBKNOCK6"):
        assert "Type: hash:net,port" in ns.run(["ipset", "list", "-t", name]).stdout
    assert set(ns.run(["ipset", "list", "-n"]).stdout.split()) == {"WEBKNOCK4", "WEBKNOCK6"}
    ((key, left),) = held(d)
    assert key == (CLIENT4, "tcp", 22) and 400 <= left <= 600
    assert status(d)[0] == 0
    alice = v2.SigningKey.generate()
    d.ctl("client", "add", "alice", "--key", alice.public_text(), "--open-prefix", "28")
    assert knock_v2(d, alice, CLIENT4, ["tcp/2222"], 60)["net"] == "192.0.2.0/28"
    assert a.tcp_open(SERVER4, OTHER4, 22) is False and a.tcp_open(SERVER4, CLIENT4, 2222)
