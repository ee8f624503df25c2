"""iptables backend: the exact restore files it feeds iptables-restore/ip6tables-restore."""

from __future__ import annotations

import dataclasses
import ipaddress

import pytest

from tests.fakes import SETTINGS, RecordingRunner
from webknock.server.firewall.base import FirewallError
from webknock.server.firewall.iptables import IptablesFirewall
from webknock.server.firewall.restorefile import restore_line
from webknock.server.grants import Entry, GrantKey

V4 = GrantKey(ipaddress.ip_address("192.0.2.10"), "tcp", 22)
V4U = GrantKey(ipaddress.ip_address("192.0.2.10"), "udp", 51820)
V6 = GrantKey(ipaddress.ip_address("2001:db8::10"), "tcp", 22)
NET4 = GrantKey(ipaddress.ip_address("198.51.100.0"), "tcp", 22, 24)
NET6 = GrantKey(ipaddress.ip_address("2001:db8:5::"), "udp", 51820, 64)
INNER4 = GrantKey(ipaddress.ip_address("198.51.100.7"), "tcp", 22)
NOW = 1_800_000_000.0

EMPTY_SAVE = "*filter\n:INPUT DROP [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"


def fw(runner: RecordingRunner, **kw: object) -> IptablesFirewall:
    return IptablesFirewall(dataclasses.replace(SETTINGS, **kw), runner)  # type: ignore[arg-type]


