"""Enrolled clients of protocol v2: one plain-text file per client in ``clients_dir``.

``<clients_dir>/<NAME>.conf``, written by ``webknockctl client add`` or deployed by
Ansible, Salt or a git checkout; one ``key = value`` per line, ``#`` comments::

    key = wk2:A6EHv_POEL4dcN0Y50vAmWfk1jCbpQ1fHdyGZBJVMbg alice@laptop
    ports = tcp/22, udp/51820      # a subset of the instance's; default: all of them
    max_time = 3600                # capped to the instance's max_time; default: that
    from = 192.0.2.0/24, 2001:db8::/32   # source networks; default: anywhere
    open_prefix = 24, 64           # open its IPv4 /24, IPv6 /64; default: the address
    expires = 2027-06-30           # the key is refused after this day (UTC); default: never
    enabled = yes

``open_prefix = V4[, V6]``: a knock opens the ports for the network of that length around
the client's address instead of the address alone, for a carrier-grade NAT whose later
connections may leave from another address of its pool (IPv4) and for IPv6 privacy
addresses that change within their /64. The knock itself must still come from the address
it names. The first number is the IPv4 length (16-32), the second the IPv6 length (32-128);
a full length opens the address alone, so ``24`` (or ``24, 128``) widens IPv4 only and
``32, 64`` IPv6 only.

A file that does not parse, a duplicate key or an unusable name is a :class:`Problem`
naming the file and line; that client is skipped and the others are served.
:class:`ClientRegistry` re-reads the directory when anything in it changed, so an
enrolment or a removal takes effect for the next knock.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from webknock.addresses import Address, Network
from webknock.protocol.v2 import PORT, V2Error, key_id, parse_public_key, public_key_text

SUFFIX = ".conf"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
KEYS = ("key", "ports", "max_time", "from", "open_prefix", "expires", "enabled")
#: The prefix lengths open_prefix accepts per family: at most a /16 or a /32 opened.
OPEN_PREFIX_RANGE = {4: (16, 32), 6: (32, 128)}
MAX_FILE = 65536

Port = tuple[str, int]


class ClientError(ValueError):
    """A client file is not usable: `message` says why, `line` where (0: the whole file)."""

    def __init__(self, message: str, line: int = 0) -> None:
        super().__init__(message)
        self.message, self.line = message, line


@dataclass(frozen=True)
class Problem:
    """Why one client file is skipped."""

    path: Path
    line: int  # 0: the file as a whole
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{where}: {self.message}"


@dataclass(frozen=True)
class Client:
    """One enrolled client and its policy."""

    name: str
    public: bytes
    comment: str = ""
    ports: frozenset[Port] | None = None  # None: every port the instance offers
    max_time: int | None = None  # None: the instance's
    sources: tuple[Network, ...] = ()  # empty: anywhere
    expires: datetime.date | None = None  # refused after this day (UTC)
    enabled: bool = True
    open_prefix: tuple[int, int] | None = None  # (IPv4, IPv6) lengths; None: the address
    path: Path | None = field(default=None, compare=False)

    @property
    def kid(self) -> bytes:
        return key_id(self.public)

    def allowed(self, offered: frozenset[Port]) -> frozenset[Port]:
        return offered if self.ports is None else self.ports & offered

    def longest(self, max_time: int) -> int:
        return max_time if self.max_time is None else min(self.max_time, max_time)

    def expired(self, now: float) -> bool:
        if self.expires is None:
            return False
        today = datetime.datetime.fromtimestamp(now, datetime.UTC).date()
        return today > self.expires

    def admits(self, addr: Address) -> bool:
        return not self.sources or any(addr in net for net in self.sources)

    def prefix_for(self, addr: Address) -> int | None:
        """The prefix length a knock from `addr` opens; None: the address alone."""
        if self.open_prefix is None:
            return None
        length = self.open_prefix[0 if addr.version == 4 else 1]
        return None if length == (32 if addr.version == 4 else 128) else length

    def render(self) -> str:
        """The client's file."""
        lines = [f"key = {public_key_text(self.public, self.comment)}"]
        if self.ports is not None:
            lines.append(f"ports = {format_ports(self.ports)}")
        if self.max_time is not None:
            lines.append(f"max_time = {self.max_time}")
        if self.sources:
            lines.append(f"from = {', '.join(str(n) for n in self.sources)}")
        if self.open_prefix is not None:
            lines.append(f"open_prefix = {format_open_prefix(self.open_prefix)}")
        if self.expires is not None:
            lines.append(f"expires = {self.expires.isoformat()}")
        lines.append(f"enabled = {'yes' if self.enabled else 'no'}")
        return f"# webknock client {self.name}\n" + "\n".join(lines) + "\n"


