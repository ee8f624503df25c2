"""The v1 client profile of a server instance (knock URL, ports, time and the shared
secret keys), as ``install.sh server --v1`` and ``install.sh profile`` print it."""

from __future__ import annotations

import socket

from webknock.config import ServerConfig
from webknock.install.console import InstallError

BEGIN = "-----BEGIN WEBKNOCK CLIENT PROFILE-----"
END = "-----END WEBKNOCK CLIENT PROFILE-----"


def v1_profile(cfg: ServerConfig, url: str = "") -> str:
    """The profile blob; `url` overrides the config's. Raises InstallError for an instance
    without v1 or without a URL."""
    from webknock.keys import KeysError, load_keys

    if cfg.keys_file is None:
        raise InstallError(
            f"instance {cfg.instance} speaks protocol v2 only (no keys_file in {cfg.source}): "
            "enrol each client with webknockctl client add, which prints its profile; "
            "for v1 clients re-run install.sh server --v1"
        )
    try:
        keys = load_keys(cfg.keys_file)
    except KeysError as exc:
        raise InstallError(str(exc)) from None
    url = url or cfg.url
    if not url:
        raise InstallError(f"no knock URL recorded for instance {cfg.instance}: give --url")
    ports = [f"tcp/{p}" for p in sorted(cfg.tcp_ports)]
    ports += [f"udp/{p}" for p in sorted(cfg.udp_ports)]
    lines = [
        BEGIN,
        f"# instance {cfg.instance} on {socket.gethostname()}: contains the secret keys,",
        "# copy it over a private channel only. Use: install.sh client --profile NAME",
        "[client]",
        f"url = {url}",
        "ports = " + ", ".join(ports),
        f"time = {cfg.max_time}",
        "[v1]",
        *(f"{name} = {value}" for name, value in keys.to_hex().items()),
        END,
    ]
    return "\n".join(lines) + "\n"
