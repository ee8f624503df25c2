"""The instance config: written once (validated by :func:`webknock.config.load` before it
takes its place), then kept. The one change a re-run ever makes to it is adding
``keys_file`` for --v1; options that differ from it are reported, not applied."""

from __future__ import annotations

import datetime
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from webknock.config import ConfigError, ServerConfig, load
from webknock.install.console import Console, InstallError
from webknock.install.files import place_new, temp_beside
from webknock.install.paths import InstanceLayout


@dataclass(frozen=True)
class NewConfig:
    """The settings of a new instance config."""

    tcp_ports: str
    udp_ports: str
    max_time: str
    url: str
    backend: str
    web_user: str
    protect: str
    keys_file: Path | None  # protocol v1 on


def _today() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


def config_text(inst: InstanceLayout, new: NewConfig) -> str:
    lines = [
        f"# webknock instance {inst.name}, written by install.sh on {_today()}.",
        f"# Every setting with its default: {inst.layout.share}/webknock.ini.example",
        "# install.sh keeps this file when re-run. After a change: "
        f"systemctl restart {inst.unit_name}",
        "[server]",
        f"instance = {inst.name}",
    ]
    if new.tcp_ports:
        lines.append(f"tcp_ports = {new.tcp_ports}")
    if new.udp_ports:
        lines.append(f"udp_ports = {new.udp_ports}")
    lines.append(f"max_time = {new.max_time}")
    if new.url:
        lines += [
            "# the knock URL, printed in the profiles of webknockctl client add",
            f"url = {new.url}",
        ]
    if new.keys_file is not None:
        lines += [
            "# protocol v1 (shared keys; install.sh server --v1): the original PHP clients",
            f"keys_file = {new.keys_file}",
        ]
    lines += [
        f"spool_dir = {inst.spool_dir}",
        f"state_file = {inst.state_file}",
        "# every grant, renewal, expiry and revoke (webknockctl log reads it)",
        f"audit_log = {inst.audit_log}",
        f"backend = {new.backend}",
        f"web_user = {new.web_user}",
        f"protect = {new.protect}",
    ]
    return "\n".join(lines) + "\n"


def with_settings(text: str, settings: Mapping[str, str], section: str = "server") -> str:
    """Ini `text` with each of `settings` set under ``[section]``: a key's line replaced
    where it is, a new key added at the end of the section, an empty value removing the
    key. For settings beyond :class:`NewConfig` (the test lab's; see webknock.ini.example)
    and a profile's beyond what the server printed."""
    lines = text.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.strip() == f"[{section}]"), None)
    if start is None:
        raise InstallError(f"config text has no [{section}] line")
    end = next(
        (i for i in range(start + 1, len(lines)) if lines[i].lstrip().startswith("[")),
        len(lines),
    )
    body = lines[start + 1 : end]
    for key, value in settings.items():
        line = f"{key} = {value}"
        at = next((i for i, ln in enumerate(body) if ln.partition("=")[0].strip() == key), None)
        if at is not None and value:
            body[at] = line
        elif at is not None:
            del body[at]
        elif value:
            body.append(line)
    return "\n".join([*lines[: start + 1], *body, *lines[end:]]) + "\n"


def write_config(inst: InstanceLayout, new: NewConfig) -> bool:
    """Write the config of `inst` (0644) unless it exists; True if it wrote one."""
    if inst.config.exists():
        return False
    tmp = temp_beside(inst.config, config_text(inst, new), 0o644)
    try:
        load(tmp)
    except ConfigError as exc:
        os.unlink(tmp)
        raise InstallError(f"the config install.sh wrote does not validate: {exc}") from None
    place_new(tmp, inst.config)
    return True


def enable_v1(config: Path, keys: Path) -> None:
    """Add ``keys_file = KEYS`` below ``[server]`` of an existing config, keeping its owner
    and mode; validated before it replaces the file."""
    lines = config.read_text().splitlines(keepends=True)
    at = next((i for i, ln in enumerate(lines) if ln.strip() == "[server]"), None)
    if at is None:
        raise InstallError(
            f"{config}: no [server] line found; add keys_file = {keys} to it yourself"
        )
    added = [
        f"# protocol v1 (shared keys), added by install.sh server --v1 on {_today()}\n",
        f"keys_file = {keys}\n",
    ]
    st = os.stat(config)
    tmp = temp_beside(config, "".join([*lines[: at + 1], *added, *lines[at + 1 :]]), 0o600)
    try:
        os.chown(tmp, st.st_uid, st.st_gid)
        os.chmod(tmp, st.st_mode & 0o7777)
        cfg = load(tmp)
        if cfg.keys_file != keys:
            raise ConfigError(f"its keys_file is {cfg.keys_file}")
    except ConfigError as exc:
        os.unlink(tmp)
        raise InstallError(
            f"could not add keys_file to {config} ({exc}); add keys_file = {keys} under "
            "[server] yourself and re-run"
        ) from None
    os.replace(tmp, config)


def load_config(path: Path) -> ServerConfig:
    """The validated config; raises InstallError with the reason."""
    try:
        return load(path)
    except ConfigError as exc:
        raise InstallError(str(exc)) from None


def ports_text(ports: frozenset[int]) -> str:
    return ", ".join(map(str, sorted(ports)))


def report_differences(
    console: Console, cfg: ServerConfig, given: dict[str, tuple[str, str]], url: str | None
) -> None:
    """Warn for every option in `given` (key: (flag, value)) that differs from the kept
    config; `url` is the --url given, if any."""
    have = {
        "tcp_ports": ports_text(cfg.tcp_ports),
        "udp_ports": ports_text(cfg.udp_ports),
        "max_time": str(cfg.max_time),
        "backend": cfg.backend,
        "protect": "yes" if cfg.protect else "no",
        "web_user": cfg.web_user,
    }
    for key, (flag, value) in given.items():
        if value != have[key]:
            console.warn(
                f"kept {cfg.source}: its {key} is '{have[key]}', not '{value}' from {flag}; "
                "edit the file to change it"
            )
    if url and cfg.url and url != cfg.url:
        console.warn(
            f"kept {cfg.source}: its url is '{cfg.url}', not '{url}' from --url; "
            "edit the file to change it"
        )