def test_apply_v4_and_v6_batches() -> None:
    runner = RecordingRunner()
    fw(runner).apply([Entry(V4, NOW + 60), Entry(V6, NOW + 60)], [], [V4U], now=NOW)
    assert runner.calls[0][0] == ["iptables-restore", "-w", "10", "--noflush"]
    assert runner.calls[0][1] == (
        "*filter\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-D WEBKNOCK-GRANTS -s 192.0.2.10/32 -p udp -m udp --dport 51820 -j ACCEPT\n"
        "COMMIT\n"
    )
    assert runner.calls[1][0] == ["ip6tables-restore", "-w", "10", "--noflush"]
    assert runner.calls[1][1] == (
        "*filter\n-A WEBKNOCK-GRANTS -s 2001:db8::10/128 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    )
    assert len(runner.calls) == 2


def test_renew_changes_nothing_in_a_linear_chain() -> None:
    runner = RecordingRunner()
    fw(runner).apply([], [Entry(V4, NOW + 60)], [], now=NOW)
    assert runner.calls == []


def test_v6_failure_undoes_v4() -> None:
    runner = RecordingRunner(fail="ip6tables-restore")
    with pytest.raises(FirewallError):
        fw(runner).apply([Entry(V4, NOW + 60), Entry(V6, NOW + 60)], now=NOW)
    v4 = runner.stdin_of("iptables-restore")
    assert len(v4) == 2
    assert "-D WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT" in v4[1]


def test_ensure_creates_chains_and_one_jump() -> None:
    runner = RecordingRunner({"iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner).ensure()
    batch = runner.stdin_of("iptables-restore")[0]
    assert batch == (
        "*filter\n"
        ":WEBKNOCK-GRANTS - [0:0]\n"
        ":WEBKNOCK - [0:0]\n"
        "-A WEBKNOCK -j WEBKNOCK-GRANTS\n"
        "-I INPUT 1 -j WEBKNOCK\n"
        "COMMIT\n"
    )
    assert runner.stdin_of("ip6tables-restore")[0] == batch


def test_ensure_keeps_grants_and_removes_duplicate_jumps() -> None:
    saved = (
        "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n:WEBKNOCK-GRANTS - [0:0]\n"
        "-A INPUT -j WEBKNOCK\n-A INPUT -j WEBKNOCK\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    )
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
    fw(runner).ensure()
    batch = runner.stdin_of("iptables-restore")[0]
    assert ":WEBKNOCK-GRANTS" not in batch  # declaring it would flush the grants
    assert "-I INPUT" not in batch
    assert batch.count("-D INPUT -j WEBKNOCK\n") == 1


def test_protect_rules_after_grants_with_established_first() -> None:
    runner = RecordingRunner({"iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=True).ensure()
    batch = runner.stdin_of("iptables-restore")[0]
    assert (
        "-A WEBKNOCK -j WEBKNOCK-GRANTS\n"
        "-A WEBKNOCK -p tcp -m multiport --dports 22,2222 -m conntrack --ctstate "
        "RELATED,ESTABLISHED -j ACCEPT\n"
        "-A WEBKNOCK -p tcp -m multiport --dports 22,2222 -j DROP\n"
        "-A WEBKNOCK -p udp -m multiport --dports 51820 -m conntrack --ctstate "
        "RELATED,ESTABLISHED -j ACCEPT\n"
        "-A WEBKNOCK -p udp -m multiport --dports 51820 -j DROP\n"
    ) in batch


def test_protect_splits_more_than_15_ports() -> None:
    runner = RecordingRunner({"iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=True, tcp_ports=frozenset(range(1000, 1020)), udp_ports=frozenset()).ensure()
    batch = runner.stdin_of("iptables-restore")[0]
    assert (
        "--dports 1000,1001,1002,1003,1004,1005,1006,1007,1008,1009,1010,1011,1012,1013,1014 -j DROP"
        in batch
    )
    assert "--dports 1015,1016,1017,1018,1019 -j DROP" in batch


def test_sync_flushes_and_refills_in_one_commit() -> None:
    saved = "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n:WEBKNOCK-GRANTS - [0:0]\n-A INPUT -j WEBKNOCK\nCOMMIT\n"
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": saved})
    fw(runner).sync([Entry(V4, NOW + 5), Entry(V4U, NOW + 5)], now=NOW)
    v4 = runner.stdin_of("iptables-restore")
    assert v4[-1] == (
        "*filter\n:WEBKNOCK-GRANTS - [0:0]\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p udp -m udp --dport 51820 -j ACCEPT\n"
        "COMMIT\n"
    )
    assert runner.stdin_of("ip6tables-restore")[-1] == "*filter\n:WEBKNOCK-GRANTS - [0:0]\nCOMMIT\n"


def test_listed_parses_save_output_with_duplicates() -> None:
    saved = (
        "*filter\n:WEBKNOCK-GRANTS - [0:0]\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A OTHER -s 192.0.2.99/32 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    )
    saved6 = "*filter\n-A WEBKNOCK-GRANTS -s 2001:db8::10/128 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": saved6})
    assert fw(runner).listed() == [V4, V4, V6]


def test_teardown_removes_jump_then_chains() -> None:
    saved = "*filter\n:INPUT DROP [0:0]\n:WEBKNOCK - [0:0]\n:WEBKNOCK-GRANTS - [0:0]\n-A INPUT -j WEBKNOCK\nCOMMIT\n"
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
    fw(runner).teardown()
    assert runner.stdin_of("iptables-restore") == [
        "*filter\n-D INPUT -j WEBKNOCK\n-F WEBKNOCK\n-F WEBKNOCK-GRANTS\n-X WEBKNOCK\n-X WEBKNOCK-GRANTS\nCOMMIT\n"
    ]
    assert runner.stdin_of("ip6tables-restore") == []  # nothing of ours there


def test_instance_chain_names() -> None:
    runner = RecordingRunner()
    fw(runner, chain="WK-office").apply([Entry(V4, NOW + 1)], now=NOW)
    assert "-A WK-office-GRANTS -s 192.0.2.10/32" in runner.calls[0][1]  # type: ignore[operator]


def test_network_grants_are_rules_of_their_network_beside_addresses_inside() -> None:
    runner = RecordingRunner()
    fw(runner).apply([Entry(NET4, NOW + 60), Entry(INNER4, NOW + 60)], [], [NET6], now=NOW)
    assert runner.stdin_of("iptables-restore") == [
        "*filter\n"
        "-A WEBKNOCK-GRANTS -s 198.51.100.0/24 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A WEBKNOCK-GRANTS -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "COMMIT\n"
    ]
    assert runner.stdin_of("ip6tables-restore") == [
        "*filter\n"
        "-D WEBKNOCK-GRANTS -s 2001:db8:5::/64 -p udp -m udp --dport 51820 -j ACCEPT\n"
        "COMMIT\n"
    ]


def test_listed_reads_network_grants_back() -> None:
    saved = (
        "*filter\n:WEBKNOCK-GRANTS - [0:0]\n"
        "-A WEBKNOCK-GRANTS -s 198.51.100.0/24 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A WEBKNOCK-GRANTS -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n"
    )
    saved6 = (
        "*filter\n"
        "-A WEBKNOCK-GRANTS -s 2001:db8:5::/64 -p udp -m udp --dport 51820 -j ACCEPT\nCOMMIT\n"
    )
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": saved6})
    assert fw(runner).listed() == [NET4, INNER4, NET6]
    held, _ = fw(runner).census()
    assert held == {4: 2, 6: 1}, "a network grant is one grant"


def test_sync_refills_network_grants() -> None:
    runner = RecordingRunner({"iptables-save": EMPTY_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner).sync([Entry(INNER4, NOW + 5), Entry(NET4, NOW + 5), Entry(NET6, NOW + 5)], now=NOW)
    assert runner.stdin_of("iptables-restore")[-1] == (
        "*filter\n:WEBKNOCK-GRANTS - [0:0]\n"
        "-A WEBKNOCK-GRANTS -s 198.51.100.0/24 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-A WEBKNOCK-GRANTS -s 198.51.100.7/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "COMMIT\n"
    )
    assert runner.stdin_of("ip6tables-restore")[-1] == (
        "*filter\n:WEBKNOCK-GRANTS - [0:0]\n"
        "-A WEBKNOCK-GRANTS -s 2001:db8:5::/64 -p udp -m udp --dport 51820 -j ACCEPT\n"
        "COMMIT\n"
    )


@pytest.mark.parametrize("token", ["a b", "x;y", "$(id)", "", "a\nb"])
def test_unsafe_tokens_refused(token: str) -> None:
    with pytest.raises(FirewallError, match="unsafe"):
        restore_line("-A", "WEBKNOCK", ("-s", token))


# -- forward on: container ports published through DNAT ----------------------------------

DOCKER_SAVE = (
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n"
    ":DOCKER - [0:0]\n:DOCKER-USER - [0:0]\n"
    "-A FORWARD -j DOCKER-USER\n-A FORWARD -o docker0 -j DOCKER\n"
    "-A DOCKER-USER -j RETURN\nCOMMIT\n"
)
FORWARD_CHAIN = (
    ":WEBKNOCK-FWD-G - [0:0]\n"
    ":WEBKNOCK-FWD - [0:0]\n"
    "-A WEBKNOCK-FWD -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN\n"
    "-A WEBKNOCK-FWD -j WEBKNOCK-FWD-G\n"
    "-A WEBKNOCK-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 22 -j DROP\n"
    "-A WEBKNOCK-FWD -p tcp -m conntrack --ctstate DNAT --ctorigdstport 2222 -j DROP\n"
    "-A WEBKNOCK-FWD -p udp -m conntrack --ctstate DNAT --ctorigdstport 51820 -j DROP\n"
)
FWD4 = "-s 192.0.2.10/32 -p tcp -m conntrack --ctstate DNAT --ctorigdstport 22 -j ACCEPT"


def test_ensure_with_forward_jumps_from_docker_user_or_else_forward() -> None:
    runner = RecordingRunner({"iptables-save": DOCKER_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=True, forward=True).ensure()
    v4, v6 = runner.stdin_of("iptables-restore")[0], runner.stdin_of("ip6tables-restore")[0]
    assert v4.endswith(FORWARD_CHAIN + "-I DOCKER-USER 1 -j WEBKNOCK-FWD\nCOMMIT\n"), v4
    assert v4.startswith("*filter\n:WEBKNOCK-GRANTS - [0:0]\n:WEBKNOCK - [0:0]\n")
    assert v6.endswith(FORWARD_CHAIN + "-I FORWARD 1 -j WEBKNOCK-FWD\nCOMMIT\n"), "no Docker"


def test_ensure_moves_the_jump_to_docker_user_once_docker_made_it() -> None:
    saved = DOCKER_SAVE.replace(
        "COMMIT",
        ":WEBKNOCK-FWD - [0:0]\n:WEBKNOCK-FWD-G - [0:0]\n-A FORWARD -j WEBKNOCK-FWD\n"
        "-A DOCKER-USER -j WEBKNOCK-FWD\n-A DOCKER-USER -j WEBKNOCK-FWD\n"
        f"-A WEBKNOCK-FWD-G {FWD4}\nCOMMIT",
    )
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=True, forward=True).ensure()
    v4 = runner.stdin_of("iptables-restore")[0]
    assert ":WEBKNOCK-FWD-G" not in v4, "declaring it would flush the forward grants"
    assert "-I DOCKER-USER" not in v4
    assert v4.endswith("-D DOCKER-USER -j WEBKNOCK-FWD\n-D FORWARD -j WEBKNOCK-FWD\nCOMMIT\n")


def test_ensure_with_forward_off_removes_a_forward_path_left_from_before() -> None:
    saved = DOCKER_SAVE.replace(
        "COMMIT",
        ":WEBKNOCK-FWD - [0:0]\n:WEBKNOCK-FWD-G - [0:0]\n"
        f"-A DOCKER-USER -j WEBKNOCK-FWD\n-A WEBKNOCK-FWD-G {FWD4}\nCOMMIT",
    )
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
    fw(runner, protect=True).ensure()
    assert runner.stdin_of("iptables-restore")[0].endswith(
        "-D DOCKER-USER -j WEBKNOCK-FWD\n-F WEBKNOCK-FWD\n-F WEBKNOCK-FWD-G\n"
        "-X WEBKNOCK-FWD\n-X WEBKNOCK-FWD-G\nCOMMIT\n"
    )
    assert "FWD" not in runner.stdin_of("ip6tables-restore")[0], "nothing of it there"


def test_apply_with_forward_adds_both_rules_of_a_grant_in_one_file() -> None:
    runner = RecordingRunner()
    fw(runner, forward=True).apply([Entry(V4, NOW + 60)], [], [NET4], now=NOW)
    assert runner.stdin_of("iptables-restore") == [
        "*filter\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        f"-A WEBKNOCK-FWD-G {FWD4}\n"
        "-D WEBKNOCK-GRANTS -s 198.51.100.0/24 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        "-D WEBKNOCK-FWD-G -s 198.51.100.0/24 -p tcp -m conntrack --ctstate DNAT "
        "--ctorigdstport 22 -j ACCEPT\n"
        "COMMIT\n"
    ]


def test_forward_v6_failure_undoes_both_rules_of_v4() -> None:
    runner = RecordingRunner(fail="ip6tables-restore")
    with pytest.raises(FirewallError):
        fw(runner, forward=True).apply([Entry(V4, NOW + 60), Entry(V6, NOW + 60)], now=NOW)
    assert runner.stdin_of("iptables-restore")[1] == (
        "*filter\n"
        "-D WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        f"-D WEBKNOCK-FWD-G {FWD4}\n"
        "COMMIT\n"
    )


def test_sync_with_forward_refills_both_grant_chains_in_one_commit() -> None:
    runner = RecordingRunner({"iptables-save": DOCKER_SAVE, "ip6tables-save": EMPTY_SAVE})
    fw(runner, forward=True).sync([Entry(V4, NOW + 5)], now=NOW)
    assert runner.stdin_of("iptables-restore")[-1] == (
        "*filter\n:WEBKNOCK-GRANTS - [0:0]\n:WEBKNOCK-FWD-G - [0:0]\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        f"-A WEBKNOCK-FWD-G {FWD4}\n"
        "COMMIT\n"
    )


def test_teardown_removes_the_forward_path_whatever_the_setting() -> None:
    saved = DOCKER_SAVE.replace(
        "COMMIT",
        ":WEBKNOCK - [0:0]\n:WEBKNOCK-GRANTS - [0:0]\n:WEBKNOCK-FWD - [0:0]\n"
        ":WEBKNOCK-FWD-G - [0:0]\n-A INPUT -j WEBKNOCK\n-A DOCKER-USER -j WEBKNOCK-FWD\n"
        "-A FORWARD -j WEBKNOCK-FWD\nCOMMIT",
    )
    runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
    fw(runner).teardown()  # forward off now: what forward = yes left goes all the same
    assert runner.stdin_of("iptables-restore") == [
        "*filter\n-D DOCKER-USER -j WEBKNOCK-FWD\n-D FORWARD -j WEBKNOCK-FWD\n"
        "-F WEBKNOCK-FWD\n-F WEBKNOCK-FWD-G\n-X WEBKNOCK-FWD\n-X WEBKNOCK-FWD-G\n"
        "-D INPUT -j WEBKNOCK\n-F WEBKNOCK\n-F WEBKNOCK-GRANTS\n-X WEBKNOCK\n-X WEBKNOCK-GRANTS\n"
        "COMMIT\n"
    ]


def saved_with_forward(forward_grants: int = 1, jump: str = "DOCKER-USER") -> str:
    """An iptables-save of ensure() with forward on and protect, holding the grant V4."""
    body = FORWARD_CHAIN.replace(":WEBKNOCK-FWD - [0:0]\n", "").replace(
        ":WEBKNOCK-FWD-G - [0:0]\n", ""
    )
    return DOCKER_SAVE.replace(
        "COMMIT",
        ":WEBKNOCK - [0:0]\n:WEBKNOCK-GRANTS - [0:0]\n:WEBKNOCK-FWD - [0:0]\n"
        ":WEBKNOCK-FWD-G - [0:0]\n-A INPUT -j WEBKNOCK\n"
        f"-A {jump} -j WEBKNOCK-FWD\n"
        "-A WEBKNOCK -j WEBKNOCK-GRANTS\n"
        "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT\n"
        + body
        + f"-A WEBKNOCK-FWD-G {FWD4}\n" * forward_grants
        + "COMMIT",
    )


def test_census_checks_the_forward_path() -> None:
    def census(saved: str, **kw: bool) -> list[str]:
        runner = RecordingRunner({"iptables-save": saved, "ip6tables-save": EMPTY_SAVE})
        return [p for p in fw(runner, **kw).census()[1] if p.startswith("IPv4")]

    assert census(saved_with_forward(), forward=True) == []
    assert census(saved_with_forward(0), forward=True) == [
        "IPv4: chain WEBKNOCK-FWD-G holds 0 grant(s), not 1"
    ]
    assert census(saved_with_forward(jump="FORWARD"), forward=True) == [
        "IPv4: WEBKNOCK-FWD is not jumped to once, from DOCKER-USER"
    ]
    assert census(saved_with_forward(), forward=False) == [
        "IPv4: chain WEBKNOCK-FWD present, forward is off"
    ]
    assert census(DOCKER_SAVE, forward=True) == [
        "IPv4: chain WEBKNOCK, WEBKNOCK-GRANTS missing",
        "IPv4: INPUT jumps to WEBKNOCK 0 times, not once",
        "IPv4: chain WEBKNOCK does not hold its 1 rule(s)",
        "IPv4: chain WEBKNOCK-FWD, WEBKNOCK-FWD-G missing",
        "IPv4: WEBKNOCK-FWD is not jumped to once, from DOCKER-USER",
        "IPv4: chain WEBKNOCK-FWD does not hold its 5 rule(s)",
    ]


def test_docker_user_is_the_container_chain_iptables_sees() -> None:
    seen = RecordingRunner({"iptables-save": DOCKER_SAVE})
    assert IptablesFirewall.container_chain(seen) == "iptables chain DOCKER-USER exists"
    assert seen.calls == [(["iptables-save", "-t", "filter"], None)]
    assert IptablesFirewall.container_chain(RecordingRunner({"iptables-save": EMPTY_SAVE})) is None
    assert IptablesFirewall.container_chain(RecordingRunner(fail="iptables-save")) is None
