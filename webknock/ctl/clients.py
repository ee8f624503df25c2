"""``webknockctl client``: enrol, list, show, enable, disable and remove v2 clients.

Each client is one file ``<clients_dir>/<NAME>.conf`` (:mod:`webknock.server.clients`); webknockd
re-reads the directory when it changes, so every command here takes effect for the next
knock without a restart. Notices go to stderr, so that the profile ``client add`` prints on
stdout can be redirected into a file as it is.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from webknock.config import ServerConfig
from webknock.ctl import common as ctl
from webknock.fsutil import write_atomic
from webknock.keys import KeysError, create_server_key, load_server_key
from webknock.protocol.v2 import SigningKey, V2Error, parse_public_key, public_key_text
from webknock.server.clients import (
    SUFFIX,
    Client,
    ClientError,
    check_name,
    format_open_prefix,
    format_ports,
    load_clients,
    parse_client,
    parse_date,
    parse_max_time,
    parse_open_prefix,
    parse_ports,
    parse_sources,
)

FILE_MODE = 0o644  # public keys and policy: readable, writable by root alone
DIR_MODE = 0o755


class Refused(Exception):
    """A command cannot go on: the message for stderr and the exit status."""

    def __init__(self, message: str, status: int = ctl.EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def _client_path(cfg: ServerConfig, name: str) -> Path:
    return cfg.clients_dir / f"{name}{SUFFIX}"


def _checked_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def _read_client(cfg: ServerConfig, name: str) -> Client:
    """The client file of `name`, parsed; Refused (exit 1) if there is none or it is broken."""
    path = _client_path(cfg, _checked_name(name))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise Refused(f"no client {name} (no file {path})", ctl.EXIT_ERROR) from None
    try:
        return parse_client(name, data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise Refused(f"{path}: not a UTF-8 text file", ctl.EXIT_ERROR) from None
    except ClientError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise Refused(f"{where}: {exc.message}", ctl.EXIT_ERROR) from None


def _on_file(cfg: ServerConfig) -> list[Client]:
    """Every client file that parses, enabled or not, including those the daemon skips
    (a key enrolled twice): what a new enrolment must not collide with."""
    out: list[Client] = []
    try:
        names = sorted(os.listdir(cfg.clients_dir))
    except FileNotFoundError:
        return []
    for filename in names:
        if filename.startswith(".") or not filename.endswith(SUFFIX):
            continue
        path = cfg.clients_dir / filename
        try:
            with open(path, "rb") as fh:
                text = fh.read().decode("utf-8")
            out.append(parse_client(filename[: -len(SUFFIX)], text, path))
        except (OSError, UnicodeDecodeError, ClientError):
            continue
    return out


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def _create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically, refusing (FileExistsError) if it exists: the whole file
    under a dot-name (which the daemon skips), then link(2), which never replaces."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.new")
    write_atomic(tmp, data, mode)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def _ensure_clients_dir(cfg: ServerConfig) -> None:
    try:
        os.mkdir(cfg.clients_dir, DIR_MODE)
    except FileExistsError:
        if not cfg.clients_dir.is_dir():
            raise Refused(f"{cfg.clients_dir} is not a directory", ctl.EXIT_ERROR) from None
        return
    os.chmod(cfg.clients_dir, DIR_MODE)  # whatever the umask
    os.chown(cfg.clients_dir, 0, 0)
    print(f"created the clients directory {cfg.clients_dir}", file=sys.stderr)


def _existing_server_key(cfg: ServerConfig) -> SigningKey | None:
    """The server key; None if there is none yet, Refused (exit 1) if it is unusable."""
    if not os.path.lexists(cfg.server_key_file):
        return None
    try:
        return load_server_key(cfg.server_key_file)
    except KeysError as exc:
        raise Refused(f"server key unusable: {exc}", ctl.EXIT_ERROR) from None


def _new_server_key(cfg: ServerConfig) -> SigningKey:
    key = create_server_key(cfg.server_key_file)
    print(
        f"created the server key {cfg.server_key_file} (0600 root): protocol v2 is on for "
        f"instance {cfg.instance}",
        file=sys.stderr,
    )
    return key


def profile_text(cfg: ServerConfig, client: Client, server_key: str) -> str:
    """The ``[client]`` profile the enrolled client pastes into its configuration."""
    lines = [
        f"# webknock profile: client {client.name} of instance {cfg.instance} "
        f"(key id {client.kid.hex()})",
        "[client]",
    ]
    if cfg.url:
        lines.append(f"url = {cfg.url}")
    else:
        lines += [
            "# url = https://HOST/PATH  <- admin: write the knock URL here, or set [server] url",
            f"#                            in {cfg.source} to have it printed",
        ]
    lines += [
        f"server_key = {server_key}",
        "# key_file = PATH  <- client: fill in the file of your own private key (the one",
        "#                     `webknock keygen` wrote); it never leaves your machine",
        f"ports = {format_ports(client.allowed(cfg.offered()))}",
    ]
    return "\n".join(lines) + "\n"


T = TypeVar("T")


def _option(value: str | None, parse: Callable[[str], T], flag: str) -> T | None:
    """`value` parsed, None when the option was not given; a bad one is refused naming
    `flag`."""
    if value is None:
        return None
    try:
        return parse(value)
    except ValueError as exc:
        raise Refused(f"{flag}: {exc}") from None


def _build_client(cfg: ServerConfig, args: argparse.Namespace) -> Client:
    """The client `args` describe, every value checked against the instance."""
    name = _checked_name(args.name)
    try:
        public, comment = parse_public_key(args.key)
    except V2Error as exc:
        raise Refused(f"--key: {exc}") from None
    if not comment.isprintable():
        raise Refused("--key: the comment has control characters")
    ports = _option(args.ports, parse_ports, "--ports")
    if ports is not None:
        if not ports:
            raise Refused("--ports: no port given (leave --ports out for every offered port)")
        unknown = sorted(ports - cfg.offered())
        if unknown:
            raise Refused(
                f"--ports: {format_ports(tuple(unknown))} not offered by instance "
                f"{cfg.instance} (it offers {format_ports(cfg.offered())})"
            )
    max_time = _option(args.max_time, parse_max_time, "--max-time")
    if max_time is not None and max_time > cfg.max_time:
        raise Refused(f"--max-time: {max_time} is over the instance's max_time {cfg.max_time}")
    sources = _option(args.sources, parse_sources, "--from")
    if sources is not None and not sources:
        raise Refused("--from: no network given (leave --from out for anywhere)")
    expires = _option(args.expires, parse_date, "--expires")
    if expires is not None and expires < _today():
        raise Refused(f"--expires: {expires} is past: the key would be refused already")
    open_prefix = _option(args.open_prefix, parse_open_prefix, "--open-prefix")
    client = Client(
        name, public, comment, ports, max_time, sources or (), expires, open_prefix=open_prefix
    )
    try:  # what the daemon will read back is exactly this client
        same = parse_client(name, client.render()) == client
    except ClientError:
        same = False
    if not same:
        raise Refused(f"--key: the comment {comment!r} cannot be kept in a client file")
    return client


def cmd_add(cfg: ServerConfig, args: argparse.Namespace) -> int:
    client = _build_client(cfg, args)
    path = _client_path(cfg, client.name)
    if os.path.lexists(path):
        raise Refused(f"client {client.name} is already enrolled ({path})")
    for other in _on_file(cfg):
        if other.public == client.public:
            raise Refused(f"this key is already enrolled as client {other.name} ({other.path})")
    server = _existing_server_key(cfg)
    if server is not None and server.public == client.public:
        raise Refused("--key is the server's own key")
    _ensure_clients_dir(cfg)
    if server is None:  # v2 starts with the first client
        server = _new_server_key(cfg)
    try:
        _create_exclusive(path, client.render().encode(), FILE_MODE)
    except FileExistsError:
        raise Refused(f"client {client.name} is already enrolled ({path})") from None
    print(f"enrolled client {client.name}: {path}", file=sys.stderr)
    sys.stdout.write(profile_text(cfg, client, server.public_text()))
    return ctl.EXIT_OK


def client_json(cfg: ServerConfig, client: Client) -> dict[str, Any]:
    """What the client may do on this instance (ports and max_time as effective)."""
    return {
        "name": client.name,
        "enabled": client.enabled,
        "comment": client.comment,
        "ports": [f"{p}/{n}" for p, n in sorted(client.allowed(cfg.offered()))],
        "max_time": client.longest(cfg.max_time),
        "from": [str(n) for n in client.sources],
        "open_prefix": dict(zip(("ipv4", "ipv6"), client.open_prefix or (32, 128), strict=True)),
        "expires": client.expires.isoformat() if client.expires else None,
        "kid": client.kid.hex(),
    }


def _opens_text(client: Client) -> str:
    """What a knock opens: ``the address alone``, or ``its IPv4 /24, its IPv6 /64 (open_prefix
    = 24, 64)`` (either family may be the address alone)."""
    if client.open_prefix is None or client.open_prefix == (32, 128):
        return "the address alone"
    v4, v6 = client.open_prefix
    four = "the IPv4 address alone" if v4 == 32 else f"its IPv4 /{v4}"
    six = "the IPv6 address alone" if v6 == 128 else f"its IPv6 /{v6}"
    return f"{four}, {six} (open_prefix = {format_open_prefix(client.open_prefix)})"


def _expires_text(client: Client, now: float) -> str:
    if client.expires is None:
        return "never"
    return f"{client.expires}{' (expired)' if client.expired(now) else ''}"


def cmd_list(cfg: ServerConfig, args: argparse.Namespace) -> int:
    clients, problems = load_clients(cfg.clients_dir)
    for problem in problems:
        print(f"webknockctl client list: not served: {problem}", file=sys.stderr)
    ordered = [clients[name] for name in sorted(clients)]
    if args.json:
        print(json.dumps([client_json(cfg, c) for c in ordered], indent=2))
        return ctl.EXIT_OK
    if not ordered:
        print(f"no clients enrolled in {cfg.clients_dir}")
        return ctl.EXIT_OK
    now = time.time()
    rows = [("NAME", "ENABLED", "PORTS", "MAX_TIME", "FROM", "OPEN_PREFIX", "EXPIRES", "COMMENT")]
    for c in ordered:
        rows.append(
            (
                c.name,
                "yes" if c.enabled else "no",
                format_ports(c.allowed(cfg.offered())).replace(" ", "") or "-",
                str(c.longest(cfg.max_time)),
                ",".join(str(n) for n in c.sources) or "any",
                format_open_prefix(c.open_prefix).replace(" ", "") if c.open_prefix else "-",
                _expires_text(c, now),
                c.comment or "-",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return ctl.EXIT_OK


def cmd_show(cfg: ServerConfig, args: argparse.Namespace) -> int:
    client = _read_client(cfg, args.name)
    now = time.time()
    _, problems = load_clients(cfg.clients_dir)
    skipped = [p.message for p in problems if p.path == client.path]
    if skipped:
        state = f"NOT SERVED: {'; '.join(skipped)}"
    elif not client.enabled:
        state = "disabled (refused as an unknown key)"
    elif client.expired(now):
        state = "expired (refused)"
    else:
        state = "active"
    ports = format_ports(client.allowed(cfg.offered())) or "none"
    if client.ports is None:
        ports += " (every port the instance offers)"
    elif client.ports - cfg.offered():
        ports += f" (on file also {format_ports(client.ports - cfg.offered())}: not offered)"
    max_time = str(client.longest(cfg.max_time))
    if client.max_time is None:
        max_time += " (the instance's max_time)"
    elif client.max_time > cfg.max_time:
        max_time += f" (on file {client.max_time}, capped to the instance's max_time)"
    for label, value in (
        ("name", client.name),
        ("file", str(client.path)),
        ("state", state),
        ("enabled", "yes" if client.enabled else "no"),
        ("key", public_key_text(client.public, client.comment)),
        ("kid", client.kid.hex()),
        ("comment", client.comment or "-"),
        ("ports", ports),
        ("max_time", max_time),
        ("from", ", ".join(str(n) for n in client.sources) or "anywhere"),
        ("opens", _opens_text(client)),
        ("expires", _expires_text(client, now)),
    ):
        print(f"{label + ':':<10}{value}")
    return ctl.EXIT_OK


def _enabled_text(text: str, enabled: bool) -> str:
    """`text` with its ``enabled`` line set (appended if there is none); every other line,
    comments included, as it was."""
    value = f"enabled = {'yes' if enabled else 'no'}"
    lines = text.split("\n")
    for i, raw in enumerate(lines):
        line = re.split(r"\s#", raw.strip(), maxsplit=1)[0].strip()
        if line.startswith("#"):
            continue
        if line.partition("=")[0].strip().lower() == "enabled":
            lines[i] = value
            return "\n".join(lines)
    if lines and lines[-1] == "":
        lines.pop()
    return "\n".join([*lines, value, ""])


def _set_enabled(cfg: ServerConfig, args: argparse.Namespace, enabled: bool) -> int:
    client = _read_client(cfg, args.name)
    assert client.path is not None
    word = "enabled" if enabled else "disabled"
    changed = client.enabled != enabled
    if not changed:
        print(f"client {client.name} is already {word}")
    else:
        st = os.stat(client.path)
        text = _enabled_text(client.path.read_text(encoding="utf-8"), enabled)
        wanted = dataclasses.replace(client, enabled=enabled)
        try:
            kept = parse_client(client.name, text) == wanted
        except ClientError:
            kept = False
        if not kept:  # a line the simple edit got wrong: write the file anew
            text = wanted.render()
        write_atomic(
            client.path,
            text.encode(),
            stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
        )
        print(f"client {client.name} {word}")
    if enabled and client.expired(time.time()):
        print(f"(its key expired after {client.expires}: still refused)", file=sys.stderr)
    if not enabled:
        if args.revoke:
            _revoke(cfg, client.name)
        elif changed:
            print(
                f"(its live grants stay until they expire: "
                f"webknockctl client disable --revoke {client.name} or "
                f"webknockctl revoke --client {client.name} closes them)",
                file=sys.stderr,
            )
    return ctl.EXIT_OK


def cmd_enable(cfg: ServerConfig, args: argparse.Namespace) -> int:
    return _set_enabled(cfg, args, True)


def cmd_disable(cfg: ServerConfig, args: argparse.Namespace) -> int:
    return _set_enabled(cfg, args, False)


def _revoke(cfg: ServerConfig, name: str) -> None:
    gone = ctl.engine_for(cfg).revoke_client(name, time.time())
    print(f"revoked {len(gone)} live grant(s) of client {name}")
    for g in gone:
        print(f"revoked {g.key}")


def cmd_remove(cfg: ServerConfig, args: argparse.Namespace) -> int:
    name = _checked_name(args.name)
    path = _client_path(cfg, name)
    try:
        os.unlink(path)
    except FileNotFoundError:
        hint = f"; webknockctl revoke --client {name} closes grants" if args.revoke else ""
        raise Refused(f"no client {name} (no file {path}){hint}", ctl.EXIT_ERROR) from None
    print(f"removed client {name} ({path})")
    if args.revoke:
        _revoke(cfg, name)
    return ctl.EXIT_OK


Command = Callable[[ServerConfig, argparse.Namespace], int]


def _run(func: Command, what: str) -> Command:
    def run(cfg: ServerConfig, args: argparse.Namespace) -> int:
        try:
            return int(func(cfg, args))
        except Refused as exc:
            print(f"webknockctl client {what}: {exc}", file=sys.stderr)
            return exc.status

    return run


def add_client_command(sub: Any) -> None:
    """Add ``client`` and its subcommands to webknockctl's subparsers `sub`."""
    group = sub.add_parser(
        "client",
        help="enrol, list, show, enable, disable or remove protocol v2 clients",
        description="Protocol v2 clients: one file per client in clients_dir; webknockd "
        "reads changes before the next knock.",
    )
    csub = group.add_subparsers(dest="client_command", required=True, metavar="SUBCOMMAND")

    p = csub.add_parser("add", help="enrol a client and print its profile")
    p.add_argument("name", metavar="NAME", help="letters, digits, '.', '_', '-' (max 64)")
    p.add_argument(
        "--key",
        required=True,
        metavar="KEYTEXT",
        help="the client's public key: 'wk2:... [COMMENT]' (quote it)",
    )
    p.add_argument(
        "--ports", metavar="tcp/N,udp/N", help="ports it may open (default: all offered)"
    )
    p.add_argument(
        "--max-time", metavar="S", help="longest grant in seconds (default: the instance's)"
    )
    p.add_argument("--from", dest="sources", metavar="CIDR,...", help="networks it may knock from")
    p.add_argument(
        "--open-prefix",
        metavar="V4[,V6]",
        help="open the knocking address's network of these prefix lengths instead of the "
        "address (IPv4 16-32, IPv6 32-128; 32 or 128: the address alone), e.g. 24,64",
    )
    p.add_argument("--expires", metavar="YYYY-MM-DD", help="last day (UTC) the key is accepted")
    p.set_defaults(func=_run(cmd_add, "add"))

    p = csub.add_parser("list", help="the clients webknockd serves")
    p.add_argument("--json", action="store_true", help="JSON array of client objects")
    p.set_defaults(func=_run(cmd_list, "list"))

    p = csub.add_parser("show", help="everything about one client")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_run(cmd_show, "show"))

    p = csub.add_parser("enable", help="accept a disabled client's knocks again")
    p.add_argument("name", metavar="NAME")
    p.set_defaults(func=_run(cmd_enable, "enable"), revoke=False)

    p = csub.add_parser("disable", help="refuse a client's knocks, keeping it on file")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--revoke", action="store_true", help="also close its live grants now")
    p.set_defaults(func=_run(cmd_disable, "disable"))

    p = csub.add_parser("remove", help="delete a client's file")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--revoke", action="store_true", help="also close its live grants now")
    p.set_defaults(func=_run(cmd_remove, "remove"))
