"""The state file: the truth about live grants (SQLite, stdlib).

Every change happens inside :meth:`StateStore.transaction`, which holds the
instance lock (a filelock shared by webknockd, the cron reaper and
webknockctl) and one SQLite transaction. Callers apply the firewall batch
inside the block: a failed batch raises, the transaction rolls back, and
state and kernel still agree.

Durability is chosen per transaction. The file is in WAL mode, so every commit
survives a crash of the process that made it (it is in the kernel's page cache),
and after a power loss the file is consistent. What a power loss may lose is the
last commits before it, unless they were made ``durable`` (fsynced). Only a revoke
is made durable; a grant, renewal or expiry lost to a power loss fails closed (see
docs/design.md).
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from webknock.addresses import parse_opened, prefix_of
from webknock.server.grants import Grant, GrantKey
from webknock.server.instancelock import InstanceLock

#: `ip` is what the grant opens: an address (``192.0.2.10``) or, for a client with
#: ``open_prefix``, a network (``198.51.100.0/24``), as :attr:`GrantKey.ip_text` writes it
#: (state files of earlier versions hold addresses only: nothing to migrate).
#: `net` is the prefix the grant is counted under (:func:`webknock.addresses.prefix_of`),
#: for the per-prefix grant limit. `replay` holds the replay marks of verified packets
#: until their timestamp window has passed; `failures` the bad-packet counts per prefix.
#: Both are root's alone: the web user can neither create, delete nor date them.
TABLES = """
CREATE TABLE IF NOT EXISTS grants (
    ip TEXT NOT NULL,
    proto TEXT NOT NULL CHECK (proto IN ('tcp', 'udp')),
    port INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    first_opened REAL NOT NULL,
    last_renewed REAL NOT NULL,
    expires REAL NOT NULL,
    renew_count INTEGER NOT NULL DEFAULT 0,
    net TEXT NOT NULL DEFAULT '',
    client TEXT,
    PRIMARY KEY (ip, proto, port)
);
CREATE TABLE IF NOT EXISTS replay (
    mark BLOB PRIMARY KEY,
    expires REAL NOT NULL,
    request TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS failures (
    prefix TEXT PRIMARY KEY,
    count INTEGER NOT NULL,
    last REAL NOT NULL
) WITHOUT ROWID;
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS grants_expires ON grants (expires);
CREATE INDEX IF NOT EXISTS grants_net ON grants (net, expires);
"""


COLUMNS = "ip, proto, port, first_opened, last_renewed, expires, renew_count, client"


class StateError(Exception):
    """The state file cannot be opened, read or written."""


def _row_to_grant(row: tuple[str, str, int, float, float, float, int, str | None]) -> Grant:
    ip, proto, port, first, last, expires, count, client = row
    return Grant(GrantKey.parse(ip, proto, port), first, last, expires, count, client)


class StateTx:
    """Queries and changes inside one locked transaction."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def get(self, keys: Iterable[GrantKey]) -> dict[GrantKey, Grant]:
        found: dict[GrantKey, Grant] = {}
        for key in keys:
            row = self.db.execute(
                f"SELECT {COLUMNS} FROM grants WHERE"  # noqa: S608
                " ip = ? AND proto = ? AND port = ?",
                (key.ip_text, key.proto, key.port),
            ).fetchone()
            if row:
                found[key] = _row_to_grant(row)
        return found

    def upsert(self, grants: Iterable[Grant]) -> None:
        self.db.executemany(
            "INSERT INTO grants (ip, proto, port, first_opened, last_renewed, expires, "
            "renew_count, net, client) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (ip, proto, port) DO "
            "UPDATE SET last_renewed = excluded.last_renewed, expires = excluded.expires, "
            "renew_count = excluded.renew_count, client = excluded.client",
            [
                (
                    g.key.ip_text,
                    g.key.proto,
                    g.key.port,
                    g.first_opened,
                    g.last_renewed,
                    g.expires,
                    g.renew_count,
                    prefix_of(g.key.ip, g.key.prefixlen),
                    g.client,
                )
                for g in grants
            ],
        )

    def delete(self, keys: Iterable[GrantKey]) -> None:
        self.db.executemany(
            "DELETE FROM grants WHERE ip = ? AND proto = ? AND port = ?",
            [(k.ip_text, k.proto, k.port) for k in keys],
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

    def live_total(self, now: float) -> int:
        """Live grants of the instance."""
        row = self.db.execute("SELECT COUNT(*) FROM grants WHERE expires > ?", (now,)).fetchone()
        return int(row[0])

    def live_in_prefix(self, prefix: str, now: float) -> int:
        """Live grants counted under `prefix` (:func:`prefix_of`)."""
        row = self.db.execute(
            "SELECT COUNT(*) FROM grants WHERE net = ? AND expires > ?", (prefix, now)
        ).fetchone()
        return int(row[0])

    # -- replay marks and bad-packet counts (webknock.server.guard) ------------------------------

    def burn(self, marks: Iterable[tuple[bytes, str]], expires: float) -> list[tuple[bool, str]]:
        """Record each (mark, request id); per mark, whether it was new and the id of the
        request that burnt it."""
        burnt = []
        for mark, request in marks:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO replay (mark, expires, request) VALUES (?, ?, ?)",
                (mark, expires, request),
            )
            if cur.rowcount == 1:
                burnt.append((True, request))
                continue
            row = self.db.execute("SELECT request FROM replay WHERE mark = ?", (mark,)).fetchone()
            burnt.append((False, str(row[0])))
        return burnt

    def save_failures(self, counts: Iterable[tuple[str, int, float]]) -> None:
        self.db.executemany(
            "INSERT INTO failures (prefix, count, last) VALUES (?, ?, ?) ON CONFLICT (prefix) "
            "DO UPDATE SET count = excluded.count, last = excluded.last",
            list(counts),
        )

    def load_failures(self, since: float) -> list[tuple[str, int, float]]:
        rows = self.db.execute(
            "SELECT prefix, count, last FROM failures WHERE last > ?", (since,)
        ).fetchall()
        return [(str(p), int(c), float(t)) for p, c, t in rows]

    def forget(self, now: float, failures_before: float, keep_failures: int) -> None:
        """Drop expired replay marks, bad-packet counts older than `failures_before`, and all
        but the newest `keep_failures` counts."""
        self.db.execute("DELETE FROM replay WHERE expires <= ?", (now,))
        self.db.execute("DELETE FROM failures WHERE last <= ?", (failures_before,))
        self.db.execute(
            "DELETE FROM failures WHERE prefix NOT IN "
            "(SELECT prefix FROM failures ORDER BY last DESC LIMIT ?)",
            (keep_failures,),
        )


def _add_columns(db: sqlite3.Connection) -> None:
    """State files of 0.1 have no `net` and `client` columns: add them, fill `net` in."""
    db.execute("BEGIN IMMEDIATE")  # another process may be doing the same
    columns = {row[1] for row in db.execute("PRAGMA table_info(grants)")}
    if "client" not in columns:
        db.execute("ALTER TABLE grants ADD COLUMN client TEXT")
    if "net" in columns:
        db.execute("COMMIT")
        return
    db.execute("ALTER TABLE grants ADD COLUMN net TEXT NOT NULL DEFAULT ''")
    for (ip,) in db.execute("SELECT DISTINCT ip FROM grants").fetchall():
        db.execute("UPDATE grants SET net = ? WHERE ip = ?", (prefix_of(*parse_opened(ip)), ip))
    db.execute("COMMIT")


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
                db.executescript(TABLES)
                _add_columns(db)
                db.executescript(INDEXES)
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
