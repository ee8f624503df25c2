"""One command, two real servers: `webknock --profile a,b` and a `[group]` profile.

Server a (192.0.2.1, protocol v1) and server b (198.51.100.1, protocol v2, a client key
enrolled with `webknockctl client add`) each run in a namespace of their own with nginx +
fcgiwrap, webknockd and an INPUT policy that drops all but HTTP; the client namespace
reaches both (tests/lab: `second_server`). Every "opened" is checked by connecting to the
port from the client namespace. With b's webknockd or web server down, the exit code is
b's and the output names b, while a is still opened; `keep` goes on renewing a while b
fails, and takes b up again when it is back.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.lab import (
    Deployment,
    deployment,
    reported,
    second_server,
    stop_process,
    wait_until,
)
from tests.lab.client import ClientHome, client_home

PORT = 22


@dataclass
class Pair:
    """Servers a (v1) and b (v2), and the client user with profiles a, b and group both."""

    a: Deployment
    b: Deployment
    user: ClientHome

    def servers(self) -> dict[str, Deployment]:
        return {"a": self.a, "b": self.b}

    def is_open(self, d: Deployment) -> bool:
        """Whether the client connects to PORT of `d`'s server, from its address on d's link."""
        return d.agent.tcp_open(d.link.server4, d.link.client4, PORT)

    def grants(self, d: Deployment, *flags: str) -> list[dict[str, Any]]:
        """The client's grants of PORT on `d` (`webknockctl list --json FLAGS`)."""
        found: list[dict[str, Any]] = json.loads(d.ctl("list", "--json", *flags).stdout)
        return [g for g in found if g["ip"] == d.link.client4 and g["port"] == PORT]

    def revoke_all(self) -> None:
        for d in (self.a, self.b):
            d.ctl("revoke", d.link.client4)
            assert not self.is_open(d), f"{d.server.name}: still open after revoke"


@contextlib.contextmanager
def two_servers(max_time: int = 3600) -> Iterator[Pair]:
    """Servers a and b (each offering tcp/22 for up to `max_time` s) and the profiles."""
    with (
        deployment("nginx", max_time=max_time) as a,
        second_server(a, "nginx", max_time=max_time) as b,
        reported(a, b),
        client_home(a) as user,
    ):
        user.write_v1_profile("a", a, ports=f"tcp/{PORT}", timeout="10")
        user.enrol_v2("b", b, "--ports", f"tcp/{PORT}", timeout="10")
        user.write_group("both", ["a", "b"])
        pair = Pair(a, b, user)
        for d in (a, b):
            assert not pair.is_open(d), f"{d.server.name}: open before any knock"
        yield pair


@pytest.fixture
def pair() -> Iterator[Pair]:
    with two_servers() as p:
        yield p


def opened_line(name: str, d: Deployment) -> str:
    return f"{name}: opened tcp/{PORT} for {d.link.client4} until "


def test_one_command_opens_both_servers(pair: Pair) -> None:
    proc = pair.user.run("--profile", "a,b", "knock")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 2, proc.stdout
    assert lines[0].startswith(opened_line("a", pair.a)), proc.stdout
    assert lines[1].startswith(opened_line("b", pair.b)), proc.stdout
    assert pair.is_open(pair.a) and pair.is_open(pair.b)
    assert pair.grants(pair.a)[0]["client"] in ("", None), "a is a v1 grant"
    assert pair.grants(pair.b)[0]["client"] == "b", "b is the enrolled v2 client"

    pair.revoke_all()
    as_json = pair.user.run("--profile", "both", "knock", "--json")
    assert as_json.returncode == 0, as_json.stderr
    found = json.loads(as_json.stdout)
    assert [(o["profile"], o["ok"], o["code"]) for o in found] == [("a", True, 0), ("b", True, 0)]
    for obj, d in zip(found, (pair.a, pair.b), strict=True):
        (grant,) = obj["grants"]
        assert (grant["ip"], grant["ports"]) == (d.link.client4, [f"tcp/{PORT}"])
        assert abs(grant["expires"] - pair.grants(d)[0]["expires"]) <= 1
    assert pair.is_open(pair.a) and pair.is_open(pair.b)


def test_a_server_down_gives_its_code_and_name_while_the_other_opens(pair: Pair) -> None:
    pair.b.site.stop_daemon()
    proc = pair.user.run("--profile", "both", "knock")
    assert proc.returncode == 4, f"b's 504 is the worst code\n{proc.stdout}{proc.stderr}"
    assert proc.stdout.startswith(opened_line("a", pair.a)) and proc.stdout.count("\n") == 1
    assert proc.stderr.startswith("b: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "webknockd did not answer in time (504" in proc.stderr
    assert pair.is_open(pair.a), "a opened although b failed"
    assert not pair.is_open(pair.b)

    pair.a.ctl("revoke", pair.a.link.client4)
    pair.b.web.close()
    as_json = pair.user.run("--profile", "a,b", "knock", "--json")
    assert as_json.returncode == 3, as_json.stderr
    a, b = json.loads(as_json.stdout)
    assert (a["profile"], a["ok"], a["code"]) == ("a", True, 0)
    assert (b["profile"], b["ok"], b["code"], b["grants"]) == ("b", False, 3, [])
    assert f"cannot connect to {pair.b.link.server4}: Connection refused" in b["errors"][0]["error"]
    assert as_json.stderr.startswith("b: error: cannot connect to "), as_json.stderr
    assert pair.is_open(pair.a) and not pair.is_open(pair.b)


def test_keep_renews_one_server_while_the_other_fails() -> None:
    """Grants of 6 s (renewed every 2 s): a stays open and renewed over five renew periods
    with b's webknockd down (each of b's knocks waits 5 s for its 504), and b is renewed
    again once its webknockd is back."""
    with two_servers(max_time=6) as pair:
        keep = pair.user.popen("--profile", "both", "keep", "--poll", "0.5")
        try:
            both = lambda: pair.is_open(pair.a) and pair.is_open(pair.b)  # noqa: E731
            assert wait_until(both, 15), "keep opened both"
            pair.b.site.stop_daemon()
            renewed = pair.grants(pair.a)[0]["renew_count"]
            start = time.monotonic()
            while time.monotonic() - start < 10:  # five of a's renew periods, b's 504 in them
                assert pair.is_open(pair.a), "a lapsed while b failed"
                time.sleep(0.5)
            assert pair.grants(pair.a)[0]["renew_count"] >= renewed + 4, "a renewed meanwhile"

            b_expires = max(g["expires"] for g in pair.grants(pair.b, "--all"))
            pair.b.site.start_daemon(pair.b.server)
            again = lambda: any(g["expires"] > b_expires for g in pair.grants(pair.b))  # noqa: E731
            assert wait_until(again, 20), "b knocked again once its webknockd was back"
            assert pair.is_open(pair.a) and pair.is_open(pair.b)
            keep.send_signal(signal.SIGTERM)
            _, err = keep.communicate(timeout=30)
        finally:
            stop_process(keep)
    assert keep.returncode == 0, err
    failed = "b: [any] knock failed (1 in a row): the server's webknockd did not answer in time"
    assert failed in err, err
    assert "b: [any] knock works again after " in err, err
    assert "a: [any] knock failed" not in err, f"a never failed\n{err}"
    assert err.rstrip().endswith("stopped"), err
