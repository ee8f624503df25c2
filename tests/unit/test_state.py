"""State file: records, transactions that roll back, concurrent writers losing nothing, the
replay marks and bad-packet counts (root's alone), and state files of 0.1 migrated."""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import filelock
import pytest

from webknock.server import instancelock
from webknock.server.grants import Grant, GrantKey
from webknock.server.instancelock import InstanceLock, LockTimeout
from webknock.server.state import StateError, StateStore

A = GrantKey(ipaddress.ip_address("192.0.2.10"), "tcp", 22)
B = GrantKey(ipaddress.ip_address("2001:db8::10"), "udp", 51820)


def test_upsert_select_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with store.transaction() as tx:
        tx.upsert([Grant(A, 1.0, 1.0, 100.0), Grant(B, 2.0, 2.0, 50.0)])
    assert [g.key for g in store.read().all()] == [B, A]  # ordered by expiry
    assert [g.key for g in store.read().live(60.0)] == [A]
    assert [g.key for g in store.read().expired(60.0)] == [B]
    with store.transaction() as tx:
        tx.upsert([Grant(A, 1.0, 5.0, 200.0, 1)])
        assert tx.get([A, B])[A] == Grant(A, 1.0, 5.0, 200.0, 1)
        tx.delete([B])
    assert store.read().all() == [Grant(A, 1.0, 5.0, 200.0, 1)]
    assert oct((tmp_path / "s.db").stat().st_mode & 0o777) == oct(0o600)


def test_exception_rolls_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.upsert([Grant(A, 1.0, 1.0, 100.0)])
        raise RuntimeError("firewall said no")
    assert store.read().all() == []


