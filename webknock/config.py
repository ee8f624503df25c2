"""Server configuration: one INI file per instance, section [server].

Lookup order: ``--config FILE``, then ``$WEBKNOCK_CONFIG``, then
``/etc/webknock/webknock.ini``. Kept free of heavy imports: the CGI loads it
for every request.
"""

from __future__ import annotations

import configparser
import ipaddress
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from webknock import ini
from webknock.cgi.conf import DEFAULT_RESULT_TIMEOUT, FALSE, TRUE
from webknock.spool import CLAIMED_DIR, REJECTED_DIR, REQUESTS_DIR, WAITS_DIR
from webknock.urls import check_url

DEFAULT_CONFIG = Path("/etc/webknock/webknock.ini")
ENV_CONFIG = "WEBKNOCK_CONFIG"
BACKENDS = ("auto", "iptables", "nftables")
#: ``[server] forward``: guard offered ports that DNAT forwards to containers.
FORWARD_MODES = ("auto", "yes", "no")
#: The longest grant any instance may give: one week.
MAX_TIME = 7 * 86400
#: The daemon's figures for `webknockctl status` (:mod:`webknock.server.metrics`).
METRICS_SUFFIX = ".metrics.json"
#: Files beside the state file: SQLite's (-wal, -shm; -journal from before WAL), the lock
#: shared by daemon, reaper and webknockctl, the daemon's single-instance lock and figures.
STATE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock", ".daemon", METRICS_SUFFIX)
#: Instance names (the installer checks --instance with it too).
INSTANCE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}")
_CHAIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}")

T = TypeVar("T")


class ConfigError(Exception):
    """A missing or invalid setting; the message names file, section and key."""


@dataclass(frozen=True)
class SpoolPaths:
    """The spool of one instance (layout: :mod:`webknock.spool`); the web user and root
    never share a writable directory except ``requests`` and ``waits`` (doorbells), both
    sticky and root-owned."""

    root: Path

    @property
    def requests(self) -> Path:
        return self.root / REQUESTS_DIR

    @property
    def claimed(self) -> Path:
        return self.root / CLAIMED_DIR

    @property
    def rejected(self) -> Path:
        return self.root / REJECTED_DIR

    @property
    def waits(self) -> Path:
        return self.root / WAITS_DIR


