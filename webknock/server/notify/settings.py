"""The ``[notify]`` section: who gets told about new grants, and how.

Validated like ``[server]``: a wrong value is one line naming file, section and key.
"""

from __future__ import annotations

import configparser
import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from webknock.config import ConfigError, ServerConfig, _choice, _Section, parse_bool, read_ini
from webknock.server.events import KINDS

SECTION = "notify"
SECURITY = ("none", "starttls", "tls")
TRANSPORTS = ("smtp", "sendmail")
DEFAULT_PORTS = {"none": 25, "starttls": 587, "tls": 465}
_ADDRESS = re.compile(r"[^@\s,<>]+@[^@\s,<>]+")
KNOWN = frozenset(
    {
        "email_to",
        "email_from",
        "mail_transport",
        "smtp_host",
        "smtp_port",
        "smtp_security",
        "smtp_cafile",
        "smtp_credentials",
        "smtp_timeout",
        "sendmail",
        "batch_window",
        "retries",
        "retry_delay",
        "webhook_url",
        "webhook_events",
        "webhook_timeout",
        "enabled",
    }
)


@dataclass(frozen=True)
class Credentials:
    """SMTP login read from the credentials file (``[smtp]`` user, password)."""

    user: str
    password: str

    def __repr__(self) -> str:  # never print a password into a log
        return f"Credentials(user={self.user!r}, password=***)"


@dataclass(frozen=True)
class NotifySettings:
    """Validated ``[notify]`` settings; ``email_to`` empty means no mail."""

    source: Path
    instance: str
    email_to: tuple[str, ...] = ()
    email_from: str = ""
    mail_transport: str = "smtp"
    smtp_host: str = "localhost"
    smtp_port: int = 25
    smtp_security: str = "none"
    smtp_cafile: Path | None = None
    smtp_credentials: Path | None = None
    smtp_timeout: float = 10.0
    sendmail: Path = Path("/usr/sbin/sendmail")
    batch_window: float = 10.0
    retries: int = 3
    retry_delay: float = 5.0
    webhook_url: str = ""
    webhook_events: frozenset[str] = frozenset({"open", "revoke"})
    webhook_timeout: float = 5.0

    @property
    def mail(self) -> bool:
        return bool(self.email_to)

    @property
    def webhook(self) -> bool:
        return bool(self.webhook_url)


def _addresses(text: str) -> tuple[str, ...]:
    out = tuple(a.strip() for a in text.split(",") if a.strip())
    for addr in out:
        if not _ADDRESS.fullmatch(addr):
            raise ValueError(f"{addr!r} is not a mail address (user@host)")
    return out


def _one_address(text: str) -> str:
    (addr,) = _addresses(text) or ("",)
    if not addr:
        raise ValueError("must be one mail address")
    return addr


def _host(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9.:_-]{1,253}", text):
        raise ValueError("must be a host name or address")
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError("must be a port from 1 to 65535")
    return int(text)


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def conv(text: str) -> float:
        value = float(text)
        if not low <= value <= high:
            raise ValueError(f"must be a number of seconds from {low:g} to {high:g}")
        return value

    return conv


def _count(text: str) -> int:
    if not text.isdigit() or int(text) > 20:
        raise ValueError("must be a whole number from 0 to 20")
    return int(text)


def _abs_path(text: str) -> Path:
    if not text.startswith("/"):
        raise ValueError("must be an absolute path")
    return Path(text)


def _url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL")
    return text


def _kinds(text: str) -> frozenset[str]:
    kinds = frozenset(k.strip() for k in text.replace(" ", ",").split(",") if k.strip())
    bad = sorted(kinds - set(KINDS))
    if bad or not kinds:
        raise ValueError(f"must be a comma list of {', '.join(KINDS)}")
    return kinds


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_notify(cfg: ServerConfig) -> NotifySettings:
    """Validate the ``[notify]`` section of `cfg` (absent section: nothing to notify)."""
    values = cfg.section(SECTION)
    sec = _Section(cfg.source, SECTION, values)
    unknown = sorted(set(values) - KNOWN)
    if unknown:
        raise sec.error(unknown[0], "unknown setting (typo?)")
    if not sec.get("enabled", parse_bool, True):
        return NotifySettings(cfg.source, cfg.instance)
    security = sec.get("smtp_security", _choice(SECURITY), "none")
    email_to: tuple[str, ...] = sec.get("email_to", _addresses, tuple[str, ...]())
    settings = NotifySettings(
        source=cfg.source,
        instance=cfg.instance,
        email_to=email_to,
        email_from=sec.get("email_from", _one_address, f"webknock@{socket.gethostname()}"),
        mail_transport=sec.get("mail_transport", _choice(TRANSPORTS), "smtp"),
        smtp_host=sec.get("smtp_host", _host, "localhost"),
        smtp_port=sec.get("smtp_port", _port, DEFAULT_PORTS[security]),
        smtp_security=security,
        smtp_cafile=sec.optional("smtp_cafile", _abs_path),
        smtp_credentials=sec.optional("smtp_credentials", _abs_path),
        smtp_timeout=sec.get("smtp_timeout", _seconds(0.1, 300), 10.0),
        sendmail=sec.get("sendmail", _abs_path, Path("/usr/sbin/sendmail")),
        batch_window=sec.get("batch_window", _seconds(0, 3600), 10.0),
        retries=sec.get("retries", _count, 3),
        retry_delay=sec.get("retry_delay", _seconds(0.01, 3600), 5.0),
        webhook_url=sec.get("webhook_url", _url, ""),
        webhook_events=sec.get("webhook_events", _kinds, frozenset({"open", "revoke"})),
        webhook_timeout=sec.get("webhook_timeout", _seconds(0.1, 300), 5.0),
    )
    if (
        settings.smtp_credentials
        and settings.smtp_security == "none"
        and not _is_loopback(settings.smtp_host)
    ):
        raise sec.error(
            "smtp_credentials",
            "needs smtp_security = starttls or tls (the password would cross the network in clear)",
        )
    if settings.smtp_credentials and settings.mail_transport != "smtp":
        raise sec.error("smtp_credentials", "only used with mail_transport = smtp")
    return settings


def read_credentials(path: Path) -> Credentials:
    """``[smtp]`` ``user`` and ``password`` from the credentials file (root, 0600)."""
    parser = read_ini(path)
    try:
        user = parser.get("smtp", "user").strip()
        password = parser.get("smtp", "password").strip()
    except (configparser.NoSectionError, configparser.NoOptionError) as exc:
        raise ConfigError(f"{path}: {exc.message}: need [smtp] user and password") from None
    if not user or not password:
        raise ConfigError(f"{path}: [smtp] user and password must not be empty")
    return Credentials(user, password)
