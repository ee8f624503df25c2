"""The background refresh of libnftables's cache: a dry run on the primary context, a
spare context while it runs, and never a batch on a context left in dry-run mode."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from webknock.firewall.base import FirewallError
from webknock.firewall.nftcache import DryRunLeft, WarmBinding

PROBE = {"nftables": [{"add": {"element": {"elem": ["probe"]}}}]}
BATCH = {"nftables": [{"add": {"element": {"elem": ["grant"]}}}]}


class FakeLib:
    """Records each command with the dry-run mode it ran in."""

    def __init__(self, name: str, rc: int = 0, block: threading.Event | None = None) -> None:
        self.name, self.rc, self.block = name, rc, block
        self.dry = False
        self.ran: list[tuple[str, bool]] = []
        self.entered = threading.Event()

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        what = json_root["nftables"][0]["add"]["element"]["elem"][0]
        self.ran.append((what, self.dry))
        self.entered.set()
        if self.block is not None and what == "probe":
            assert self.block.wait(5)
        return (self.rc if what == "probe" else 0), "", "" if self.rc == 0 else "no table"

    def get_dry_run(self) -> bool:
        return self.dry

    def set_dry_run(self, onoff: bool) -> bool:
        old, self.dry = self.dry, onoff
        return old


def binding(primary: FakeLib, spares: list[FakeLib]) -> WarmBinding:
    def make() -> FakeLib:
        spare = FakeLib("spare")
        spares.append(spare)
        return spare

    return WarmBinding(primary, make, PROBE)


def test_a_refresh_is_a_dry_run_of_the_probe_and_leaves_the_mode_off() -> None:
    primary = FakeLib("primary")
    warm = binding(primary, [])
    assert warm.refresh() is True
    assert primary.ran == [("probe", True)] and primary.dry is False
    warm.json_cmd(BATCH)
    assert primary.ran[-1] == ("grant", False)


def test_a_failing_probe_is_not_an_error_and_the_mode_goes_off() -> None:
    primary = FakeLib("primary", rc=1)
    warm = binding(primary, [])
    assert warm.refresh() is False
    assert primary.dry is False


def test_the_mode_goes_off_when_the_probe_raises() -> None:
    primary = FakeLib("primary")

    def boom(json_root: dict[str, Any]) -> tuple[int, Any, str]:
        raise OSError("netlink")

    primary.json_cmd = boom  # type: ignore[method-assign]
    with pytest.raises(OSError):
        binding(primary, []).refresh()
    assert primary.dry is False


def test_a_batch_while_the_refresh_holds_the_context_goes_through_a_spare() -> None:
    release = threading.Event()
    primary, spares = FakeLib("primary", block=release), list[FakeLib]()
    warm = binding(primary, spares)
    warm.refresh_soon()
    assert primary.entered.wait(5), "the refresh started in the background"
    started = time.monotonic()
    warm.json_cmd(BATCH)  # does not wait for the refresh
    assert time.monotonic() - started < 1
    assert [s.ran for s in spares] == [[("grant", False)]]
    assert primary.ran == [("probe", True)]
    release.set()


def test_refresh_soon_does_nothing_until_a_command_ran() -> None:
    primary = FakeLib("primary")
    warm = binding(primary, [])
    assert warm.refresh()
    warm.refresh_soon()  # nothing ran since: the cache is current
    time.sleep(0.1)
    assert primary.ran == [("probe", True)]
    warm.json_cmd(BATCH)
    warm.refresh_soon()
    deadline = time.monotonic() + 5
    while len(primary.ran) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert primary.ran == [("probe", True), ("grant", False), ("probe", True)]


def test_a_context_left_in_dry_run_mode_refuses_the_batch() -> None:
    primary = FakeLib("primary")
    primary.dry = True  # as if a refresh had not switched it back
    with pytest.raises(DryRunLeft) as err:
        binding(primary, []).json_cmd(BATCH)
    assert isinstance(err.value, FirewallError)
    assert primary.ran == [], "nothing sent: a dry run would report success and apply nothing"
