"""Audit trail: one JSON line per grant event, and ``webknockctl log`` to read it back.

With ``audit_log`` set, every event is appended to that file (O_APPEND, one write per
line; created root:adm 0640, or 0600 without an ``adm`` group) and the file is reopened
when logrotate moved it away. Without it, each line goes to the logger ``webknock.server.audit``
(the daemon's journal).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import ipaddress
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

from webknock.config import ServerConfig
from webknock.server.events import KINDS, Event

log = logging.getLogger("webknock.server.audit")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
AUDIT_GROUP = "adm"
_RELATIVE = re.compile(r"(\d+)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_ROTATED = re.compile(r"\.(\d+)(\.gz)?")
_DATED = re.compile(r"-(\d{8,10})(\.gz)?")


def record(event: Event) -> dict[str, Any]:
    """The audit line of one event: epoch and ISO time first, then the event's fields."""
    fields = event.to_dict()
    stamp = dt.datetime.fromtimestamp(event.time, dt.UTC).isoformat(timespec="seconds")
    return {"time": fields.pop("time"), "date": stamp.replace("+00:00", "Z"), **fields}


def _audit_gid() -> int:
    import grp

    try:
        return grp.getgrnam(AUDIT_GROUP).gr_gid
    except KeyError:
        return -1


class AuditSink:
    """Event sink that appends JSON lines to `path` (or logs them when `path` is None)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.fd: int | None = None
        self.lock = threading.Lock()

    def __call__(self, event: Event) -> None:
        line = json.dumps(record(event), separators=(",", ":"))
        if self.path is None:
            log.info("%s", line)
            return
        data = (line + "\n").encode()
        with self.lock:
            try:
                fd = self._open()
                written = os.write(fd, data)
                if written != len(data):
                    raise OSError(f"short write ({written} of {len(data)} bytes)")
            except OSError as exc:
                self._close()
                log.error("cannot append to audit log %s (%s): %s", self.path, exc, line)

    def _open(self) -> int:
        """The open file, reopened when the path no longer names it (rotated, removed)."""
        assert self.path is not None
        if self.fd is not None:
            try:
                st, mine = os.stat(self.path), os.fstat(self.fd)
                if (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino):
                    return self.fd
            except FileNotFoundError:
                pass
            self._close()
        flags = os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = self._create(flags)
        except FileExistsError:
            fd = os.open(self.path, flags)
        except FileNotFoundError:
            self._make_parent()
            fd = self._create(flags)
        self.fd = fd
        return fd

    def _create(self, flags: int) -> int:
        """A new trail file: root:adm 0640 when root and the group exists, else 0600."""
        assert self.path is not None
        fd = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o600)
        gid = _audit_gid() if os.geteuid() == 0 else -1
        if gid != -1:
            os.fchown(fd, 0, gid)
        os.fchmod(fd, 0o640 if gid != -1 else 0o600)
        return fd

    def _make_parent(self) -> None:
        """The log directory: 0750, group adm (when root), so adm members can read the trail."""
        assert self.path is not None
        parent = self.path.parent
        parent.mkdir(mode=0o750, parents=True)
        gid = _audit_gid() if os.geteuid() == 0 else -1
        if gid != -1:
            os.chown(parent, 0, gid)
        os.chmod(parent, 0o750)  # noqa: S103 - not the umask: adm reads the trail

    def _close(self) -> None:
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None

    def close(self) -> None:
        with self.lock:
            self._close()


# -- reading ------------------------------------------------------------------------------


def trail_files(path: Path) -> list[Path]:
    """The audit file and its rotations, oldest first: ``-DATE[.gz]`` (dateext) by date,
    then ``.N[.gz]`` from the highest N, then the live file."""
    dated: list[tuple[str, Path]] = []
    numbered: list[tuple[int, Path]] = []
    try:
        names = os.listdir(path.parent)
    except FileNotFoundError:
        names = []
    for name in names:
        if not name.startswith(path.name) or name == path.name:
            continue
        tail = name[len(path.name) :]
        if m := _ROTATED.fullmatch(tail):
            numbered.append((int(m.group(1)), path.parent / name))
        elif m := _DATED.fullmatch(tail):
            dated.append((m.group(1), path.parent / name))
    files = [p for _, p in sorted(dated)] + [p for _, p in sorted(numbered, reverse=True)]
    if path.exists():
        files.append(path)
    return files


def read_trail(files: list[Path]) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of `files` in order, and a note per file with malformed lines."""
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for path in files:
        opener = gzip.open if path.name.endswith(".gz") else open
        bad = 0
        with opener(path, "rt", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError:
                    bad += 1
                    continue
                if isinstance(rec, dict) and isinstance(rec.get("time"), int | float):
                    records.append(rec)
                else:
                    bad += 1
        if bad:
            notes.append(f"{path}: skipped {bad} malformed line(s)")
    return records, notes


def parse_when(text: str, now: float) -> float:
    """Unix time (``1764000000``), ISO 8601 (``2026-11-25T08:00``, local unless it has a
    zone) or relative to now (``90s``, ``10m``, ``2h``, ``1d``, ``1w``)."""
    text = text.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    if m := _RELATIVE.fullmatch(text):
        return now - int(m.group(1)) * _UNITS[m.group(2)]
    try:
        return dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(
            f"{text!r} is not a Unix time, an ISO 8601 time or a relative time like 10m, 2h, 1d"
        ) from None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address or CIDR network") from None


def parse_kinds(values: list[str]) -> frozenset[str]:
    kinds = frozenset(k.strip() for v in values for k in v.split(",") if k.strip())
    bad = sorted(kinds - set(KINDS))
    if bad:
        raise ValueError(f"{bad[0]!r} is not an event kind ({', '.join(KINDS)})")
    return kinds


def matches(
    rec: dict[str, Any],
    *,
    since: float | None,
    until: float | None,
    network: Network | None,
    kinds: frozenset[str],
) -> bool:
    t = rec["time"]
    if (since is not None and t < since) or (until is not None and t > until):
        return False
    if kinds and rec.get("event") not in kinds:
        return False
    if network is not None:  # an address, or the network of an open_prefix grant
        try:
            opened = ipaddress.ip_network(str(rec.get("ip", "")), strict=False)
        except ValueError:
            return False
        return opened.version == network.version and opened.overlaps(network)
    return True


def _clean(text: str, width: int = 80) -> str:
    """Safe for a terminal: no control characters, bounded length."""
    out = "".join(c if c.isprintable() else "?" for c in text)
    return out if len(out) <= width else out[: width - 3] + "..."


def _local(ts: Any) -> str:
    if not isinstance(ts, int | float):
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def print_table(records: list[dict[str, Any]]) -> None:
    rows = [("TIME", "EVENT", "ADDRESS", "PORT", "EXPIRES", "DETAIL")]
    for rec in records:
        port = f"{rec.get('proto')}/{rec.get('port')}" if rec.get("proto") else ""
        detail = rec.get("reason") or rec.get("user_agent") or ""
        rows.append(
            (
                _local(rec["time"]),
                _clean(str(rec.get("event", "?")), 10),
                _clean(str(rec.get("ip", "")), 43),
                _clean(port, 12),
                _local(rec.get("expires")),
                _clean(str(detail)),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def cmd_log(cfg: ServerConfig, args: argparse.Namespace) -> int:
    """``webknockctl log``: filter and print the audit trail."""
    now = time.time()
    try:
        since = parse_when(args.since, now) if args.since else None
    except ValueError as exc:
        return _usage(f"--since: {exc}")
    try:
        until = parse_when(args.until, now) if args.until else None
    except ValueError as exc:
        return _usage(f"--until: {exc}")
    try:
        network = parse_network(args.ip) if args.ip else None
    except ValueError as exc:
        return _usage(f"--ip: {exc}")
    try:
        kinds = parse_kinds(args.event or [])
    except ValueError as exc:
        return _usage(f"--event: {exc}")
    if cfg.audit_log is None:
        return _usage(
            f"{cfg.source}: [server] audit_log is not set, so the audit trail is in the "
            f"journal: journalctl -u webknockd@{cfg.instance} -g '\"event\"' (set audit_log = "
            f"/var/log/webknock/{cfg.instance}.jsonl to use webknockctl log)"
        )
    files = trail_files(cfg.audit_log)
    try:
        records, notes = read_trail(files)
    except (OSError, EOFError) as exc:  # EOFError: a truncated .gz
        print(f"webknockctl log: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for note in notes:
        print(f"webknockctl log: {note}", file=sys.stderr)
    selected = [
        r for r in records if matches(r, since=since, until=until, network=network, kinds=kinds)
    ]
    if args.json:
        print(json.dumps(selected, indent=2))
    elif selected:
        print_table(selected)
    elif not files:
        print(f"no audit trail yet: {cfg.audit_log} does not exist", file=sys.stderr)
    else:
        print("no matching events", file=sys.stderr)
    return EXIT_OK


def _usage(msg: str) -> int:
    print(f"webknockctl log: {msg}", file=sys.stderr)
    return EXIT_USAGE


def add_log_command(sub: Any) -> None:
    """Register `webknockctl log` on the subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser(
        "log",
        help="read the audit trail (audit_log and its rotations)",
        description="Print audit events, oldest first, from audit_log and its rotated "
        "(.1, .N.gz) files. Times: Unix time, ISO 8601 or relative (10m, 2h, 1d).",
    )
    p.add_argument("--since", metavar="WHEN", help="only events at or after WHEN")
    p.add_argument("--until", metavar="WHEN", help="only events at or before WHEN")
    p.add_argument(
        "--ip",
        metavar="ADDR|CIDR",
        help="only grants of this address or network (also network grants that overlap it)",
    )
    p.add_argument(
        "--event",
        action="append",
        metavar="KIND",
        help=f"only these kinds ({', '.join(KINDS)}); repeat or comma-separate",
    )
    p.add_argument("--json", action="store_true", help="print a JSON array of events")
    p.set_defaults(func=cmd_log)
