"""Client profiles: INI files with a [client] section (as `install.sh client` writes them).

A profile speaks protocol v1 when it names a shared `keys_file` (or carries a [v1] section
itself), v2 when it pins the server's public key (`server_key = wk2:...`) and names this
client's private key (`key_file`, written by `webknock keygen`); never both. Where a profile
is found by name: :mod:`webknock.client.lookup`; the keys it names:
:mod:`webknock.client.credentials`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from webknock.client.credentials import Credentials, V2Keys, read_signing_key
from webknock.client.errors import ConfigError
from webknock.client.lookup import GROUP_SECTION
from webknock.ini import read_ini
from webknock.keys import KeysError, load_keys
from webknock.protocol import v2
from webknock.protocol.v1 import Keys
from webknock.urls import check_url

Port = tuple[str, int]

FAMILIES = ("any", "ipv4", "ipv6", "both")
KNOWN_KEYS = (
    "url",
    "keys_file",
    "server_key",
    "key_file",
    "ports",
    "time",
    "verify",
    "timeout",
    "family",
)
KEY_SUFFIX = ".key"  # NAME.key beside NAME.ini: this client's v2 private key
MAX_TIME = 604800
_PORT_RE = re.compile(r"(tcp|udp)/(\d{1,5})")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


@dataclass(frozen=True)
class Profile:
    """One server to knock at, and how."""

    path: Path
    name: str
    url: str
    keys_file: Path | None  # v1: the shared keys (None for a v2 profile)
    ports: tuple[Port, ...]  # empty: every port the server offers
    time: int | None  # None: the server's maximum
    verify: bool | str  # True, False or a CA bundle path
    timeout: float
    family: str
    key_file: Path | None = None  # v2: this client's private key
    server_key: bytes | None = None  # v2: the server's raw public key, pinned

    @property
    def protocol(self) -> str:
        return "v1" if self.server_key is None else "v2"

    def keys(self) -> Keys:
        """The [v1] keys; refused when the file is readable or writable by others."""
        if self.keys_file is None:
            raise ConfigError(f"{self.path}: [client] keys_file: missing (this is a v2 profile)")
        try:
            return load_keys(self.keys_file)
        except KeysError as exc:
            raise ConfigError(f"{self.path}: [client] keys_file: {exc}") from None

    def signing_key(self) -> v2.SigningKey:
        """This client's v2 private key; refused when the file is readable or writable by
        others (group access is the owner's choice, as for keys_file)."""
        if self.key_file is None:
            raise ConfigError(f"{self.path}: [client] key_file: missing (this is a v1 profile)")
        try:
            return read_signing_key(self.key_file)
        except ConfigError as exc:
            hint = ""
            if not self.key_file.exists():
                hint = f"; make it with: webknock --config {self.path} keygen"
            raise ConfigError(f"{self.path}: [client] key_file: {exc.message}{hint}") from None

    def credentials(self) -> Credentials:
        """The v1 keys or the v2 key pair, whichever this profile speaks."""
        if self.server_key is None:
            return self.keys()
        return V2Keys(self.signing_key(), self.server_key)


def parse_ports(text: str) -> tuple[Port, ...]:
    """Parse `tcp/22, udp/51820` (empty: all offered); raise ValueError naming the entry."""
    ports: list[Port] = []
    for item in (part.strip().lower() for part in text.split(",")):
        if not item:
            continue
        m = _PORT_RE.fullmatch(item)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"{item!r} is not tcp/N or udp/N with N in 1..65535")
        port = (m.group(1), int(m.group(2)))
        if port not in ports:
            ports.append(port)
    return tuple(ports)


def format_ports(ports: tuple[Port, ...] | list[Port]) -> str:
    return ", ".join(f"{proto}/{num}" for proto, num in ports)


def parse_verify(text: str, base: Path) -> bool | str:
    value = text.strip()
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    path = Path(value).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise ValueError(f"{value!r} is neither yes/no nor an existing CA file or directory")
    return str(path)


