"""The server's keys: the v2 signing key (made once, kept) and, with protocol v1 on, the
shared v1 keys (fresh from the OS CSPRNG, kept byte for byte, only ever tightened to root's
alone). Both need pycryptodome: call these once the venv is active."""

from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from webknock.config import ServerConfig
from webknock.install.console import InstallError
from webknock.install.files import place_new, temp_beside


def _owner_mode(path: Path) -> str:
    st = os.stat(path)
    try:
        user = pwd.getpwuid(st.st_uid).pw_name
    except KeyError:
        user = str(st.st_uid)
    try:
        group = grp.getgrgid(st.st_gid).gr_name
    except KeyError:
        group = str(st.st_gid)
    return f"{stat.S_IMODE(st.st_mode):o} {user}:{group}"


def write_v1_keys(path: Path) -> str:
    """Make the v1 keys file `path` (0600 root:root) or keep the existing one, taking away
    the web group and every bit beyond 0600 (never adding one); returns its status."""
    from webknock.keys import KeysError, format_keys, load_keys
    from webknock.protocol.v1 import Keys

    if os.path.lexists(path):
        try:
            load_keys(path)
        except KeysError as exc:
            raise InstallError(
                f"{path} exists but is not a usable keys file ({exc}); fix or move it away, "
                "then re-run"
            ) from None
        was = _owner_mode(path)
        os.chown(path, 0, 0)
        os.chmod(path, stat.S_IMODE(os.stat(path).st_mode) & 0o600)
        now = _owner_mode(path)
        if now != was:
            return f"kept, tightened from {was} to {now}: only webknockd reads them now"
        return f"kept (owner root:root, mode {now.split()[0]})"
    tmp = temp_beside(path, format_keys(Keys.generate()), 0o600)
    os.chown(tmp, 0, 0)
    place_new(tmp, path)
    return "new, from the OS random generator (owner root:root, mode 0600)"


def ensure_server_key(cfg: ServerConfig) -> tuple[str, str]:
    """The v2 server key of `cfg`: ("new" or "kept", its public key text)."""
    from webknock.keys import KeysError, create_server_key, load_server_key

    path = cfg.server_key_file
    try:
        if path.exists():
            return "kept", load_server_key(path).public_text()
        return "new", create_server_key(path).public_text()
    except (KeysError, OSError) as exc:
        raise InstallError(f"the v2 server key of {cfg.source} is not usable: {exc}") from None
