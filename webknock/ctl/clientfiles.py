"""The client files of ``clients_dir`` as webknockctl reads and writes them: one
``<NAME>.conf`` each (:mod:`webknock.server.clients` parses them), always written whole under
a dot-name the daemon skips, then linked (new: root's, FILE_MODE) or renamed (an edit: owner
and mode kept) into place.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
import sys
from pathlib import Path

from webknock.config import ServerConfig
from webknock.ctl.common import EXIT_ERROR, Refused
from webknock.fsutil import write_atomic
from webknock.server.clients import SUFFIX, Client, ClientError, check_name, parse_client

FILE_MODE = 0o644  # public keys and policy: readable, writable by root alone
DIR_MODE = 0o755


def client_path(cfg: ServerConfig, name: str) -> Path:
    return cfg.clients_dir / f"{name}{SUFFIX}"


def checked_name(name: str) -> str:
    try:
        return check_name(name)
    except ValueError as exc:
        raise Refused(str(exc)) from None


def read_client(cfg: ServerConfig, name: str) -> Client:
    """The client file of `name`, parsed; Refused (exit 1) if there is none or it is broken."""
    path = client_path(cfg, checked_name(name))
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise Refused(f"no client {name} (no file {path})", EXIT_ERROR) from None
    try:
        return parse_client(name, data.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise Refused(f"{path}: not a UTF-8 text file", EXIT_ERROR) from None
    except ClientError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise Refused(f"{where}: {exc.message}", EXIT_ERROR) from None


def clients_on_file(cfg: ServerConfig) -> list[Client]:
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


def create_exclusive(path: Path, data: bytes, mode: int) -> None:
    """Write `path` atomically, refusing (FileExistsError) if it exists: the whole file
    under a dot-name (which the daemon skips), then link(2), which never replaces."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.new")
    write_atomic(tmp, data, mode)
    try:
        os.link(tmp, path)
    finally:
        os.unlink(tmp)


def ensure_clients_dir(cfg: ServerConfig) -> None:
    try:
        os.mkdir(cfg.clients_dir, DIR_MODE)
    except FileExistsError:
        if not cfg.clients_dir.is_dir():
            raise Refused(f"{cfg.clients_dir} is not a directory", EXIT_ERROR) from None
        return
    os.chmod(cfg.clients_dir, DIR_MODE)  # whatever the umask
    os.chown(cfg.clients_dir, 0, 0)
    print(f"created the clients directory {cfg.clients_dir}", file=sys.stderr)


def enabled_text(text: str, enabled: bool) -> str:
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


def write_enabled(client: Client, enabled: bool) -> None:
    """Rewrite `client`'s file with ``enabled`` set, keeping its owner, mode and every other
    line (comments too) where the edit reads back as intended; else the file anew."""
    assert client.path is not None
    st = os.stat(client.path)
    text = enabled_text(client.path.read_text(encoding="utf-8"), enabled)
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