def _number(text: str, kind: type[int] | type[float], low: float, high: float) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a number") from None
    if not low <= value <= high:
        raise ValueError(f"{text!r} is out of range {low:g}..{high:g}")
    return value


def load_profile(path: Path, name: str | None = None) -> Profile:
    """Read and check a profile; every error names the file and the key."""
    parser = read_ini(path, ConfigError)
    if not parser.has_section("client"):
        if parser.has_section(GROUP_SECTION):
            raise ConfigError(f"{path}: a profile group, not one profile (see --profile)")
        raise ConfigError(f"{path}: missing section [client]")
    values = dict(parser.items("client"))
    unknown = sorted(set(values) - set(KNOWN_KEYS))
    if unknown:
        raise ConfigError(
            f"{path}: [client] {unknown[0]}: unknown key (known: {', '.join(KNOWN_KEYS)})"
        )
    base = path.resolve().parent

    def key(name: str) -> str:
        return values.get(name, "").strip()

    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{path}: [client] {name}: {why}")

    try:
        url = check_url(key("url"))
    except ValueError as exc:
        why = str(exc) if key("url") else "missing (e.g. https://host/webknock)"
        raise bad("url", why) from None

    def beside(text: str) -> Path:
        file = Path(text).expanduser()
        return file if file.is_absolute() else base / file

    keys_text, server_text, key_text = key("keys_file"), key("server_key"), key("key_file")
    speaks_v1 = bool(keys_text) or parser.has_section("v1")
    if speaks_v1 and (server_text or key_text):
        v1_part = "keys_file" if keys_text else "a [v1] section"
        raise bad(
            "server_key" if server_text else "key_file",
            f"this profile also has {v1_part} (protocol v1): a profile speaks v1 "
            "(keys_file) or v2 (server_key and key_file), not both; remove one",
        )
    keys_file: Path | None = None
    key_file: Path | None = None
    server_key: bytes | None = None
    if keys_text:
        keys_file = beside(keys_text)
    elif speaks_v1:
        keys_file = path  # the keys are in the profile itself (the blob install.sh prints)
    elif server_text or key_text:
        if not server_text:
            raise bad(
                "server_key",
                "missing (the server's public key, wk2:..., from the server's admin; "
                "needed with key_file)",
            )
        if not key_text:
            raise bad(
                "key_file",
                "missing (path of this client's private key; make one with webknock keygen)",
            )
        try:
            server_key, _comment = v2.parse_public_key(server_text)
        except v2.V2Error as exc:
            raise bad("server_key", f"{server_text[:60]!r} is not a v2 public key: {exc}") from None
        key_file = beside(key_text)
    else:
        raise bad(
            "keys_file",
            "missing (protocol v1: keys_file = path of the [v1] keys file; "
            "v2: server_key = wk2:... and key_file = path of this client's key)",
        )
    try:
        ports = parse_ports(key("ports"))
    except ValueError as exc:
        raise bad("ports", str(exc)) from None
    try:
        seconds = int(_number(key("time"), int, 1, MAX_TIME)) if key("time") else None
    except ValueError as exc:
        raise bad("time", f"{exc} (seconds)") from None
    try:
        verify = parse_verify(key("verify"), base) if key("verify") else True
    except ValueError as exc:
        raise bad("verify", str(exc)) from None
    try:
        timeout = _number(key("timeout"), float, 0.1, 300) if key("timeout") else 10.0
    except ValueError as exc:
        raise bad("timeout", f"{exc} (seconds)") from None
    family = key("family").lower() or "any"
    if family not in FAMILIES:
        raise bad("family", f"{family!r} is not one of {', '.join(FAMILIES)}")
    return Profile(
        path=path,
        name=name or path.stem,
        url=url,
        keys_file=keys_file,
        ports=ports,
        time=seconds,
        verify=verify,
        timeout=timeout,
        family=family,
        key_file=key_file,
        server_key=server_key,
    )
