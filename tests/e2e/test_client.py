"""The webknock client in the client namespace against the real server (nginx + fcgiwrap).

The client runs as installed: `client/webknock` with the site's venv python (made from
/usr/bin/python3), inside the client namespace, with its own profile, keys and cache
(tests/lab/client.py). Several servers at once: tests/e2e/test_fanout.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab import (
    CLIENT4,
    CLIENT6,
    OTHER4,
    SERVER4,
    SERVER6,
    Deployment,
    stop_process,
    wait_until,
    watched_deployment,
)
from tests.lab.client import ClientHome, client_home
from webknock.keys import format_keys
from webknock.protocol.v1 import Keys


class Client:
    """One client user's profile `lab.ini` and keys `lab.keys` for the lab's server, used
    with --config."""

    def __init__(self, d: Deployment, home: ClientHome) -> None:
        self.d, self.user = d, home
        self.keys_file = home.home / "lab.keys"
        self.write_keys(d.site.keys)
        self.profile = home.home / "lab.ini"
        self.write_profile()

    def write_keys(self, keys: Keys) -> None:
        self.keys_file.write_text(format_keys(keys))
        os.chmod(self.keys_file, 0o600)

    def write_profile(self, url: str = f"http://{SERVER4}/webknock", **extra: str) -> None:
        """A profile like install.sh writes; `extra` adds or overrides keys."""
        values = {"url": url, "keys_file": "lab.keys", "ports": "tcp/22", "timeout": "10", **extra}
        lines = ["[client]", *(f"{k} = {v}" for k, v in values.items())]
        self.profile.write_text("\n".join(lines) + "\n")

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.user.run("--config", str(self.profile), *args, timeout=timeout)

    def knock_json(self, *args: str) -> dict[str, Any]:
        proc = self.run(*args, "knock", "--json")
        assert proc.returncode == 0, proc.stderr
        result: dict[str, Any] = json.loads(proc.stdout)
        return result

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return self.user.popen("--config", str(self.profile), *args)


@contextlib.contextmanager
def client_lab(**site_kw: Any) -> Iterator[Client]:
    with watched_deployment("nginx", client_addresses=(), **site_kw) as d, client_home(d) as home:
        yield Client(d, home)


@pytest.fixture
def client() -> Iterator[Client]:
    with client_lab() as c:
        yield c


def grants(d: Deployment, ip: str) -> list[dict[str, Any]]:
    return [g for g in d.list_json() if g["ip"] == ip]


def test_knock_opens_then_cached_knock_is_one_request(client: Client) -> None:
    d = client.d
    assert not d.agent.tcp_open(SERVER4, CLIENT4, 22), "closed before the knock"
    proc = client.run("knock")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"opened tcp/22 for {CLIENT4} until "), proc.stdout
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22)
    assert not d.agent.tcp_open(SERVER4, CLIENT4, 2222), "only what the profile asks for"
    (grant,) = grants(d, CLIENT4)
    assert (grant["proto"], grant["port"], grant["renew_count"]) == ("tcp", 22, 0)

    second = client.knock_json()
    assert second["grants"][0]["requests"] == 1, "getinfo came from the cache"
    assert grants(d, CLIENT4)[0]["renew_count"] == 1
    assert abs(second["grants"][0]["expires"] - grants(d, CLIENT4)[0]["expires"]) <= 1

    info = client.run("info")
    assert info.returncode == 0, info.stderr
    assert f"offers tcp/22, tcp/2222, udp/51820 for up to 3600 s; sees this host as {CLIENT4}" in (
        info.stdout
    )


def test_exec_runs_the_command_behind_a_knock(client: Client) -> None:
    d = client.d
    proc = client.run("exec", "--", "sh", "-c", "exit 7")
    assert proc.returncode == 7, proc.stderr
    d.ctl("revoke", CLIENT4)
    assert not d.agent.tcp_open(SERVER4, CLIENT4, 22)
    probe = (
        "import socket, sys\n"
        "try:\n"
        f"    socket.create_connection(('{SERVER4}', 22), 2).close()\n"
        "except OSError:\n"
        "    sys.exit(9)\n"
        "sys.exit(7)\n"
    )
    proc = client.run("exec", "--", str(client.d.site.python), "-c", probe)
    assert proc.returncode == 7, f"the port was not open while the command ran: {proc.stderr}"


def test_keep_renews_follows_address_changes_and_stops_on_sigterm() -> None:
    with client_lab(max_time=6) as client:
        d = client.d
        keep = client.popen("keep", "--poll", "0.5")
        try:
            assert wait_until(lambda: d.agent.tcp_open(SERVER4, CLIENT4, 22), 15), "first knock"
            start = time.monotonic()
            while time.monotonic() - start < 14:  # more than two lifetimes of 6 s
                assert d.agent.tcp_open(SERVER4, CLIENT4, 22), "grant lapsed while kept"
                time.sleep(1)
            assert grants(d, CLIENT4)[0]["renew_count"] >= 4

            # The host's preferred source address changes: keep must knock from the new one.
            d.lab.add_client_address(OTHER4)
            route = f"192.0.2.0/24 dev {d.lab.client_if} proto kernel scope link src {OTHER4}"
            d.lab.client.run(["ip", "route", "replace", *route.split()])
            assert wait_until(lambda: bool(grants(d, OTHER4)), 10), "no knock from the new address"
            assert d.agent.tcp_open(SERVER4, OTHER4, 22)

            keep.send_signal(signal.SIGTERM)
            _, err = keep.communicate(timeout=10)
        finally:
            stop_process(keep)
        assert keep.returncode == 0, err
        assert f"local address changed {CLIENT4} -> {OTHER4}: knocking again now" in err
        assert "SIGTERM received: stopping" in err and err.rstrip().endswith("stopped")
        closed = lambda: not d.agent.tcp_open(SERVER4, OTHER4, 22)  # noqa: E731
        assert wait_until(closed, 15), "grant outlived the keeper"
        assert not grants(d, OTHER4)


@contextlib.contextmanager
def netns_hosts(ns_name: str, text: str) -> Iterator[None]:
    """/etc/netns/NS/hosts: `ip netns exec` bind-mounts it over /etc/hosts in that namespace."""
    directory = Path("/etc/netns") / ns_name
    parent_existed = directory.parent.exists()
    directory.mkdir(parents=True)
    try:
        (directory / "hosts").write_text(text)
        yield
    finally:
        shutil.rmtree(directory)
        if not parent_existed:
            with contextlib.suppress(OSError):
                directory.parent.rmdir()


def test_family_both_opens_v4_and_v6(client: Client) -> None:
    d = client.d
    hosts = f"127.0.0.1 localhost\n{SERVER4} knock.test\n{SERVER6} knock.test\n"
    with netns_hosts(d.lab.client.name, hosts):
        client.write_profile("http://knock.test/webknock")
        only6 = client.knock_json("--family", "ipv6")
        assert [g["ip"] for g in only6["grants"]] == [CLIENT6]
        assert d.agent.tcp_open(SERVER6, CLIENT6, 22)
        assert not d.agent.tcp_open(SERVER4, CLIENT4, 22)

        both = client.run("--family", "both", "knock")
        assert both.returncode == 0, both.stderr
        assert f"[ipv4] opened tcp/22 for {CLIENT4}" in both.stdout
        assert f"[ipv6] opened tcp/22 for {CLIENT6}" in both.stdout
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22) and d.agent.tcp_open(SERVER6, CLIENT6, 22)
    assert sorted(g["ip"] for g in d.list_json()) == [CLIENT4, CLIENT6]


def test_failures_have_their_exit_codes(client: Client) -> None:
    d = client.d
    client.write_keys(Keys.generate())
    wrong = client.run("knock")
    assert wrong.returncode == 1, wrong.stderr
    assert "403 Forbidden" in wrong.stderr and wrong.stderr.count("\n") == 1

    client.write_keys(d.site.keys)
    d.site.stop_daemon()
    down = client.run("knock")
    assert down.returncode == 4, down.stderr
    assert "webknockd did not answer in time (504" in down.stderr
    assert not d.agent.tcp_open(SERVER4, CLIENT4, 22)

    client.write_profile(f"http://{SERVER4}:81/webknock", timeout="1")  # dropped by the policy
    dropped = client.run("knock")
    assert dropped.returncode == 3 and "timed out after 1s" in dropped.stderr, dropped.stderr

    d.web.close()
    client.write_profile()
    refused = client.run("knock")
    assert refused.returncode == 3, refused.stderr
    assert f"cannot connect to {SERVER4}: Connection refused" in refused.stderr

    client.write_profile("http://no-such-host.invalid/webknock")
    assert client.run("knock").returncode == 3
    client.write_profile("ftp://x/")
    bad = client.run("knock")
    assert bad.returncode == 2 and "[client] url:" in bad.stderr