def format_ports(ports: frozenset[Port] | tuple[Port, ...]) -> str:
    return ", ".join(f"{p}/{n}" for p, n in sorted(ports))


def parse_ports(text: str) -> frozenset[Port]:
    """``tcp/22, udp/51820``; raises ValueError."""
    ports: set[Port] = set()
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        match = PORT.fullmatch(item.lower())
        if not match or not 1 <= int(match[2]) <= 65535:
            raise ValueError(f"{item!r} is not tcp/N or udp/N (N from 1 to 65535)")
        ports.add((match[1], int(match[2])))
    return frozenset(ports)


def parse_sources(text: str) -> tuple[Network, ...]:
    nets: list[Network] = []
    for item in text.replace(" ", ",").split(","):
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(f"{item!r} is not a network (CIDR)") from None
    return tuple(nets)


def parse_open_prefix(text: str) -> tuple[int, int]:
    """``24`` (IPv4 only), ``24, 64`` or ``32, 64`` (IPv6 only): (IPv4, IPv6) lengths;
    raises ValueError."""
    items = [i for i in text.replace(" ", ",").split(",") if i]
    if not 1 <= len(items) <= 2:
        raise ValueError("must be an IPv4 prefix length, optionally followed by an IPv6 one")
    lengths = [OPEN_PREFIX_RANGE[4][1], OPEN_PREFIX_RANGE[6][1]]
    for i, (item, family) in enumerate(zip(items, (4, 6), strict=False)):
        low, high = OPEN_PREFIX_RANGE[family]
        if not (item.isascii() and item.isdigit()) or not low <= int(item) <= high:
            raise ValueError(
                f"{item!r} is not an IPv{family} prefix length from {low} to {high}"
                f" ({high}: the address alone)"
            )
        lengths[i] = int(item)
    return lengths[0], lengths[1]


def format_open_prefix(lengths: tuple[int, int]) -> str:
    """The open_prefix value: ``24, 64``, or ``24`` when IPv6 opens the address alone."""
    v4, v6 = lengths
    return str(v4) if v6 == OPEN_PREFIX_RANGE[6][1] else f"{v4}, {v6}"


def parse_date(text: str) -> datetime.date:
    try:
        return datetime.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a date YYYY-MM-DD") from None


