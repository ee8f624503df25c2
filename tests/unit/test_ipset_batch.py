"""iptables+ipset backend: the exact ``ipset restore`` and ``iptables-restore`` files, network
grants beside addresses, and the replacement of an older version's ``hash:ip,port`` set."""

from __future__ import annotations

import dataclasses
import ipaddress
from typing import Any

import pytest

from tests.fakes import SETTINGS, RecordingRunner
from webknock.server.firewall import build_backend
from webknock.server.firewall.base import FirewallError
from webknock.server.firewall.ipset import IpsetFirewall, parse_element
from webknock.server.firewall.iptables import IptablesFirewall
from webknock.server.grants import Entry, GrantKey

V4 = GrantKey(ipaddress.ip_address("192.0.2.10"), "tcp", 22)
V4U = GrantKey(ipaddress.ip_address("192.0.2.10"), "udp", 51820)
V6 = GrantKey(ipaddress.ip_address("2001:db8::10"), "tcp", 22)
NET4 = GrantKey(ipaddress.ip_address("198.51.100.0"), "tcp", 22, 24)
INNER4 = GrantKey(ipaddress.ip_address("198.51.100.7"), "tcp", 22)
NET6 = GrantKey(ipaddress.ip_address("2001:db8:5::"), "udp", 51820, 64)
NOW = 1_800_000_000.0
EMPTY_SAVE = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
CREATE4 = "create WEBKNOCK4 hash:net,port family inet timeout 0 maxelem 1048576\n"
CREATE6 = "create WEBKNOCK6 hash:net,port family inet6 timeout 0 maxelem 1048576\n"


def fw(runner: RecordingRunner, **kw: Any) -> IpsetFirewall:
    return IpsetFirewall(dataclasses.replace(SETTINGS, **kw), runner)


def test_add_v4_v6_renew_and_remove_are_one_restore_file() -> None:
    runner = RecordingRunner()
    fw(runner).apply([Entry(V6, NOW + 60)], [Entry(V4, NOW + 3599.2)], [V4U], now=NOW)
    assert runner.calls == [
        (
            ["ipset", "-exist", "restore"],
            "add WEBKNOCK4 192.0.2.10,tcp:22 timeout 3600\n"
            "del WEBKNOCK4 192.0.2.10,udp:51820\n"
            "add WEBKNOCK6 2001:db8::10,tcp:22 timeout 60\n",
        )
    ]


def test_empty_batch_runs_nothing() -> None:
    runner = RecordingRunner()
    fw(runner).apply(now=NOW)
    assert runner.calls == []


