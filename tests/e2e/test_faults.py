"""Faults on a real deployment (nginx + fcgiwrap + webknockd + iptables in namespaces):

* ``kill -9`` of webknockd in the middle of a burst of knocks, three times, with restarts:
  every grant a client was told about is in the firewall, none twice, none past its expiry;
* the firewall flushed, reloaded or unhooked by someone else is restored within 2 s;
* the daemon applying, cron ``reap`` and ``webknockctl revoke`` all at once, 1 000
  operations: the state file and the firewall agree exactly afterwards.
"""

from __future__ import annotations

import collections
import json
import os
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.cgi_side import Waiting, reply, submit
from tests.e2e.test_hostile import run_client
from tests.lab import (
    BASE_FIREWALL,
    CLIENT4,
    CLIENT6,
    SERVER4,
    SERVER6,
    Deployment,
    deployment,
    wait_for,
)
from webknock.addresses import parse_address
from webknock.config import load

GRANT = re.compile(
    r"-A WEBKNOCK-GRANTS -s (\S+)/(?:32|128) -p (tcp|udp) -m (?:tcp|udp) --dport (\d+) -j ACCEPT"
)


@pytest.fixture
def nginx() -> Iterator[Deployment]:
    with deployment("nginx") as d:
        try:
            yield d
        except BaseException:
            print(d.diagnostics())
            raise


def kernel_grants(d: Deployment) -> list[tuple[str, str, int]]:
    """Every grant rule the kernel holds, v4 and v6, duplicates kept."""
    out = []
    for line in d.iptables_rules(4) + d.iptables_rules(6):
        m = GRANT.fullmatch(line)
        if m:
            out.append((str(parse_address(m[1])), m[2], int(m[3])))
    return out


def state_grants(d: Deployment) -> dict[tuple[str, str, int], dict[str, Any]]:
    grants = json.loads(d.ctl("list", "--all", "--json").stdout)
    return {(g["ip"], g["proto"], g["port"]): g for g in grants}


def spool_empty(d: Deployment) -> bool:
    spool = d.site.spool
    pending = [n for n in os.listdir(spool / "requests") if not n.startswith(".")]
    return not pending and not os.listdir(spool / "claimed")


def add_client_addresses(d: Deployment, n: int) -> list[str]:
    """n more IPv6 source addresses for the client (one `ip -batch`)."""
    addrs = [f"2001:db8::1:{i:x}" for i in range(1, n + 1)]
    batch = "".join(f"addr add {a}/64 dev {d.lab.client_if} nodad\n" for a in addrs)
    d.lab.client.run(["ip", "-batch", "-"], input=batch)
    return addrs


def test_kill_9_mid_burst_loses_and_duplicates_nothing(nginx: Deployment) -> None:
    d = nginx
    addrs = add_client_addresses(d, 240)
    knocks = [[a, 4 if i % 3 == 0 else 600] for i, a in enumerate(addrs)]  # some expire soon
    burst: dict[str, Any] = {}

    def run_burst() -> None:
        spec = {"action": "burst", "knocks": knocks, "threads": 8, "budget": 150}
        burst.update(run_client(d, spec, wall=200))

    def granted() -> int:  # webknockd logs a line per grant, after answering
        return d.site.daemon_log.read_bytes().count(b" open ")

    thread = threading.Thread(target=run_burst)
    thread.start()
    kills = 0  # SIGKILLs that landed while the burst was still sending
    try:
        for _ in range(3):
            mark = granted()

            def grew(m: int = mark) -> bool:
                return granted() >= m + 15

            wait_for(grew, 30)  # mid-burst
            in_flight = thread.is_alive()
            d.site.stop_daemon(kill=True)  # SIGKILL: no cleanup of any kind
            kills += in_flight
            time.sleep(0.7)
            d.site.start_daemon(d.lab.server)
    finally:
        thread.join(220)
    assert kills == 3, "every kill landed in the middle of the burst"
    assert not thread.is_alive()
    told = burst["told"]
    statuses = collections.Counter(t["status"] for t in told)
    print(f"burst of {len(told)} knocks, 3 x kill -9: {dict(statuses)}")
    assert set(statuses) <= {200, 504}, statuses
    assert wait_for(lambda: spool_empty(d), 15) is not None
    promised = {t["src"]: t for t in told if t["status"] == 200 and t["success"]}
    assert all(t["success"] for t in told if t["status"] == 200), "failures only as 504"
    assert len(promised) > len(told) // 2
    # let the short grants run out and the daemon reap them (about once a second)
    latest_short = max((t["expires"] for t in promised.values() if t["seconds"] == 4), default=0)
    time.sleep(max(0.0, latest_short - time.time()) + 2.0)
    now = time.time()
    kernel = kernel_grants(d)
    state = state_grants(d)
    assert len(kernel) == len(set(kernel)), "no grant twice in the kernel"
    assert set(kernel) == set(state), "kernel and state file agree"
    for key, grant in state.items():
        assert grant["expires"] > now, f"{key} is past its expiry"
    for src, t in promised.items():
        key = (src, "tcp", 22)
        if t["expires"] > now + 1:
            assert key in state and state[key]["expires"] >= t["expires"], f"{src} lost"
        else:
            assert key not in state, f"{src} expired but still held"
    assert json.loads(d.ctl("status", "--json").stdout)["firewall_agrees"] is True


