"""The state file: the truth about live grants (SQLite, stdlib).

Every change happens inside :meth:`StateStore.transaction`, which holds the
instance lock (a filelock shared by webknockd, the cron reaper and
webknockctl) and one SQLite transaction. Callers apply the firewall batch
inside the block: a failed batch raises, the transaction rolls back, and
state and kernel still agree.

Durability is chosen per transaction. The file is in WAL mode, so every commit
survives a crash of the process that made it (it is in the kernel's page cache),
and after a power loss the file is consistent. What a power loss may lose is the
last commits before it, unless they were made ``durable`` (fsynced, about 0.3 ms
plus the journal work it costs the next writes). Only what must never come back
needs that: a revoke. A grant or renewal lost that way is lost together with the
kernel's rules (the power went), so the port stays closed until the client knocks
again; an expiry lost is repeated by reconcile. Fail-closed either way.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from webknock.addresses import parse_address
from webknock.grants import Grant, GrantKey
from webknock.instancelock import InstanceLock

SCHEMA = """
CREATE TABLE IF NOT EXISTS grants (
    ip TEXT NOT NULL,
    proto TEXT NOT NULL CHECK (proto IN ('tcp', 'udp')),
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    first_opened REAL NOT NULL,
    last_renewed REAL NOT NULL,
    expires REAL NOT NULL,
    renew_count INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ip, proto, port)
);
CREATE INDEX IF NOT EXISTS grants_expires ON grants (expires);
"""


COLUMNS = "ip, proto, port, first_opened, last_renewed, expires, renew_count"
#: Files beside the state file: SQLite's (-wal, -shm; -journal from before WAL), the lock
#: shared by daemon, reaper and webknockctl, and the daemon's single-instance lock.
STATE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock", ".daemon")


class StateError(Exception):
    """The state file cannot be opened, read or written."""


def _row_to_grant(row: tuple[str, str, int, float, float, float, int]) -> Grant:
    ip, proto, port, first, last, expires, count = row
    return Grant(GrantKey(parse_address(ip), proto, port), first, last, expires, count)


class StateTx:
    """Queries and changes inside one locked transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, keys: Iterable[GrantKey]) -> dict[GrantKey, Grant]:
        found: dict[GrantKey, Grant] = {}
        for key in keys:
            row = self.db.execute(
                "SELECT ip, proto, port, first_opened, last_renewed, expires, renew_count "
                "FROM grants WHERE ip = ? AND proto = ? AND port = ?",
                (str(key.ip), key.proto, key.port),
            ).fetchone()
            if row:
                found[key] = _row_to_grant(row)
        return found

    def upsert(self, grants: Iterable[Grant]) -> None:
        self.db.executemany(
            "INSERT INTO grants VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (ip, proto, port) DO "
            "UPDATE SET last_renewed = excluded.last_renewed, expires = excluded.expires, "
            "renew_count = excluded.renew_count",
            [
                (
                    str(g.key.ip),
                    g.key.proto,
                    g.key.port,
                    g.first_opened,
                    g.last_renewed,
                    g.expires,
                    g.renew_count,
                )
                for g in grants
            ],
        )

    def delete(self, keys: Iterable[GrantKey]) -> None:
        self.db.executemany(
            "DELETE FROM grants WHERE ip = ? AND proto = ? AND port = ?",
            [(str(k.ip), k.proto, k.port) for k in keys],
        )

    def select(self, where: str = "1", params: tuple[object, ...] = ()) -> list[Grant]:
        # `where` is built by our callers from constant fragments; values go through params.
        query = f"SELECT {COLUMNS} FROM grants WHERE {where} ORDER BY expires"  # noqa: S608
        rows = self.db.execute(
            query,
            params,
        ).fetchall()
        return [_row_to_grant(r) for r in rows]

    def live(self, now: float) -> list[Grant]:
        return self.select("expires > ?", (now,))

    def expired(self, now: float) -> list[Grant]:
        return self.select("expires <= ?", (now,))

    def all(self) -> list[Grant]:
        return self.select()

    def counts(self, now: float) -> dict[int, tuple[int, int]]:
        """Per address family (4, 6): (live grants, all grants incl. expired not yet reaped)."""
        rows = self.db.execute(
            "SELECT instr(ip, ':') > 0, SUM(expires > ?), COUNT(*) FROM grants GROUP BY 1",
            (now,),
        ).fetchall()
        out = {4: (0, 0), 6: (0, 0)}
        for is_v6, live, total in rows:
            out[6 if is_v6 else 4] = (int(live), int(total))
        return out

    def next_expiry(self) -> float | None:
        row = self.db.execute("SELECT MIN(expires) FROM grants").fetchone()
        return float(row[0]) if row and row[0] is not None else None


class StateStore:
    """One instance's state file and its lock."""

    def __init__(self, path: Path, *, lock_timeout: float = 30.0) -> None:
        self.path = path
        self.lock = InstanceLock(f"{path}.lock", timeout=lock_timeout)
        self._db: sqlite3.Connection | None = None
        self._durable = False  # the connection's current `synchronous` setting is FULL

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                fd = os.open(
                    self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
                os.close(fd)
                db = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
                # WAL: a commit is one append to the -wal file; NORMAL syncs it only at
                # checkpoints, FULL (a durable transaction) at every commit.
                db.execute("PRAGMA journal_mode = WAL")
                db.execute("PRAGMA synchronous = NORMAL")
                db.executescript(SCHEMA)
            except (OSError, sqlite3.Error) as exc:
                raise StateError(f"{self.path}: cannot open state file: {exc}") from None
            self._db = db
        return self._db

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the instance lock (re-entrant); a lock that cannot be had is a StateError."""
        try:
            try:
                self.lock.acquire()
            except FileNotFoundError:  # first use: no state directory yet
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self.lock.acquire()
        except OSError as exc:  # a timeout; a read-only or full state dir
            raise StateError(f"{self.lock.path}: cannot take the state lock: {exc}") from None
        try:
            yield
        finally:
            self.lock.release()

    @contextmanager
    def transaction(self, *, durable: bool = False) -> Iterator[StateTx]:
        """Hold the instance lock and one write transaction; commit only if the block succeeds.

        `durable`: the commit is on disk when this returns, even across a power loss (see
        the module's docstring for what needs it)."""
        with self.locked():
            db = self._connect()
            try:
                if durable != self._durable:
                    db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                    self._durable = durable
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StateError(f"{self.path}: cannot begin transaction: {exc}") from None
            try:
                yield StateTx(db)
            except sqlite3.Error as exc:  # full disk, read-only file, corruption
                self._rollback(db)
                raise StateError(f"{self.path}: {exc}") from None
            except BaseException:
                self._rollback(db)
                raise
            try:
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._rollback(db)
                raise StateError(f"{self.path}: cannot commit: {exc}") from None

    @staticmethod
    def _rollback(db: sqlite3.Connection) -> None:
        """Roll back if a transaction is still open (SQLite ends some on its own, e.g. on a
        full disk); never let a failing rollback hide the error that caused it."""
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass

    def read(self) -> StateTx:
        """Unlocked read access (SQLite gives a consistent snapshot per query)."""
        return StateTx(self._connect())

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
            self._durable = False
        self.lock.close()