@pytest.mark.parametrize("protect", [False, True])
def test_ensure_creates_sets_then_the_chain_matching_them(protect: bool) -> None:
    runner = RecordingRunner({"iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=protect).ensure()
    assert runner.calls[0] == (["ipset", "list", "-t"], None)  # no set of an older type
    assert runner.calls[1] == (["ipset", "-exist", "restore"], CREATE4 + CREATE6)
    v4, v6 = runner.stdin_of("iptables-restore"), runner.stdin_of("ip6tables-restore")
    rules = ""
    if protect:
        rules = (
            "-A WEBKNOCK -p tcp -m multiport --dports 22,2222 -m conntrack --ctstate "
            "RELATED,ESTABLISHED -j ACCEPT\n"
            "-A WEBKNOCK -p tcp -m multiport --dports 22,2222 -j DROP\n"
            "-A WEBKNOCK -p udp -m multiport --dports 51820 -m conntrack --ctstate "
            "RELATED,ESTABLISHED -j ACCEPT\n"
            "-A WEBKNOCK -p udp -m multiport --dports 51820 -j DROP\n"
        )
    for batch, family in ((v4, 4), (v6, 6)):
        assert batch == [
            "*filter\n"
            ":WEBKNOCK - [0:0]\n"
            f"-A WEBKNOCK -m set --match-set WEBKNOCK{family} src,dst -j ACCEPT\n"
            + rules
            + "-I INPUT 1 -j WEBKNOCK\nCOMMIT\n"
        ]


def test_ensure_removes_a_grants_chain_left_by_the_linear_variant() -> None:
    left = EMPTY_SAVE.replace("COMMIT", ":WEBKNOCK-GRANTS - [0:0]\nCOMMIT")
    runner = RecordingRunner({"iptables-save": left, "ip6tables-save": EMPTY_SAVE})
    fw(runner).ensure()
    assert runner.stdin_of("iptables-restore") == [
        "*filter\n:WEBKNOCK - [0:0]\n"
        "-A WEBKNOCK -m set --match-set WEBKNOCK4 src,dst -j ACCEPT\n"
        "-I INPUT 1 -j WEBKNOCK\n-F WEBKNOCK-GRANTS\n-X WEBKNOCK-GRANTS\nCOMMIT\n"
    ]
    assert "GRANTS" not in runner.stdin_of("ip6tables-restore")[0]


def test_sync_fills_fresh_sets_and_swaps_them_in() -> None:
    runner = RecordingRunner({"iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner).sync([Entry(V6, NOW + 10), Entry(V4, NOW + 20)], now=NOW)
    assert runner.stdin_of("ipset")[-1] == (
        "create WEBKNOCK4-new hash:net,port family inet timeout 0 maxelem 1048576\n"
        "flush WEBKNOCK4-new\n"
        "add WEBKNOCK4-new 192.0.2.10,tcp:22 timeout 20\n"
        "swap WEBKNOCK4-new WEBKNOCK4\n"
        "destroy WEBKNOCK4-new\n"
        "create WEBKNOCK6-new hash:net,port family inet6 timeout 0 maxelem 1048576\n"
        "flush WEBKNOCK6-new\n"
        "add WEBKNOCK6-new 2001:db8::10,tcp:22 timeout 10\n"
        "swap WEBKNOCK6-new WEBKNOCK6\n"
        "destroy WEBKNOCK6-new\n"
    )


def test_teardown_removes_hook_chain_then_only_our_sets() -> None:
    saved = (
        "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n-A INPUT -j WEBKNOCK\n"
        "-A WEBKNOCK -m set --match-set WEBKNOCK4 src,dst -j ACCEPT\nCOMMIT\n"
    )
    runner = RecordingRunner(
        {"iptables-save": saved, "ip6tables-save": EMPTY_SAVE, "ipset": "OTHER\nWEBKNOCK4\n"}
    )
    fw(runner).teardown()
    assert runner.stdin_of("iptables-restore") == [
        "*filter\n-D INPUT -j WEBKNOCK\n-F WEBKNOCK\n-X WEBKNOCK\nCOMMIT\n"
    ]
    assert runner.calls[-1] == (["ipset", "-exist", "restore"], "destroy WEBKNOCK4\n")


def test_listed_parses_ipset_save() -> None:
    out = (
        "create WEBKNOCK4 hash:ip,port family inet hashsize 1024 maxelem 1048576 timeout 0\n"
        "add WEBKNOCK4 192.0.2.10,tcp:22 timeout 99\n"
        "add WEBKNOCK4 192.0.2.10,udp:51820 timeout 5\n"
        "add WEBKNOCK6 2001:db8::10,tcp:22 timeout 5\n"
        "add WEBKNOCK4 bogus timeout 5\n"
    )
    runner = RecordingRunner({"ipset": out})
    assert fw(runner).listed() == [V4, V4U, V6]  # each set only its own lines
    assert runner.calls[0][0] == ["ipset", "save", "WEBKNOCK4"]
    assert parse_element("2001:db8::10,tcp:22") == V6
    assert parse_element("192.0.2.10,icmp:0") is None


def test_census_counts_set_entries_and_checks_the_chain() -> None:
    saved = (
        "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n-A INPUT -j WEBKNOCK\n"
        "-A WEBKNOCK -m set --match-set WEBKNOCK4 src,dst -j ACCEPT\nCOMMIT\n"
    )
    terse = "Name: WEBKNOCK4\nType: hash:net,port\nNumber of entries: 3\nMembers:\n"
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": saved, "ipset": terse})
    held, problems = fw(runner).census()
    assert held == {4: 3, 6: 3}
    assert problems == ["IPv6: chain WEBKNOCK does not hold its 1 rule(s)"]  # v6 matches set 4


def test_build_picks_the_variant_from_the_ipset_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/sbin/{tool}")
    runner = RecordingRunner()
    assert (
        type(build_backend(IptablesFirewall, SETTINGS, runner)) is IpsetFirewall
    )  # auto, ipset works
    linear = dataclasses.replace(SETTINGS, ipset="no")
    assert type(build_backend(IptablesFirewall, linear, runner)) is IptablesFirewall
    broken = RecordingRunner(fail="ipset")
    auto = build_backend(IptablesFirewall, SETTINGS, broken)
    assert type(auto) is IptablesFirewall, "auto falls back to the linear chain"
    with pytest.raises(FirewallError, match="ipset = yes but ipset is unusable"):
        build_backend(IptablesFirewall, dataclasses.replace(SETTINGS, ipset="yes"), broken)


def test_network_grants_are_elements_of_the_same_sets() -> None:
    runner = RecordingRunner()
    fw(runner).apply([Entry(NET4, NOW + 60), Entry(INNER4, NOW + 30)], [], [NET6], now=NOW)
    assert runner.stdin_of("ipset") == [
        "add WEBKNOCK4 198.51.100.0/24,tcp:22 timeout 60\n"
        "add WEBKNOCK4 198.51.100.7,tcp:22 timeout 30\n"
        "del WEBKNOCK6 2001:db8:5::/64,udp:51820\n"
    ]


def test_listed_reads_network_elements_back() -> None:
    runner = RecordingRunner(
        {
            "ipset save WEBKNOCK4": "create WEBKNOCK4 hash:net,port family inet timeout 0\n"
            "add WEBKNOCK4 198.51.100.7,tcp:22 timeout 5\n"
            "add WEBKNOCK4 198.51.100.0/24,tcp:22 timeout 99\n",
            "ipset save WEBKNOCK6": "add WEBKNOCK6 2001:db8:5::/64,udp:51820 timeout 9\n",
        }
    )
    assert fw(runner).listed() == [INNER4, NET4, NET6]
    assert parse_element("198.51.100.0/24,tcp:22") == NET4
    assert parse_element("192.0.2.10/32,tcp:22") == V4, "a /32 is the address alone"
    assert parse_element("198.51.100.7/24,tcp:22") is None, "host bits set: not ours"


OLD_SETS = (
    "Name: OTHER\nType: hash:ip,port\nNumber of entries: 0\n\n"
    "Name: WEBKNOCK4\nType: hash:ip,port\nRevision: 6\nReferences: 1\nNumber of entries: 2\n\n"
    "Name: WEBKNOCK6\nType: hash:ip,port\nRevision: 6\nReferences: 1\nNumber of entries: 0\n"
)
OLD_SAVED = (
    "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n-A INPUT -j WEBKNOCK\n"
    "-A WEBKNOCK -m set --match-set WEBKNOCK4 src,dst -j ACCEPT\nCOMMIT\n"
)


def test_ensure_replaces_a_set_of_an_older_version_keeping_its_elements() -> None:
    """hash:ip,port cannot hold networks, cannot be swapped with a hash:net,port set, and
    cannot be destroyed or renamed while the chain uses it: the chain is pointed at a copy
    while the set is made anew, then back; every step keeps every element matched."""
    runner = RecordingRunner(
        {
            "ipset list -t": OLD_SETS,
            "ipset save WEBKNOCK4": "create WEBKNOCK4 hash:ip,port family inet hashsize 1024\n"
            "add WEBKNOCK4 192.0.2.10,tcp:22 timeout 99\n"
            "add WEBKNOCK4 192.0.2.10,udp:51820 timeout 5\n",
            "ipset save WEBKNOCK4-new": "create WEBKNOCK4-new hash:net,port family inet\n"
            "add WEBKNOCK4-new 192.0.2.10,tcp:22 timeout 98\n"
            "add WEBKNOCK4-new 192.0.2.10,udp:51820 timeout 4\n",
            "ipset save WEBKNOCK6": "create WEBKNOCK6 hash:ip,port family inet6\n",
            "iptables-save": OLD_SAVED,
            "ip6tables-save": OLD_SAVED.replace("WEBKNOCK4", "WEBKNOCK6"),
        }
    )
    fw(runner).ensure()
    steps = [
        (argv[:2] if argv[0] == "ipset" else argv[:1], stdin)
        for argv, stdin in runner.calls
        if "save" not in argv[0] and argv[:2] != ["ipset", "save"]
    ]
    create4 = "create WEBKNOCK4{} hash:net,port family inet timeout 0 maxelem 1048576\n"
    create6 = "create WEBKNOCK6{} hash:net,port family inet6 timeout 0 maxelem 1048576\n"
    match = (
        "*filter\n:WEBKNOCK - [0:0]\n-A WEBKNOCK -m set --match-set {} src,dst -j ACCEPT\nCOMMIT\n"
    )
    assert steps == [
        (["ipset", "list"], None),
        (
            ["ipset", "-exist"],
            create4.format("-new") + "flush WEBKNOCK4-new\n"
            "add WEBKNOCK4-new 192.0.2.10,tcp:22 timeout 99\n"
            "add WEBKNOCK4-new 192.0.2.10,udp:51820 timeout 5\n",
        ),
        (["iptables-restore"], match.format("WEBKNOCK4-new")),
        (
            ["ipset", "-exist"],
            "destroy WEBKNOCK4\n"
            + create4.format("")
            + "add WEBKNOCK4 192.0.2.10,tcp:22 timeout 98\n"
            "add WEBKNOCK4 192.0.2.10,udp:51820 timeout 4\n",
        ),
        (["iptables-restore"], match.format("WEBKNOCK4")),
        (["ipset", "-exist"], "destroy WEBKNOCK4-new\n"),
        (["ipset", "-exist"], create6.format("-new") + "flush WEBKNOCK6-new\n"),
        (["ip6tables-restore"], match.format("WEBKNOCK6-new")),
        (["ipset", "-exist"], "destroy WEBKNOCK6\n" + create6.format("")),
        (["ip6tables-restore"], match.format("WEBKNOCK6")),
        (["ipset", "-exist"], "destroy WEBKNOCK6-new\n"),
        (["ipset", "-exist"], create4.format("") + create6.format("")),  # as on every ensure
        (["iptables-restore"], match.format("WEBKNOCK4")),
        (["ip6tables-restore"], match.format("WEBKNOCK6")),
    ]


def test_ensure_leaves_sets_of_the_current_type_alone() -> None:
    current = OLD_SETS.replace("hash:ip,port", "hash:net,port")
    runner = RecordingRunner(
        {"ipset list -t": current, "iptables-save": OLD_SAVED, "ip6tables-save": EMPTY_SAVE}
    )
    fw(runner).ensure()
    assert runner.stdin_of("ipset") == ["", CREATE4 + CREATE6]
    assert not [argv for argv, _ in runner.calls if argv[:2] == ["ipset", "save"]]


def test_ensure_destroys_a_fresh_set_an_older_version_left() -> None:
    left = "Name: WEBKNOCK4-new\nType: hash:ip,port\nReferences: 0\n"
    runner = RecordingRunner(
        {"ipset list -t": left, "iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE}
    )
    fw(runner).ensure()
    assert runner.stdin_of("ipset")[:3] == ["", "destroy WEBKNOCK4-new\n", CREATE4 + CREATE6]


def test_census_names_a_set_of_an_older_type() -> None:
    saved = (
        "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n-A INPUT -j WEBKNOCK\n"
        "-A WEBKNOCK -m set --match-set WEBKNOCK4 src,dst -j ACCEPT\nCOMMIT\n"
    )
    terse = "Name: WEBKNOCK4\nType: hash:ip,port\nNumber of entries: 3\nMembers:\n"
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE, "ipset": terse})
    _, problems = fw(runner).census()
    assert "IPv4: set WEBKNOCK4 is hash:ip,port, not hash:net,port" in problems


def test_forward_on_takes_the_linear_chain(monkeypatch: pytest.MonkeyPatch) -> None:
    """ipset sets match the packet's own port, not a DNAT'ed connection's original one."""
    monkeypatch.setattr("shutil.which", lambda tool: f"/usr/sbin/{tool}")
    forward = dataclasses.replace(SETTINGS, forward=True, protect=True)
    linear = build_backend(IptablesFirewall, forward, RecordingRunner())
    assert type(linear) is IptablesFirewall and linear.settings.forward
    with pytest.raises(FirewallError, match="forward needs the linear iptables chain"):
        build_backend(
            IptablesFirewall, dataclasses.replace(forward, ipset="yes"), RecordingRunner()
        )


def test_ensure_removes_a_forward_path_the_linear_chain_left() -> None:
    saved = EMPTY_SAVE.replace(
        "COMMIT",
        ":WEBKNOCK-FWD - [0:0]\n:WEBKNOCK-FWD-G - [0:0]\n-A FORWARD -j WEBKNOCK-FWD\nCOMMIT",
    )
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=True).ensure()
    assert runner.stdin_of("iptables-restore")[0].endswith(
        "-D FORWARD -j WEBKNOCK-FWD\n-F WEBKNOCK-FWD\n-F WEBKNOCK-FWD-G\n"
        "-X WEBKNOCK-FWD\n-X WEBKNOCK-FWD-G\nCOMMIT\n"
    )
