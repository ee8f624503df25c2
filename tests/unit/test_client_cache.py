"""The getinfo cache: atomic 0600 file per profile and family, invalidation rules."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from webknock.client.cache import MAX_AGE, Cache, ServerInfo, cache_dir, cache_name

URL = "https://knock.example.org/webknock"
INFO = ServerInfo(tcp=(22, 2222), udp=(51820,), maxtime=3600, ip="192.0.2.10")


def test_store_then_load(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "sub" / "p.ipv4.json")
    assert cache.load(URL, "192.0.2.10", 1000.0) is None
    cache.store(URL, INFO, "192.0.2.10", 1000.0)
    st = os.stat(cache.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cache.path.parent).st_mode) == 0o700
    assert cache.load(URL, "192.0.2.10", 1000.0 + MAX_AGE) == INFO
    assert INFO.offered() == (("tcp", 22), ("tcp", 2222), ("udp", 51820))
    assert [p.name for p in cache.path.parent.iterdir()] == ["p.ipv4.json"], "no temp file left"


def test_invalidation(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "c.json")
    cache.store(URL, INFO, "192.0.2.10", 1000.0)
    assert cache.load(URL + "2", "192.0.2.10", 1000.0) is None, "another URL"
    assert cache.load(URL, "192.0.2.10", 1000.0 + MAX_AGE + 1) is None, "stale"
    assert cache.load(URL, "192.0.2.10", 900.0) is None, "from the future (clock jumped)"
    assert cache.load(URL, "192.0.2.11", 1000.0) is None, "local address changed"
    assert cache.load(URL, None, 1000.0) == INFO, "unknown local address: trust the entry"
    cache.drop()
    assert not cache.path.exists()
    cache.drop()  # dropping twice is fine


@pytest.mark.parametrize(
    "text", ["", "{", "[]", '{"url": 1}', json.dumps({"url": URL, "fetched": "x"})]
)
def test_corrupt_entry_reads_as_nothing(tmp_path: Path, text: str) -> None:
    cache = Cache(tmp_path / "c.json")
    cache.path.write_text(text)
    assert cache.load(URL, None, 1000.0) is None


def test_unwritable_cache_only_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = Cache(blocker / "c.json")  # parent is a file: mkdir fails
    cache.store(URL, INFO, None, 1000.0)
    assert "cannot write cache" in caplog.text


def test_cache_dir_and_name(tmp_path: Path) -> None:
    assert cache_dir({"XDG_CACHE_HOME": "/x"}, uid=0) == Path("/x/webknock")
    assert cache_dir({}, uid=0) == Path("/var/cache/webknock")
    assert cache_dir({"HOME": "/home/u"}, uid=1000) == Path("/home/u/.cache/webknock")
    a, b = tmp_path / "a" / "office.ini", tmp_path / "b" / "office.ini"
    assert cache_name(a, "ipv4").startswith("office-") and cache_name(a, "ipv4").endswith(
        ".ipv4.json"
    )
    assert cache_name(a, "ipv4") != cache_name(b, "ipv4"), "same name, other file"
    assert cache_name(a, "ipv4") != cache_name(a, "ipv6")
