"""``webknockctl client add``: enrol a v2 client. Every value is checked against the instance
(ports it offers, its max_time), the key must be new to the instance, the file is created
exclusively (never over another), and the first client creates the server key, which turns
protocol v2 on. The profile for the client is printed on stdout, notices on stderr.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from collections.abc import Callable
from typing import TypeVar

from webknock.config import ServerConfig
from webknock.ctl.clientfiles import (
    FILE_MODE,
    checked_name,
    client_path,
    clients_on_file,
    create_exclusive,
    ensure_clients_dir,
)
from webknock.ctl.common import EXIT_ERROR, EXIT_OK, Refused
from webknock.keys import KeysError, create_server_key, load_server_key
from webknock.protocol.v2 import SigningKey, V2Error, parse_public_key
from webknock.server.clients import (
    Client,
    ClientError,
    format_ports,
    parse_client,
    parse_date,
    parse_max_time,
    parse_open_prefix,
    parse_ports,
    parse_sources,
)


def _today() -> datetime.date:
    return datetime.datetime.now(datetime.UTC).date()


def _existing_server_key(cfg: ServerConfig) -> SigningKey | None:
    """The server key; None if there is none yet, Refused (exit 1) if it is unusable."""
    if not os.path.lexists(cfg.server_key_file):
        return None
    try:
        return load_server_key(cfg.server_key_file)
    except KeysError as exc:
        raise Refused(f"server key unusable: {exc}", EXIT_ERROR) from None


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
    name = checked_name(args.name)
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
    path = client_path(cfg, client.name)
    if os.path.lexists(path):
        raise Refused(f"client {client.name} is already enrolled ({path})")
    for other in clients_on_file(cfg):
        if other.public == client.public:
            raise Refused(f"this key is already enrolled as client {other.name} ({other.path})")
    server = _existing_server_key(cfg)
    if server is not None and server.public == client.public:
        raise Refused("--key is the server's own key")
    ensure_clients_dir(cfg)
    if server is None:  # v2 starts with the first client
        server = _new_server_key(cfg)
    try:
        create_exclusive(path, client.render().encode(), FILE_MODE)
    except FileExistsError:
        raise Refused(f"client {client.name} is already enrolled ({path})") from None
    print(f"enrolled client {client.name}: {path}", file=sys.stderr)
    sys.stdout.write(profile_text(cfg, client, server.public_text()))
    return EXIT_OK