def parse_max_time(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 604800:
        raise ValueError("must be a whole number of seconds, 1-604800")
    return int(text)


def parse_enabled(text: str) -> bool:
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise ValueError("must be yes or no")


def check_name(name: str) -> str:
    """A client name: letters, digits, ``.``, ``_``, ``-``, at most 64; raises ValueError."""
    if not NAME.fullmatch(name):
        raise ValueError(
            f"client name {name[:70]!r} must be 1-64 letters, digits, '.', '_' or '-' "
            "(no '/', spaces or control characters), starting with a letter or digit"
        )
    return name


def parse_client(name: str, text: str, path: Path | None = None) -> Client:
    """Parse the text of one client file; raises ClientError with the line at fault."""
    values: dict[str, tuple[int, str]] = {}
    for number, raw in enumerate(text.split("\n"), 1):
        line = re.split(r"\s#", raw.replace("\t", " ").strip(), maxsplit=1)[0].strip()
        if not line or line.startswith("#"):
            continue
        if not line.isprintable():
            raise ClientError("control characters", number)
        key, sep, value = line.partition("=")
        key = key.strip().lower()
        if not sep or key not in KEYS:
            raise ClientError(f"expected one of {', '.join(KEYS)} = value", number)
        if key in values:
            raise ClientError(f"{key} given twice", number)
        values[key] = (number, value.strip())
    if "key" not in values:
        raise ClientError("no line key = wk2:...")
    converted: dict[str, object] = {}
    for key, conv in (
        ("ports", parse_ports),
        ("max_time", parse_max_time),
        ("from", parse_sources),
        ("open_prefix", parse_open_prefix),
        ("expires", parse_date),
        ("enabled", parse_enabled),
    ):
        if key in values:
            number, value = values[key]
            try:
                converted[key] = conv(value)
            except ValueError as exc:
                raise ClientError(f"{key}: {exc}", number) from None
            if key == "from" and not converted[key]:  # an empty restriction never means anywhere
                raise ClientError("from: no network (leave the line out for anywhere)", number)
    number, key_text = values["key"]
    try:
        public, comment = parse_public_key(key_text)
    except V2Error as exc:
        raise ClientError(f"key: {exc}", number) from None
    return Client(
        name=name,
        public=public,
        comment=comment,
        ports=converted.get("ports"),  # type: ignore[arg-type]
        max_time=converted.get("max_time"),  # type: ignore[arg-type]
        sources=converted.get("from", ()),  # type: ignore[arg-type]
        expires=converted.get("expires"),  # type: ignore[arg-type]
        enabled=converted.get("enabled", True),  # type: ignore[arg-type]
        open_prefix=converted.get("open_prefix"),  # type: ignore[arg-type]
        path=path,
    )


def load_clients(directory: Path) -> tuple[dict[str, Client], list[Problem]]:
    """Every usable client by name, and why the others are skipped. A key enrolled twice
    is skipped in both files (neither may speak for the other)."""
    clients: dict[str, Client] = {}
    problems: list[Problem] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return {}, []
    except OSError as exc:
        return {}, [Problem(directory, 0, f"cannot list: {exc.strerror}")]
    for filename in names:
        if filename.startswith(".") or not filename.endswith(SUFFIX):
            continue
        path = directory / filename
        name = filename[: -len(SUFFIX)]
        try:
            check_name(name)
        except ValueError as exc:
            problems.append(Problem(path, 0, str(exc)))
            continue
        try:
            with open(path, "rb") as fh:
                data = fh.read(MAX_FILE + 1)
            if len(data) > MAX_FILE:
                raise ClientError(f"over {MAX_FILE} bytes")
            clients[name] = parse_client(name, data.decode("utf-8"), path)
        except UnicodeDecodeError:
            problems.append(Problem(path, 0, "not a UTF-8 text file"))
        except OSError as exc:
            problems.append(Problem(path, 0, f"cannot read: {exc.strerror}"))
        except ClientError as exc:
            problems.append(Problem(path, exc.line, exc.message))
    by_kid: dict[bytes, list[str]] = {}
    for client in clients.values():
        by_kid.setdefault(client.kid, []).append(client.name)
    for same in by_kid.values():
        if len(same) > 1:
            for name in same:
                others = ", ".join(n for n in same if n != name)
                problems.append(
                    Problem(clients[name].path or directory, 0, f"same key as {others}")
                )
                del clients[name]
    return clients, problems


class ClientRegistry:
    """The clients of a directory, read again whenever a file in it changes."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._stamp: tuple[tuple[str, int, int, int], ...] | None = None
        self.clients: dict[str, Client] = {}
        self.by_kid: dict[bytes, Client] = {}
        self.problems: list[Problem] = []

    def _current_stamp(self) -> tuple[tuple[str, int, int, int], ...]:
        try:
            with os.scandir(self.directory) as it:
                entries = []
                for e in it:
                    try:
                        st = e.stat()
                    except OSError:
                        continue
                    entries.append((e.name, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            return ()
        return tuple(sorted(entries))

    def refresh(self) -> bool:
        """Re-read if anything changed; True if it did."""
        stamp = self._current_stamp()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        self.clients, self.problems = load_clients(self.directory)
        self.by_kid = {c.kid: c for c in self.clients.values()}
        return True

    def lookup(self, kid: bytes) -> Client | None:
        return self.by_kid.get(kid)
