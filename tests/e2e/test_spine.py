"""A v1 knock through real nginx+fcgiwrap and Apache opens real iptables rules.

Server namespace: INPUT policy DROP except HTTP; webknockd running; listeners on the
offered ports. Client namespace: 192.0.2.10 / 2001:db8::10 plus a second address that
must stay blocked.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from tests.lab import (
    CLIENT4,
    CLIENT6,
    NOT_OFFERED_TCP,
    OTHER4,
    OTHER6,
    SERVER4,
    SERVER6,
    Deployment,
    deployment,
    wait_until,
    watched_deployment,
)


@pytest.fixture(params=["nginx", "apache"])
def server(request: pytest.FixtureRequest) -> Iterator[Deployment]:
    with watched_deployment(request.param) as d:
        yield d


@pytest.fixture
def nginx() -> Iterator[Deployment]:
    with deployment("nginx") as d:
        yield d


def grants_of(d: Deployment, ip: str) -> list[tuple[str, int]]:
    return sorted((g["proto"], g["port"]) for g in d.list_json() if g["ip"] == ip)


def test_knock_opens_exactly_the_knocking_address(server: Deployment) -> None:
    a = server.agent
    assert not a.tcp_open(SERVER4, CLIENT4, 22), "port must start closed"
    info = a.getinfo(SERVER4, CLIENT4)
    assert info["status"] == 200 and info["reply"]["ip"] == CLIENT4
    assert info["reply"]["tcp"] == [22, 2222] and info["reply"]["udp"] == [51820]

    r = a.knock(SERVER4, CLIENT4, [("tcp", 22), ("udp", 51820), ("tcp", NOT_OFFERED_TCP)], time=600)
    assert r["status"] == 200 and r["reply"]["success"] is True
    assert abs(r["reply"]["expires"] - (time.time() + 600)) < 5
    assert a.tcp_open(SERVER4, CLIENT4, 22)
    assert a.udp_open(SERVER4, CLIENT4, 51820)
    assert not a.tcp_open(SERVER4, CLIENT4, 2222), "a port not asked for stays closed"
    assert not a.tcp_open(SERVER4, CLIENT4, NOT_OFFERED_TCP), "a port not offered stays closed"
    assert not a.tcp_open(SERVER4, OTHER4, 22), "another address stays blocked"
    assert grants_of(server, CLIENT4) == [("tcp", 22), ("udp", 51820)]

    r6 = a.knock(SERVER6, CLIENT6, [("tcp", 22), ("udp", 51820)], time=600)
    assert r6["status"] == 200 and r6["reply"]["success"] is True
    assert a.tcp_open(SERVER6, CLIENT6, 22)
    assert a.udp_open(SERVER6, CLIENT6, 51820)
    assert not a.tcp_open(SERVER6, OTHER6, 22), "another v6 address stays blocked"
    rules6 = [r for r in server.iptables_rules(6) if "GRANTS -s" in r]
    assert rules6 == [
        "-A WEBKNOCK-GRANTS -s 2001:db8::10/128 -p tcp -m tcp --dport 22 -j ACCEPT",
        "-A WEBKNOCK-GRANTS -s 2001:db8::10/128 -p udp -m udp --dport 51820 -j ACCEPT",
    ]
    assert server.iptables_rules(4).count("-A INPUT -j WEBKNOCK") == 1


def test_packet_ip_must_match_peer(server: Deployment) -> None:
    r = server.agent.knock(SERVER4, CLIENT4, [("tcp", 22)], ip=OTHER4)
    assert r["status"] == 403
    assert server.list_json() == []


def test_renew_extends_without_duplicate_rules(server: Deployment) -> None:
    a = server.agent
    first = a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=100)["reply"]["expires"]
    time.sleep(1.1)
    second = a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=100)["reply"]["expires"]
    assert second > first
    (grant,) = server.list_json()
    assert grant["renew_count"] == 1 and grant["expires"] == second
    assert sum("GRANTS -s 192.0.2.10/32" in r for r in server.iptables_rules(4)) == 1


def test_expiry_closes(nginx: Deployment) -> None:
    a = nginx.agent
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=3)["reply"]["success"]
    assert a.tcp_open(SERVER4, CLIENT4, 22)
    reaped = lambda: nginx.ctl("list", "--all", "--json").stdout.strip() == "[]"  # noqa: E731
    assert wait_until(reaped, 10), "daemon did not expire the grant"
    assert not a.tcp_open(SERVER4, CLIENT4, 22)
    assert not [r for r in nginx.iptables_rules(4) if "GRANTS -s" in r]


def test_revoke_closes(nginx: Deployment) -> None:
    a = nginx.agent
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22), ("tcp", 2222)], time=600)["reply"]["success"]
    out = nginx.ctl("revoke", CLIENT4, "--port", "2222")
    assert "revoked" in out.stdout
    assert a.tcp_open(SERVER4, CLIENT4, 22) and not a.tcp_open(SERVER4, CLIENT4, 2222)
    nginx.ctl("revoke", CLIENT4)
    assert not a.tcp_open(SERVER4, CLIENT4, 22)
    assert nginx.list_json() == []
    assert nginx.ctl("revoke", CLIENT4, check=False).returncode == 1


def test_restart_and_flush_restore_grants(nginx: Deployment) -> None:
    a, site, ns = nginx.agent, nginx.site, nginx.lab.server
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]
    assert a.knock(SERVER6, CLIENT6, [("udp", 51820)], time=600)["reply"]["success"]
    site.stop_daemon()
    site.start_daemon(ns)
    assert a.tcp_open(SERVER4, CLIENT4, 22) and a.udp_open(SERVER6, CLIENT6, 51820)

    site.stop_daemon(kill=True)
    ns.run(["iptables", "-F", "WEBKNOCK-GRANTS"])
    ns.run(["ip6tables", "-F", "WEBKNOCK-GRANTS"])
    assert not a.tcp_open(SERVER4, CLIENT4, 22)
    status = nginx.ctl("status", check=False)
    assert status.returncode == 3 and "DIFFERS" in status.stdout
    site.start_daemon(ns)
    assert a.tcp_open(SERVER4, CLIENT4, 22) and a.udp_open(SERVER6, CLIENT6, 51820)
    assert nginx.ctl("status").returncode == 0
    rules = [r for r in nginx.iptables_rules(4) + nginx.iptables_rules(6) if "GRANTS -s" in r]
    assert len(rules) == 2


def test_reap_from_cron_when_daemon_is_down(nginx: Deployment) -> None:
    a, site = nginx.agent, nginx.site
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=2)["reply"]["success"]
    site.stop_daemon()
    time.sleep(2.5)
    assert a.tcp_open(SERVER4, CLIENT4, 22), "linear chain: open until reaped"
    nginx.ctl("reap")
    assert not a.tcp_open(SERVER4, CLIENT4, 22)
    assert nginx.list_json() == []


def test_daemon_down_means_504_not_success(nginx: Deployment) -> None:
    nginx.site.stop_daemon()
    r = nginx.agent.knock(SERVER4, CLIENT4, [("tcp", 22)], time=60)
    assert r["status"] == 504
    assert not nginx.agent.tcp_open(SERVER4, CLIENT4, 22)


def test_protect_closes_offered_ports_but_keeps_established_sessions() -> None:
    """protect = yes on a host whose own policy is ACCEPT: offered ports need a grant."""
    with deployment("nginx", protect=True, close_firewall=False) as d:
        a = d.agent
        assert a.tcp_open(SERVER4, CLIENT4, NOT_OFFERED_TCP), "ports not offered are untouched"
        assert not a.tcp_open(SERVER4, CLIENT4, 22)
        assert not a.udp_open(SERVER6, CLIENT6, 51820)
        assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]
        assert a.tcp_open(SERVER4, CLIENT4, 22)
        held = a.hold(SERVER4, CLIENT4, 22)
        try:
            d.ctl("revoke", CLIENT4)
            assert not a.tcp_open(SERVER4, CLIENT4, 22), "revoked: new connections refused"
            assert held.stdin is not None and held.stdout is not None
            held.stdin.write("\n")
            held.stdin.flush()
            result = json.loads(held.stdout.read())
            assert result == {"first": True, "second": True}, "established session dropped"
        finally:
            held.kill()
            held.communicate(timeout=5)
