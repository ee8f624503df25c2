"""What getinfo returned, cached per profile and family so the next knock is one request."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from webknock.fsutil import write_atomic

log = logging.getLogger(__name__)

MAX_AGE = 86400  # seconds; older entries are asked for again
#: The names :func:`cache_name` makes.
CACHE_FILE = re.compile(r"[^/]+-[0-9a-f]{8}\.[a-z0-9]+\.json")


@dataclass(frozen=True)
class ServerInfo:
    """A getinfo reply: offered ports, longest grant, the address the server saw (and, in
    v2, the name the server knows this client by)."""

    tcp: tuple[int, ...]
    udp: tuple[int, ...]
    maxtime: int
    ip: str
    client: str = ""

    def offered(self) -> tuple[tuple[str, int], ...]:
        return tuple(("tcp", p) for p in self.tcp) + tuple(("udp", p) for p in self.udp)


def cache_dir(env: Mapping[str, str] = os.environ, uid: int | None = None) -> Path:
    """`$XDG_CACHE_HOME/webknock`, else `/var/cache/webknock` for root, else `~/.cache/webknock`."""
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]) / "webknock"
    if (os.geteuid() if uid is None else uid) == 0:
        return Path("/var/cache/webknock")
    return Path(env.get("HOME", "~")).expanduser() / ".cache" / "webknock"


def cache_name(profile_path: Path, family: str) -> str:
    """One file per profile file and family, e.g. `office-1a2b3c4d.ipv4.json`."""
    digest = hashlib.sha256(str(profile_path.resolve()).encode()).hexdigest()[:8]
    return f"{profile_path.stem}-{digest}.{family}.json"


def cache_files(directory: Path) -> list[Path]:
    """Every entry :func:`cache_name` can have named in `directory` (nothing else there)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [directory / n for n in sorted(names) if CACHE_FILE.fullmatch(n)]


class Cache:
    """One cache file; a missing, corrupt, old or other-URL entry reads as nothing.

    `scope` tells apart what was learnt with other keys at the same URL (v2: the client and
    server key ids; v1: empty, as in files written before v2).
    """

    def __init__(self, path: Path, max_age: float = MAX_AGE) -> None:
        self.path, self.max_age = path, max_age

    def load(self, url: str, local: str | None, now: float, scope: str = "") -> ServerInfo | None:
        try:
            obj = json.loads(self.path.read_text(encoding="utf-8"))
            info = ServerInfo(
                tcp=tuple(int(p) for p in obj["tcp"]),
                udp=tuple(int(p) for p in obj["udp"]),
                maxtime=int(obj["maxtime"]),
                ip=str(obj["ip"]),
                client=str(obj.get("client", "")),
            )
            fetched, cached_url, cached_local = float(obj["fetched"]), obj["url"], obj["local"]
            cached_scope = obj.get("scope", "")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.debug("cache %s unusable (%s): asking the server", self.path, exc)
            return None
        if cached_url != url:
            log.debug("cache %s is for another URL", self.path)
            return None
        if cached_scope != scope:
            log.debug("cache %s is for other keys", self.path)
            return None
        if not 0 <= now - fetched <= self.max_age:
            log.debug("cache %s is stale", self.path)
            return None
        if local is not None and cached_local != local:
            log.debug("local address changed (%s -> %s): asking the server", cached_local, local)
            return None
        return info

    def store(
        self, url: str, info: ServerInfo, local: str | None, now: float, scope: str = ""
    ) -> None:
        obj: dict[str, Any] = {"url": url, "fetched": now, "local": local, **asdict(info)}
        if not info.client:
            del obj["client"]  # v1: the file stays as it was
        if scope:
            obj["scope"] = scope
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(obj).encode() + b"\n", 0o600, fsync=False)
        except OSError as exc:  # a cache we cannot write costs one request next time, no more
            log.warning("cannot write cache %s: %s", self.path, exc.strerror or exc)

    def drop(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove cache %s: %s", self.path, exc.strerror or exc)
