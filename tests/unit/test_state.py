"""State file: records, transactions that roll back, and concurrent writers losing nothing."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import filelock
import pytest

from webknock import instancelock
from webknock.grants import Grant, GrantKey
from webknock.instancelock import InstanceLock, LockTimeout
from webknock.state import StateStore

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
    assert store.read().next_expiry() == 200.0
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

from webknock import instancelock
from webknock.grants import Grant, GrantKey
from webknock.instancelock import InstanceLock, LockTimeout
from webknock.state import StateStore
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
