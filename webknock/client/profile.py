"""Client profiles: INI files with a [client] section (as `install.sh client` writes them).

A profile speaks protocol v1 when it names a shared `keys_file` (or carries a [v1] section
itself), v2 when it pins the server's public key (`server_key = wk2:...`) and names this
client's private key (`key_file`, written by `webknock keygen`); never both.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from webknock.client.errors import ConfigError
from webknock.ini import read_ini
from webknock.keys import KeysError, load_keys
from webknock.protocol import v2
from webknock.protocol.v1 import Keys

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
MAX_KEY_FILE = 65536
MAX_TIME = 604800
SYSTEM_DIR = Path("/etc/webknock/client.d")
GROUP_SECTION = "group"  # a profile group: NAME.ini with only [group] profiles = a, b, c
MAX_GROUP = 64
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_PORT_RE = re.compile(r"(tcp|udp)/(\d{1,5})")
_TRUE, _FALSE = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


@dataclass(frozen=True)
class V2Keys:
    """What a v2 profile signs with, and the one server key whose replies it believes."""

    client: v2.SigningKey
    server: bytes  # the pinned server's raw 32-byte public key

    @property
    def server_kid(self) -> bytes:
        return v2.key_id(self.server)


Credentials = Keys | V2Keys


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


def user_dir(env: Mapping[str, str]) -> Path:
    config_home = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "~")) / ".config")
    return Path(config_home).expanduser() / "webknock"


def check_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"profile name {name!r}: use letters, digits, _ or -")
    return name


def profile_candidates(name: str, env: Mapping[str, str] = os.environ) -> list[Path]:
    """Where profile NAME is looked for, in order."""
    return [user_dir(env) / f"{check_name(name)}.ini", SYSTEM_DIR / f"{name}.ini"]


def new_profile_path(
    name: str, env: Mapping[str, str] = os.environ, uid: int | None = None
) -> Path:
    """Where profile NAME goes when there is none yet, as `install.sh client` places it:
    `/etc/webknock/client.d/NAME.ini` for root, `~/.config/webknock/NAME.ini` otherwise."""
    root = (os.geteuid() if uid is None else uid) == 0
    return (SYSTEM_DIR if root else user_dir(env)) / f"{check_name(name)}.ini"


def find_profile(name: str, env: Mapping[str, str] = os.environ) -> Path:
    """`~/.config/webknock/NAME.ini`, else `/etc/webknock/client.d/NAME.ini`."""
    candidates = profile_candidates(name, env)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"profile {name!r} not found (looked for {' and '.join(map(str, candidates))}); "
        "write one with install.sh client, or pass --config FILE"
    )


def group_members(path: Path) -> list[str] | None:
    """The member names of a profile group file (its only section is `[group]`, with
    `profiles = a, b, c`), or None when `path` is not a group."""
    parser = read_ini(path, ConfigError)
    if not parser.has_section(GROUP_SECTION):
        return None
    if parser.sections() != [GROUP_SECTION]:
        raise ConfigError(f"{path}: a profile group has the section [group] and no other")
    values = dict(parser.items(GROUP_SECTION))
    unknown = sorted(set(values) - {"profiles"})
    if unknown:
        raise ConfigError(f"{path}: [group] {unknown[0]}: unknown key (known: profiles)")
    names: list[str] = []
    for item in (part.strip() for part in values.get("profiles", "").split(",")):
        if not item:
            continue
        if not _NAME_RE.fullmatch(item):
            raise ConfigError(
                f"{path}: [group] profiles: {item!r} is not a profile name "
                "(letters, digits, _ or -)"
            )
        if item not in names:
            names.append(item)
    if not names:
        raise ConfigError(f"{path}: [group] profiles: missing (e.g. profiles = office, lab)")
    if len(names) > MAX_GROUP:
        raise ConfigError(f"{path}: [group] profiles: more than {MAX_GROUP} profiles")
    return names


def expand_group(path: Path, env: Mapping[str, str] = os.environ) -> list[tuple[str, Path]]:
    """The (name, path) of each member of the group file `path`; a member that is missing or
    is itself a group (groups do not nest, so they cannot loop) is an error naming both."""
    members = group_members(path)
    if members is None:
        raise ConfigError(f"{path}: not a profile group (no [group] section)")
    found: list[tuple[str, Path]] = []
    for name in members:
        try:
            member = find_profile(name, env)
        except ConfigError as exc:
            raise ConfigError(f"{path}: [group] profiles: {exc.message}") from None
        if member.resolve() == path.resolve():
            raise ConfigError(f"{path}: [group] profiles: {name!r} is this group itself (a cycle)")
        if group_members(member) is not None:
            raise ConfigError(
                f"{path}: [group] profiles: {name!r} is a group too ({member}); "
                "groups do not nest: list its profiles instead"
            )
        found.append((name, member))
    return found


def expand_profiles(
    spec: str, env: Mapping[str, str] = os.environ
) -> tuple[list[tuple[str, Path]], bool]:
    """`--profile` NAME or `a,b,c` (each a profile or a group) as (name, path) pairs, each
    profile once, and whether this is a fan-out (several names, or a group)."""
    names = [part.strip() for part in spec.split(",")]
    if any(not name for name in names):
        raise ConfigError(f"--profile {spec!r}: an empty name (use a,b,c)")
    fan_out = len(names) > 1
    found: list[tuple[str, Path]] = []
    for name in names:
        path = find_profile(name, env)
        if group_members(path) is None:
            members = [(name, path)]
        else:
            members, fan_out = expand_group(path, env), True
        found.extend(m for m in members if m[0] not in [f[0] for f in found])
    if len(found) > MAX_GROUP:
        raise ConfigError(f"--profile {spec!r}: more than {MAX_GROUP} profiles")
    return found, fan_out
