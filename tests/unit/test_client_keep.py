"""The keep loop, step by step with a fake clock: renewal at a third, address moves, backoff."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.unit.test_client_http import FakeServer, make_profile
from webknock.client.cache import Cache
from webknock.client.keeper import Keeper
from webknock.client.knocker import Knocker
from webknock.client.net import Transport
from webknock.client.profile import load_profile
from webknock.protocol import v1


class MovingTransport(Transport):
    """A real transport whose local address the test sets."""

    local: str | None = "192.0.2.10"

    def local_address(self) -> str | None:
        return self.local


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[FakeServer]:
    s = FakeServer(v1.Keys.generate())
    s.behaviour.maxtime = 30
    yield s
    s.close()


def keeper_for(tmp_path: Path, server: FakeServer) -> tuple[Keeper, MovingTransport, Clock]:
    profile = load_profile(make_profile(tmp_path, server.keys, server.url()))
    transport = MovingTransport(profile.url, "ipv4", True, 2.0)
    knocker = Knocker(profile, server.keys, transport, Cache(tmp_path / "cache.json"))
    clock = Clock()
    return Keeper([knocker], threading.Event(), poll=5.0, clock=clock), transport, clock


def test_renews_at_a_third_and_reknocks_when_the_address_moves(
    tmp_path: Path, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keeper, transport, clock = keeper_for(tmp_path, server)
    assert keeper.step() == 5.0, "waits at most one poll interval"
    assert server.apis() == ["getinfo", "openports"]
    clock.now += 9
    keeper.step()
    assert len(server.apis()) == 2, "not due before a third of 30 s"
    clock.now += 1
    keeper.step()
    assert server.apis()[2:] == ["openports"], "renewal from the cache: one request"

    clock.now += 1
    transport.local = "192.0.2.20"
    keeper.step()
    assert server.apis()[3:] == ["getinfo", "openports"], "moved: knock again at once, fresh"
    assert "local address changed 192.0.2.10 -> 192.0.2.20: knocking again now" in caplog.text

    transport.local = None
    clock.now += 1
    keeper.step()
    assert "no route to the server right now" in caplog.text
    transport.local = "192.0.2.20"
    clock.now += 1
    keeper.step()
    assert len(server.apis()) == 5, "same address back: nothing to do"
    transport.local = None
    keeper.step()
    transport.local = "192.0.2.30"
    keeper.step()
    assert len(server.apis()) == 7, "moved while unroutable: knock again"


def test_failures_back_off_and_recover(
    tmp_path: Path, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    keeper, _, clock = keeper_for(tmp_path, server)
    server.behaviour.status = 504
    waits = []
    for _ in range(4):
        waits.append(keeper.step())
        clock.now += waits[-1]
    assert waits == [1.0, 2.0, 4.0, 5.0], "1, 2, 4, then 8 (capped by the poll interval)"
    assert "knock failed (3 in a row)" in caplog.text and "retrying in 4 s" in caplog.text
    clock.now += 3
    server.behaviour.status = 200
    keeper.step()
    assert server.apis()[-2:] == ["getinfo", "openports"]
    assert "knock works again after 4 failures" in caplog.text
    assert keeper.tracks[0].failures == 0


def test_backoff_never_waits_past_a_third_of_the_grant(tmp_path: Path, server: FakeServer) -> None:
    keeper, _, clock = keeper_for(tmp_path, server)
    keeper.poll = 100.0
    keeper.step()  # a 30 s grant
    server.behaviour.status = 504
    for _ in range(8):
        clock.now = keeper.tracks[0].due
        keeper.step()
    assert keeper.tracks[0].due - clock.now == 10.0, "min(64, 30/3)"


def test_run_stops_when_told(tmp_path: Path, server: FakeServer) -> None:
    keeper, _, _ = keeper_for(tmp_path, server)
    keeper.stop.set()
    keeper.run()
    assert server.apis() == []
