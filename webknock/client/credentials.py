"""What a client knocks with: the v1 keys shared with the server (:class:`Keys`), or its v2
key pair (:class:`V2Keys`: its own private key and the server key it pins), and reading that
private key from a file others cannot read."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from webknock.client.errors import ConfigError
from webknock.protocol import v2
from webknock.protocol.v1 import Keys

MAX_KEY_FILE = 65536


@dataclass(frozen=True)
class V2Keys:
    """What a v2 profile signs with, and the one server key whose replies it believes."""

    client: v2.SigningKey
    server: bytes  # the pinned server's raw 32-byte public key

    @property
    def server_kid(self) -> bytes:
        return v2.key_id(self.server)


Credentials = Keys | V2Keys


def read_signing_key(path: Path) -> v2.SigningKey:
    """Read a PKCS#8 PEM Ed25519 private key that others cannot read; raises ConfigError."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(f"{path}: not a regular file")
            if st.st_mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ConfigError(
                    f"{path}: readable by everyone (mode {stat.S_IMODE(st.st_mode):04o}); "
                    f"run: chmod o-rwx {path}"
                )
            data = fh.read(MAX_KEY_FILE)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        return v2.SigningKey.from_pem(data.decode("ascii"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a PEM text file") from None
    except v2.V2Error as exc:
        raise ConfigError(f"{path}: {exc}") from None
