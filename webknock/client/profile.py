"""Client profiles: INI files with a [client] section (as `install.sh client` writes them)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from webknock.client.errors import ConfigError
from webknock.ini import read_ini
from webknock.keys import KeysError, load_keys
from webknock.protocol.v1 import Keys

Port = tuple[str, int]

FAMILIES = ("any", "ipv4", "ipv6", "both")
KNOWN_KEYS = ("url", "keys_file", "ports", "time", "verify", "timeout", "family")
MAX_TIME = 604800
SYSTEM_DIR = Path("/etc/webknock/client.d")
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PORT_RE = re.compile(r"(tcp|udp)/(\d{1,5})")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


@dataclass(frozen=True)
class Profile:
    """One server to knock at, and how."""

    path: Path
    name: str
    url: str
    keys_file: Path
    ports: tuple[Port, ...]  # empty: every port the server offers
    time: int | None  # None: the server's maximum
    verify: bool | str  # True, False or a CA bundle path
    timeout: float
    family: str

    def keys(self) -> Keys:
        """The [v1] keys; refused when the file is readable or writable by others."""
        try:
            return load_keys(self.keys_file)
        except KeysError as exc:
            raise ConfigError(f"{self.path}: [client] keys_file: {exc}") from None


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


def check_url(url: str) -> str:
    """Return `url` if it is a usable http(s) URL with a host, else raise ValueError."""
    if not url or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if parts.fragment:
        raise ValueError(f"{url!r} must not have a #fragment")
    return url


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
    keys_text = key("keys_file")
    if keys_text:
        keys_file = Path(keys_text).expanduser()
        keys_file = keys_file if keys_file.is_absolute() else base / keys_file
    elif parser.has_section("v1"):
        keys_file = path  # the keys are in the profile itself (the blob install.sh prints)
    else:
        raise bad("keys_file", "missing (path of the [v1] keys file)")
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
    )


def user_dir(env: Mapping[str, str]) -> Path:
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return Path(config_home).expanduser() / "webknock"


def find_profile(name: str, env: Mapping[str, str] = os.environ) -> Path:
    """`~/.config/webknock/NAME.ini`, else `/etc/webknock/client.d/NAME.ini`."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"profile name {name!r}: use letters, digits, _ or -")
    candidates = [user_dir(env) / f"{name}.ini", SYSTEM_DIR / f"{name}.ini"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"profile {name!r} not found (looked for {' and '.join(map(str, candidates))}); "
        "write one with install.sh client, or pass --config FILE"
    )
