"""`webknock keygen` and `webknock pubkey`: this client's protocol v2 key, beside its profile.

The private key is PKCS#8 PEM (as `openssl genpkey -algorithm ed25519` writes it), mode
0600, at the profile's `key_file` when the profile names one, else `NAME.key` in the
profile's folder; an existing file is never replaced. Only the public key text leaves the
host: the server's admin enrolls it with `webknockctl client add NAME --key '...'`.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from webknock.client import lookup
from webknock.client.credentials import read_signing_key
from webknock.client.errors import ConfigError
from webknock.client.profile import KEY_SUFFIX
from webknock.ini import read_ini
from webknock.protocol import v2

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def key_path(profile: Path) -> Path:
    """The private key of profile file `profile`: its `key_file` when it names one (relative
    to the profile's folder), else `NAME.key` beside it."""
    base = profile.resolve().parent
    if profile.exists():
        parser = read_ini(profile, ConfigError)
        text = parser.get("client", "key_file", fallback="").strip()
        if text:
            path = Path(text).expanduser()
            return path if path.is_absolute() else base / path
    return base / f"{profile.stem}{KEY_SUFFIX}"


def host_name() -> str:
    return _UNSAFE.sub("", socket.gethostname()) or "localhost"


def comment(profile_name: str) -> str:
    """`PROFILE@HOST`: tells the admin which key this is, in `webknockctl client list`."""
    return f"{_UNSAFE.sub('', profile_name) or 'default'}@{host_name()}"


def client_name() -> str:
    """A name to suggest for `webknockctl client add`: the first label of the host name."""
    return re.sub(r"[^A-Za-z0-9_-]", "", host_name().split(".")[0])[:64] or "NAME"


def create_key(path: Path) -> v2.SigningKey:
    """A new key written to `path` (0600); refuses (ConfigError) when `path` exists."""
    if os.path.lexists(path):
        raise ConfigError(exists_error(path))
    try:
        path.parent.mkdir(
            mode=0o755 if path.parent == lookup.SYSTEM_DIR else 0o700, parents=True, exist_ok=True
        )
    except OSError as exc:
        raise ConfigError(f"{path.parent}: cannot create: {exc.strerror}") from None
    key = v2.SigningKey.generate()
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            os.fchmod(fd, 0o600)  # whatever the umask
            view = memoryview(key.to_pem().encode("ascii"))
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)  # unlike a rename, never replaces a file that appeared meanwhile
    except FileExistsError:
        raise ConfigError(exists_error(path)) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write: {exc.strerror}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return key


def exists_error(path: Path) -> str:
    return (
        f"{path} exists: not overwritten (the server may know this client by it); "
        "`webknock pubkey` prints its public key again. For a new key, remove the file "
        "first, then have the admin enroll the new key"
    )


def read_key(path: Path) -> v2.SigningKey:
    """The key at `path`, refused when others can read it; raises ConfigError."""
    if not os.path.lexists(path):
        raise ConfigError(f"{path}: no key yet; make one with: webknock keygen")
    return read_signing_key(path)


def profile_advice(profile: Path, key: Path) -> str | None:
    """What the profile still lacks to speak v2, in words; None when it has both keys."""
    values: dict[str, str] = {}
    inline_v1 = False
    if profile.exists():
        parser = read_ini(profile, ConfigError)
        if parser.has_section("client"):
            values = {k: v.strip() for k, v in parser.items("client")}
        inline_v1 = parser.has_section("v1")
    if values.get("server_key") and values.get("key_file"):
        return None
    try:
        shown = str(key.relative_to(profile.resolve().parent))
    except ValueError:
        shown = str(key)
    lines = []
    if not values.get("key_file"):
        lines.append(f"key_file = {shown}")
    if not values.get("server_key"):
        lines.append("server_key = wk2:... (the server's public key, from its admin)")
    instead = " instead of keys_file" if values.get("keys_file") else ""
    if inline_v1:
        lines.append("and remove its [v1] section (a profile speaks v1 or v2)")
    return f"then put in {profile}, section [client]{instead}: " + "; ".join(lines)
