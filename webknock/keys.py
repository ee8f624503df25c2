"""Server keys: the v1 keys file (INI section [v1] with key1 iv1 key2 iv2 sign as lowercase
hex) and the v2 server signing key (PKCS#8 PEM). Both are root's alone (0600)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from webknock.ini import parse_ini
from webknock.protocol.v1 import Keys
from webknock.protocol.v2 import SigningKey, V2Error


class KeysError(Exception):
    """The keys file is missing, unreadable, malformed or too widely readable."""


def _read_secret(path: Path, forbidden: int, who: str, fix: str, kind: str) -> str:
    """The text of a key file; raises KeysError when its mode has a bit of `forbidden`
    (readable by `who`; saying to run `fix`), or it cannot be read as ASCII."""
    try:
        with open(path, encoding="ascii") as fh:
            mode = os.fstat(fh.fileno()).st_mode
            if mode & forbidden:
                raise KeysError(
                    f"{path}: readable by {who} (mode {stat.S_IMODE(mode):04o}); run: {fix} {path}"
                )
            return fh.read(65536)
    except OSError as exc:
        raise KeysError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise KeysError(f"{path}: not a {kind} file") from None


def load_keys(path: Path, *, refuse_world_readable: bool = True) -> Keys:
    """Read the [v1] keys; refuse a file that anyone (other) can read."""
    others = stat.S_IROTH | stat.S_IWOTH if refuse_world_readable else 0
    text = _read_secret(path, others, "everyone", "chmod o-rwx", "text")
    parser = parse_ini(path, text, KeysError)
    if not parser.has_section("v1"):
        raise KeysError(f"{path}: missing section [v1]")
    try:
        return Keys.from_hex(dict(parser.items("v1")))
    except ValueError as exc:
        raise KeysError(f"{path}: [v1] {exc}") from None


def format_keys(keys: Keys) -> str:
    """Render keys as the INI text of a keys file."""
    lines = [
        "# webknock protocol v1 keys: keep secret; share only with authorised clients.",
        "[v1]",
    ]
    lines += [f"{name} = {value}" for name, value in keys.to_hex().items()]
    return "\n".join(lines) + "\n"


# -- protocol v2: the server's signing key ------------------------------------------------


def load_server_key(path: Path) -> SigningKey:
    """Read the server's Ed25519 key (PKCS#8 PEM); refuse one that anyone but its owner
    (root) can read. Raises KeysError."""
    text = _read_secret(path, 0o077, "others than its owner", "chmod 0600", "PEM text")
    try:
        return SigningKey.from_pem(text)
    except V2Error as exc:
        raise KeysError(f"{path}: {exc}") from None


def create_server_key(path: Path) -> SigningKey:
    """Make a new server key at `path` (0600, never over an existing file); raises
    FileExistsError or OSError."""
    from webknock.fsutil import write_atomic

    if path.exists():
        raise FileExistsError(f"{path} exists")
    key = SigningKey.generate()
    write_atomic(path, key.to_pem().encode(), 0o600)
    return key