def test_firewall_changed_behind_the_daemon_is_restored_within_two_seconds(
    nginx: Deployment,
) -> None:
    d, a, ns = nginx, nginx.agent, nginx.lab.server
    assert a.knock(SERVER4, CLIENT4, [("tcp", 22)], time=600)["reply"]["success"]
    assert a.knock(SERVER6, CLIENT6, [("udp", 51820)], time=600)["reply"]["success"]
    expected = sorted(kernel_grants(d))
    assert len(expected) == 2

    def intact() -> bool:
        hooks = [r for r in d.iptables_rules(4) if r == "-A INPUT -j WEBKNOCK"]
        hooks6 = [r for r in d.iptables_rules(6) if r == "-A INPUT -j WEBKNOCK"]
        return sorted(kernel_grants(d)) == expected and len(hooks) == len(hooks6) == 1

    damages: list[tuple[str, list[str], str | None]] = [
        ("flush of the grants chain", ["iptables", "-F", "WEBKNOCK-GRANTS"], None),
        ("INPUT hook deleted", ["iptables", "-D", "INPUT", "-j", "WEBKNOCK"], None),
        ("ip6tables -F", ["ip6tables", "-F"], None),
        (
            "iptables-restore of the host policy",
            ["iptables-restore"],
            BASE_FIREWALL.format(extra=""),
        ),
        ("iptables -F", ["iptables", "-F"], None),
    ]

    def restores() -> int:
        return d.site.daemon_log.read_bytes().count(b"firewall restored: 2 live grant(s)")

    took = {}
    for n, (what, argv, stdin) in enumerate(damages, 1):
        ns.run(argv, input=stdin)

        # Seen and repaired (the log says so: the damage took effect, even when the
        # daemon was faster than a look at the kernel could be).
        def repaired(n: int = n) -> bool:
            return restores() == n and intact()

        seconds = wait_for(repaired, 5)
        assert seconds is not None, f"{what}: not restored\n{d.site.log_tail()}"
        took[what] = round(seconds, 2)
    print(f"restored after: {took}")
    assert max(took.values()) < 2.0, took
    assert a.tcp_open(SERVER4, CLIENT4, 22) and a.udp_open(SERVER6, CLIENT6, 51820)
    assert restores() == len(damages)


def test_daemon_reaper_and_revoke_at_once_agree_exactly(nginx: Deployment) -> None:
    """600 knocks through the spool, 200 `webknockctl reap`, 200 `webknockctl revoke`."""
    d = nginx
    ips = [f"198.51.100.{i + 1}" for i in range(150)] + [f"2001:db8:2::{i:x}" for i in range(1, 51)]
    ports = [("tcp", 22), ("tcp", 2222), ("udp", 51820)]
    cfg = load(d.site.config)
    written: list[Waiting] = []  # 600 doorbells open at once
    errors: list[str] = []
    stop = time.monotonic() + 150

    def spool_writer() -> None:
        for i in range(600):
            if time.monotonic() > stop:
                return
            chosen = [ports[i % 3]] if i % 4 else ports
            seconds = 1 + i % 3 if i % 2 else 600  # half expire while the others work
            written.append(submit(cfg, d.site.keys, ips[i % len(ips)], chosen, seconds))
            time.sleep(0.03)

    def ctl_loop(args_of: Any, ok: set[int]) -> None:
        for i in range(200):
            if time.monotonic() > stop:
                return
            proc = d.ctl(*args_of(i), check=False)
            if proc.returncode not in ok:
                errors.append(f"{args_of(i)} -> {proc.returncode}: {proc.stderr.strip()[-300:]}")

    workers = [
        threading.Thread(target=spool_writer),
        threading.Thread(target=ctl_loop, args=(lambda i: ["reap", "-q"], {0})),
        threading.Thread(
            target=ctl_loop, args=(lambda i: ["revoke", ips[(i * 7) % len(ips)]], {0, 1})
        ),
    ]
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(200)
    elapsed = time.monotonic() - t0
    assert errors == []
    assert len(written) == 600 and time.monotonic() < stop, "ran out of time"
    assert wait_for(lambda: spool_empty(d), 20) is not None
    answered = [w.result(5) for w in written]
    refused = [a for a in answered if not (a and a[0] == 200)]
    assert refused == []
    assert all(reply(d.site.keys, a)["success"] for a in answered)
    d.site.stop_daemon()  # nothing changes while we compare
    kernel = kernel_grants(d)
    state = state_grants(d)
    print(f"1000 operations in {elapsed:.1f} s; {len(state)} grants left")
    assert len(kernel) == len(set(kernel)), "no duplicate rules"
    assert set(kernel) == set(state), "state file and firewall agree exactly"
    report = json.loads(d.ctl("status", "--json", check=False).stdout)
    assert report["firewall_agrees"] is True and report["drift"] == {
        "missing": [],
        "extra": [],
        "duplicates": [],
    }