@dataclass(frozen=True)
class ServerConfig:
    """Settings of one webknock server instance."""

    source: Path
    instance: str
    tcp_ports: frozenset[int]
    udp_ports: frozenset[int]
    max_time: int
    keys_file: Path | None  # v1 is spoken iff it is set
    spool_dir: Path
    state_file: Path
    server_key_file: Path = Path("/etc/webknock/webknock.server-key")  # v2 iff it exists
    clients_dir: Path = Path("/etc/webknock/webknock.clients")
    url: str = ""  # the knock URL, printed in client profiles
    browser_page: bool = False  # a GET of the knock URL returns the v2 browser client
    backend: str = "auto"
    web_user: str = "www-data"
    chain: str = "WEBKNOCK"
    protect: bool = False
    ipset: str = "auto"
    forward: str = "auto"  # auto|yes|no; effective only with protect (firewall/forward.py)
    result_timeout: float = DEFAULT_RESULT_TIMEOUT
    ts_window: int = 15
    v2_ts_window: int = 30
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    throttle_failures: int = 20
    throttle_window: int = 60
    max_grants: int = 10000
    max_grants_per_prefix: int = 256
    audit_log: Path | None = None
    metrics_file: Path | None = None  # Prometheus text file (node_exporter's textfile collector)
    extra: dict[str, dict[str, str]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def spool(self) -> SpoolPaths:
        return SpoolPaths(self.spool_dir)

    def offered(self) -> frozenset[tuple[str, int]]:
        """Every (proto, port) pair this instance offers."""
        return frozenset(
            {("tcp", p) for p in self.tcp_ports} | {("udp", p) for p in self.udp_ports}
        )

    def section(self, name: str) -> dict[str, str]:
        """Another section of the same file (e.g. ``notify``), or an empty dict."""
        return dict(self.extra.get(name, {}))


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Resolve which config file to use (flag, environment, default)."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_CONFIG)
    return Path(env) if env else DEFAULT_CONFIG


class _Section:
    """Typed access to one INI section with errors that name file, section and key."""

    def __init__(self, path: Path, name: str, values: dict[str, str]) -> None:
        self.path, self.name, self.values = path, name, values

    def error(self, key: str, msg: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{self.name}] {key}: {msg}")

    def get(self, key: str, conv: Callable[[str], T], default: T | None = None) -> T:
        raw = self.values.get(key)
        if raw is None or raw.strip() == "":
            if default is None:
                raise self.error(key, "missing (required)")
            return default
        try:
            return conv(raw.strip())
        except (ValueError, TypeError) as exc:
            raise self.error(key, f"{exc} (got {raw.strip()[:80]!r})") from None

    def optional(self, key: str, conv: Callable[[str], T]) -> T | None:
        raw = self.values.get(key, "").strip()
        return self.get(key, conv) if raw else None


def parse_ports(text: str) -> frozenset[int]:
    """``22, 2222`` → {22, 2222}; an empty string is no ports."""
    ports: set[int] = set()
    for item in text.replace(" ", ",").split(","):
        if not item:
            continue
        if not item.isdigit() or not 1 <= int(item) <= 65535:
            raise ValueError(f"port {item!r} is not a number from 1 to 65535")
        ports.add(int(item))
    return frozenset(ports)


def parse_bool(text: str) -> bool:
    value = text.lower()
    if value in TRUE:
        return True
    if value in FALSE:
        return False
    raise ValueError("must be yes or no")


def _whole(low: int, high: int, unit: str = "") -> Callable[[str], int]:
    """A whole number from `low` to `high`; the error says so, in the setting's `unit`."""
    what = f"a whole number{f' of {unit}' if unit else ''}, {low}-{high}"

    def conv(text: str) -> int:
        if not text.isdigit() or not low <= int(text) <= high:
            raise ValueError(f"must be {what}")
        return int(text)

    return conv


def _seconds_below_an_hour(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise ValueError("must be a number of seconds above 0 and below 3600, e.g. 5 or 2.5")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return conv


def _pattern(regex: re.Pattern[str], what: str) -> Callable[[str], str]:
    def conv(text: str) -> str:
        if not regex.fullmatch(text):
            raise ValueError(f"must be {what}")
        return text

    return conv


def _abs_path(text: str) -> Path:
    if not text.startswith("/"):
        raise ValueError("must be an absolute path")
    return Path(text)


def _url(text: str) -> str:
    return check_url(text)


def _networks(text: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    nets = []
    for item in text.replace(" ", ",").split(","):
        if item:
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                raise ValueError(
                    f"{item[:60]!r} is not a network: give CIDR networks such as "
                    "192.0.2.0/24, 2001:db8::/32, separated by commas"
                ) from None
    return tuple(nets)


def read_ini(path: Path) -> configparser.ConfigParser:
    """Read an INI file or raise ConfigError naming it."""
    return ini.read_ini(path, ConfigError, inline_comments=True)


def load(path: str | os.PathLike[str] | None = None) -> ServerConfig:
    """Load and validate the server config (see module docstring for the lookup order)."""
    src = config_path(path)
    parser = read_ini(src)
    if not parser.has_section("server"):
        raise ConfigError(f"{src}: missing section [server]")
    sec = _Section(src, "server", dict(parser.items("server")))
    known = {
        "instance",
        "tcp_ports",
        "udp_ports",
        "max_time",
        "keys_file",
        "server_key_file",
        "clients_dir",
        "url",
        "browser_page",
        "v2_ts_window",
        "spool_dir",
        "state_file",
        "backend",
        "web_user",
        "chain",
        "protect",
        "ipset",
        "forward",
        "result_timeout",
        "ts_window",
        "trusted_proxies",
        "throttle_failures",
        "throttle_window",
        "max_grants",
        "max_grants_per_prefix",
        "audit_log",
        "metrics_file",
    }
    unknown = sorted(set(sec.values) - known)
    if unknown:
        raise sec.error(unknown[0], "unknown setting (typo?)")

    instance = sec.get(
        "instance", _pattern(INSTANCE_NAME, "letters, digits, _ or - (max 16)"), src.stem
    )
    if not INSTANCE_NAME.fullmatch(instance):
        raise sec.error("instance", f"file name {src.stem!r} is not a usable instance name; set it")
    default_chain = "WEBKNOCK" if instance in ("webknock", "default") else f"WK-{instance}"
    tcp: frozenset[int] = sec.get("tcp_ports", parse_ports, frozenset[int]())
    udp: frozenset[int] = sec.get("udp_ports", parse_ports, frozenset[int]())
    if not tcp and not udp:
        raise sec.error("tcp_ports", "no ports offered: set tcp_ports and/or udp_ports")
    cfg = ServerConfig(
        source=src,
        instance=instance,
        tcp_ports=tcp,
        udp_ports=udp,
        max_time=sec.get("max_time", _whole(1, MAX_TIME, "seconds")),
        keys_file=sec.optional("keys_file", _abs_path),
        server_key_file=sec.get(
            "server_key_file", _abs_path, src.parent / f"{instance}.server-key"
        ),
        clients_dir=sec.get("clients_dir", _abs_path, src.parent / f"{instance}.clients"),
        url=sec.get("url", _url, ""),
        browser_page=sec.get("browser_page", parse_bool, False),
        v2_ts_window=sec.get("v2_ts_window", _whole(1, 3600, "seconds"), 30),
        spool_dir=sec.get("spool_dir", _abs_path),
        state_file=sec.get("state_file", _abs_path),
        backend=sec.get("backend", _choice(BACKENDS), "auto"),
        web_user=sec.get("web_user", str, "www-data"),
        chain=sec.get("chain", _pattern(_CHAIN, "an iptables chain name (max 21)"), default_chain),
        protect=sec.get("protect", parse_bool, False),
        ipset=sec.get("ipset", _choice(("auto", "yes", "no")), "auto"),
        forward=sec.get("forward", _choice(FORWARD_MODES), "auto"),
        result_timeout=sec.get("result_timeout", _seconds_below_an_hour, DEFAULT_RESULT_TIMEOUT),
        ts_window=sec.get("ts_window", _whole(1, 3600, "seconds"), 15),
        trusted_proxies=sec.get("trusted_proxies", _networks, ()),
        throttle_failures=sec.get("throttle_failures", _whole(1, 1_000_000), 20),
        throttle_window=sec.get("throttle_window", _whole(1, 86400, "seconds"), 60),
        max_grants=sec.get("max_grants", _whole(1, 1_000_000), 10000),
        max_grants_per_prefix=sec.get("max_grants_per_prefix", _whole(1, 1_000_000), 256),
        audit_log=sec.optional("audit_log", _abs_path),
        metrics_file=sec.optional("metrics_file", _abs_path),
        extra={s: dict(parser.items(s)) for s in parser.sections() if s != "server"},
    )
    if cfg.forward == "yes" and not cfg.protect:
        raise sec.error(
            "forward",
            "yes needs protect = yes: without it container ports are open to everyone "
            "anyway (set protect = yes, or forward = auto)",
        )
    if cfg.forward == "yes" and cfg.backend == "iptables" and cfg.ipset == "yes":
        raise sec.error(
            "forward",
            "yes needs the linear iptables chain, and ipset = yes forbids it: ipset sets "
            "cannot match a DNAT'ed connection's original port (set ipset = auto or no)",
        )
    return cfg