def test_ipv6_text_is_canonical(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    key = GrantKey(ipaddress.ip_address("2001:0db8:0000::0010"), "tcp", 22)
    with store.transaction() as tx:
        tx.upsert([Grant(key, 1.0, 1.0, 100.0)])
    with store.transaction() as tx:
        assert tx.get([B.__class__(ipaddress.ip_address("2001:db8::10"), "tcp", 22)])


def test_durability_is_per_transaction(tmp_path: Path) -> None:
    """WAL always; a plain commit is synced at checkpoints (NORMAL), a durable one at once
    (FULL), and the setting goes back for the next plain one."""
    store = StateStore(tmp_path / "s.db")
    seen = []
    for durable in (False, True, False, True, True):
        with store.transaction(durable=durable) as tx:
            tx.upsert([Grant(A, 1.0, 1.0, 100.0)])
            seen.append(tx.db.execute("PRAGMA synchronous").fetchone()[0])
    assert seen == [1, 2, 1, 2, 2]  # NORMAL, FULL
    assert store.read().db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    with store.transaction() as tx:  # a new connection starts plain again
        assert tx.db.execute("PRAGMA synchronous").fetchone()[0] == 1


def test_nested_lock_takes_the_file_lock_once(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    taken: list[int] = []
    real = filelock.lock_descriptor

    def counting(fd: int, **kw: Any) -> bool:
        taken.append(fd)
        return real(fd, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(instancelock, "lock_descriptor", counting)
        with store.locked(), store.transaction() as tx, store.locked():
            tx.upsert([Grant(A, 1.0, 1.0, 100.0)])
            assert store.lock.held
        assert len(taken) == 1 and not store.lock.held
        with store.transaction():
            pass
        assert len(taken) == 2 and taken[0] == taken[1], "one descriptor, kept open"


HOLDER = """
import sys, time
from filelock import FileLock
with FileLock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def test_the_lock_excludes_a_filelock_of_another_process(tmp_path: Path) -> None:
    """webknockctl of an older release (a filelock.FileLock) and we take the same lock."""
    lock = InstanceLock(str(tmp_path / "s.db.lock"), timeout=5)
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock.path, "0.5"], stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        started = time.monotonic()
        lock.acquire()
        waited = time.monotonic() - started
        lock.release()
    assert 0.2 < waited < 4, "waited for the other process, then got it"
    short = InstanceLock(lock.path, timeout=0.2)
    with subprocess.Popen(
        [sys.executable, "-c", HOLDER, lock.path, "3"], stdout=subprocess.PIPE, text=True
    ) as holder:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(LockTimeout):
            short.acquire()
        holder.kill()


def test_a_replaced_lock_file_is_locked_anew(tmp_path: Path) -> None:
    """Someone deleted the lock file between two uses: the next user must not lock the
    deleted one while others lock the new one."""
    lock = InstanceLock(str(tmp_path / "s.db.lock"))
    lock.acquire()
    lock.release()
    os.unlink(lock.path)
    other = InstanceLock(lock.path)
    other.acquire()  # creates and locks the new file
    with pytest.raises(LockTimeout):
        lock.timeout = 0.1
        lock.acquire()
    other.release()
    lock.acquire()
    assert lock.held and os.path.exists(lock.path)
    lock.release()


WRITER = """
import ipaddress, sys
from pathlib import Path
import filelock

from webknock.server import instancelock
from webknock.server.grants import Grant, GrantKey
from webknock.server.instancelock import InstanceLock, LockTimeout
from webknock.server.state import StateError, StateStore
store = StateStore(Path(sys.argv[1]))
base = int(sys.argv[2])
for i in range(int(sys.argv[3])):
    key = GrantKey(ipaddress.ip_address(0xC6120000 + base + i), "tcp", 22)  # 198.18.0.0/15
    with store.transaction() as tx:
        old = tx.get([key])
        tx.upsert([Grant(key, 1.0, 1.0, 1e10, len(old))])
        counter = GrantKey(ipaddress.ip_address("198.18.255.255"), "udp", 1)
        prev = tx.get([counter]).get(counter)
        tx.upsert([Grant(counter, 1.0, 1.0, 1e10, (prev.renew_count + 1) if prev else 1)])
"""


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(n * 1000), "60"], env=env)
        for n in range(4)
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0, 0]
    grants = StateStore(path).read().all()
    counter = [g for g in grants if g.key.proto == "udp"]
    assert len(grants) == 4 * 60 + 1
    assert counter[0].renew_count == 240  # every read-modify-write happened under the lock


# -- address prefixes, replay marks, bad-packet counts ----------------------------------


def net_of(store: StateStore) -> dict[str, str]:
    return dict(store.read().db.execute("SELECT ip, net FROM grants").fetchall())


def test_every_grant_records_its_prefix(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    mapped = GrantKey(ipaddress.ip_address("2001:db8::ffff:1"), "tcp", 22)
    with store.transaction() as tx:
        tx.upsert([Grant(A, 1.0, 1.0, 100.0), Grant(B, 1.0, 1.0, 100.0)])
        tx.upsert([Grant(mapped, 1.0, 1.0, 50.0)])
    assert net_of(store) == {
        "192.0.2.10": "192.0.2.10/32",
        "2001:db8::10": "2001:db8::/64",
        "2001:db8::ffff:1": "2001:db8::/64",
    }
    with store.transaction() as tx:
        assert tx.live_total(60.0) == 2
        assert tx.live_in_prefix("2001:db8::/64", 60.0) == 1
        assert tx.live_in_prefix("2001:db8::/64", 10.0) == 2
        assert tx.live_in_prefix("192.0.2.10/32", 60.0) == 1
        assert tx.live_in_prefix("192.0.2.11/32", 60.0) == 0


def test_burn_records_each_mark_once_with_the_request_that_burnt_it(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with store.transaction() as tx:
        assert tx.burn([(b"m1", "1" * 32), (b"m2", "2" * 32), (b"m1", "3" * 32)], 100.0) == [
            (True, "1" * 32),
            (True, "2" * 32),
            (False, "1" * 32),
        ]
    with pytest.raises(RuntimeError), store.transaction() as tx:
        assert tx.burn([(b"m3", "4" * 32)], 100.0) == [(True, "4" * 32)]
        raise RuntimeError("the batch failed")
    with store.transaction() as tx:
        assert tx.burn([(b"m3", "5" * 32)], 100.0) == [(True, "5" * 32)], "rolled back"
        tx.forget(100.0, 0.0, 10)
        assert tx.burn([(b"m1", "6" * 32)], 200.0) == [(True, "6" * 32)], "expired, forgotten"


def test_failures_are_saved_loaded_and_forgotten(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with store.transaction() as tx:
        tx.save_failures([("192.0.2.1/32", 3, 100.0), ("2001:db8::/64", 21, 150.0)])
        tx.save_failures([("192.0.2.1/32", 4, 120.0)])
    with store.transaction() as tx:
        assert sorted(tx.load_failures(0.0)) == [
            ("192.0.2.1/32", 4, 120.0),
            ("2001:db8::/64", 21, 150.0),
        ]
        assert tx.load_failures(120.0) == [("2001:db8::/64", 21, 150.0)]
        tx.save_failures([(f"198.18.0.{i}/32", 1, 200.0 + i) for i in range(5)])
        tx.forget(0.0, 120.0, 3)
        assert sorted(p for p, _, _ in tx.load_failures(0.0)) == [
            "198.18.0.2/32",
            "198.18.0.3/32",
            "198.18.0.4/32",
        ]


def test_the_web_user_cannot_reach_marks_or_counts(tmp_path: Path) -> None:
    """They live in the state file, 0600 root: nothing of them is in the spool any more."""
    store = StateStore(tmp_path / "state" / "s.db")
    with store.transaction() as tx:
        tx.burn([(b"m", "1" * 32)], 100.0)
    st = (tmp_path / "state" / "s.db").stat()
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o600)
    assert (tmp_path / "state").stat().st_mode & 0o777 == 0o700


# -- state files of 0.1 ------------------------------------------------------------------

OLD_SCHEMA = """
CREATE TABLE grants (
    ip TEXT NOT NULL,
    proto TEXT NOT NULL CHECK (proto IN ('tcp', 'udp')),
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    first_opened REAL NOT NULL,
    last_renewed REAL NOT NULL,
    expires REAL NOT NULL,
    renew_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ip, proto, port)
);
CREATE INDEX grants_expires ON grants (expires);
"""


def old_state_file(path: Path, rows: list[tuple[str, str, int, float, float, float, int]]) -> None:
    """A state file as webknock 0.1 wrote it: no `net` column, no replay or failures table."""
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("PRAGMA journal_mode = WAL")
    db.executemany("INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
    db.commit()
    db.close()
    os.chmod(path, 0o600)


def test_an_old_state_file_is_migrated_and_its_grants_get_their_net(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    old_state_file(
        path,
        [
            ("192.0.2.10", "tcp", 22, 1.0, 2.0, 100.0, 1),
            ("192.0.2.10", "udp", 51820, 1.0, 1.0, 100.0, 0),
            ("2001:db8::10", "tcp", 22, 1.0, 1.0, 50.0, 0),
            ("2001:db8::20", "tcp", 22, 1.0, 1.0, 100.0, 0),
        ],
    )
    store = StateStore(path)
    grants = store.read().all()
    assert [(str(g.key), g.expires, g.renew_count) for g in grants] == [
        ("[2001:db8::10]:tcp/22", 50.0, 0),
        ("192.0.2.10:tcp/22", 100.0, 1),
        ("192.0.2.10:udp/51820", 100.0, 0),
        ("[2001:db8::20]:tcp/22", 100.0, 0),
    ]
    assert net_of(store) == {
        "192.0.2.10": "192.0.2.10/32",
        "2001:db8::10": "2001:db8::/64",
        "2001:db8::20": "2001:db8::/64",
    }
    with store.transaction() as tx:
        assert tx.live_in_prefix("2001:db8::/64", 60.0) == 1
        assert tx.burn([(b"m", "1" * 32)], 100.0) == [(True, "1" * 32)]
        tx.save_failures([("192.0.2.1/32", 1, 10.0)])
        tx.upsert([Grant(A, 1.0, 3.0, 200.0, 2)])  # a renewal keeps the net
    assert net_of(store)["192.0.2.10"] == "192.0.2.10/32"
    indexes = {r[0] for r in store.read().db.execute("SELECT name FROM sqlite_master")}
    assert {"replay", "failures", "grants_net"} <= indexes
    store.close()
    again = StateStore(path)  # opening a migrated file again changes nothing
    assert {g.key for g in again.read().all()} == {g.key for g in grants}
    assert len(net_of(again)) == 3


def test_the_migration_of_one_file_by_two_processes_is_done_once(tmp_path: Path) -> None:
    """webknockd and webknockctl may open an old file at the same time."""
    path = tmp_path / "s.db"
    old_state_file(path, [(f"198.18.0.{i}", "tcp", 22, 1.0, 1.0, 100.0, 0) for i in range(50)])
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    code = (
        "import sys; from pathlib import Path; from webknock.server.state import StateStore\n"
        "print(len(StateStore(Path(sys.argv[1])).read().all()))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, stdout=subprocess.PIPE)
        for _ in range(4)
    ]
    outs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4 and outs == [b"50\n"] * 4
    assert set(net_of(StateStore(path)).values()) == {f"198.18.0.{i}/32" for i in range(50)}


def test_a_file_that_is_no_state_file_is_a_state_error(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    path.write_bytes(b"not a database" * 100)
    os.chmod(path, 0o600)
    with pytest.raises(StateError, match="cannot open state file"):
        StateStore(path).read()


# -- the client of a grant (protocol v2) -------------------------------------------------


def columns_of(store: StateStore) -> list[str]:
    return [row[1] for row in store.read().db.execute("PRAGMA table_info(grants)")]


def test_an_old_state_file_gets_a_client_column_and_keeps_its_grants(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    old_state_file(path, [("192.0.2.10", "tcp", 22, 1.0, 2.0, 100.0, 1)])
    store = StateStore(path)
    (grant,) = store.read().all()
    assert (str(grant.key), grant.renew_count, grant.client) == ("192.0.2.10:tcp/22", 1, None)
    assert {"net", "client"} <= set(columns_of(store))
    with store.transaction() as tx:
        tx.upsert([Grant(grant.key, 1.0, 3.0, 200.0, 2, "alice")])  # renewed by a v2 client
        tx.upsert([Grant(B, 3.0, 3.0, 200.0, 0, "bob")])
    store.close()
    again = StateStore(path)
    assert {(str(g.key), g.client) for g in again.read().all()} == {
        ("192.0.2.10:tcp/22", "alice"),
        ("[2001:db8::10]:udp/51820", "bob"),
    }
    assert columns_of(again).count("client") == 1


def test_a_state_file_with_net_but_without_client_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    db = sqlite3.connect(path)
    db.executescript(OLD_SCHEMA)
    db.execute("ALTER TABLE grants ADD COLUMN net TEXT NOT NULL DEFAULT ''")
    db.execute(
        "INSERT INTO grants VALUES ('192.0.2.10', 'tcp', 22, 1.0, 1.0, 100.0, 0, '192.0.2.10/32')"
    )
    db.commit()
    db.close()
    os.chmod(path, 0o600)
    store = StateStore(path)
    assert [g.client for g in store.read().all()] == [None]
    assert net_of(store) == {"192.0.2.10": "192.0.2.10/32"}
    with store.transaction() as tx:
        tx.upsert([Grant(A, 1.0, 2.0, 100.0, 1, "alice")])
    assert [g.client for g in StateStore(path).read().all()] == ["alice"]


def test_the_client_of_a_grant_round_trips(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with store.transaction() as tx:
        tx.upsert([Grant(A, 1.0, 1.0, 100.0, 0, "alice"), Grant(B, 1.0, 1.0, 100.0)])
    with store.transaction() as tx:
        assert {g.key: g.client for g in tx.get({A, B}).values()} == {A: "alice", B: None}
        tx.upsert([Grant(A, 1.0, 2.0, 150.0, 1, None)])  # renewed by v1 or an admin
        assert tx.get({A})[A].client is None
        assert [g.key for g in tx.select("client = ?", ("alice",))] == []
    store.close()
    assert {(g.key, g.client) for g in StateStore(tmp_path / "s.db").read().all()} == {
        (A, None),
        (B, None),
    }


NET4 = GrantKey(ipaddress.ip_address("198.51.100.0"), "tcp", 22, 24)
NET6 = GrantKey(ipaddress.ip_address("2001:db8:5::"), "udp", 51820, 48)
INNER4 = GrantKey(ipaddress.ip_address("198.51.100.7"), "tcp", 22)


def test_a_network_grant_round_trips_beside_an_address_inside_it(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s.db")
    with store.transaction() as tx:
        tx.upsert([Grant(NET4, 1.0, 1.0, 100.0, 0, "alice"), Grant(INNER4, 1.0, 1.0, 90.0)])
        tx.upsert([Grant(NET6, 1.0, 1.0, 80.0, 0, "bob")])
    assert net_of(store) == {
        "198.51.100.0/24": "198.51.100.0/24",  # counted as one grant of its own network
        "198.51.100.7": "198.51.100.7/32",
        "2001:db8:5::/48": "2001:db8:5::/48",  # wider than the /64 of addresses
    }
    store.close()
    store = StateStore(tmp_path / "s.db")
    assert [(g.key, g.client) for g in store.read().all()] == [
        (NET6, "bob"),
        (INNER4, None),
        (NET4, "alice"),
    ]
    with store.transaction() as tx:
        assert set(tx.get([NET4, INNER4, NET6])) == {NET4, INNER4, NET6}
        assert tx.counts(50.0) == {4: (2, 2), 6: (1, 1)}
        assert tx.live_in_prefix("198.51.100.0/24", 50.0) == 1
        tx.upsert([Grant(NET4, 1.0, 2.0, 200.0, 1, "alice")])  # a renewal: the same row
        tx.delete([INNER4, NET6])
    assert store.read().all() == [Grant(NET4, 1.0, 2.0, 200.0, 1, "alice")]


def test_a_network_longer_than_the_counted_prefix_counts_under_that_prefix(
    tmp_path: Path,
) -> None:
    store = StateStore(tmp_path / "s.db")
    narrow = GrantKey(ipaddress.ip_address("2001:db8::10:0"), "tcp", 22, 112)
    with store.transaction() as tx:
        tx.upsert([Grant(narrow, 1.0, 1.0, 100.0)])
    assert net_of(store) == {"2001:db8::10:0/112": "2001:db8::/64"}


def test_an_old_state_file_takes_network_grants_after_its_migration(tmp_path: Path) -> None:
    """The ip column was text from the start: a network is a new value, not a new column."""
    path = tmp_path / "s.db"
    old_state_file(path, [("198.51.100.7", "tcp", 22, 1.0, 1.0, 100.0, 0)])
    store = StateStore(path)
    with store.transaction() as tx:
        tx.upsert([Grant(NET4, 5.0, 5.0, 150.0, 0, "alice")])
    store.close()
    assert [(g.key, g.client) for g in StateStore(path).read().all()] == [
        (INNER4, None),
        (NET4, "alice"),
    ]
    assert net_of(StateStore(path))["198.51.100.0/24"] == "198.51.100.0/24"
