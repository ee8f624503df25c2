"""Shared fixtures: protocol vectors, keys, a complete instance config in a temp dir, and
webknockd for it on an in-memory firewall (`memory_instance`). Every test must leave root's
client cache and profiles (HOST_CLIENT_PLACES) as it found them."""

from __future__ import annotations

import json
import logging
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests import cgi_side
from webknock.config import ServerConfig, load
from webknock.fsutil import write_atomic
from webknock.keys import format_keys
from webknock.protocol.v1 import Keys
from webknock.server.state import StateStore
from webknock.spool import REQUEST_SUFFIX
from webknock.spool.mount import mount_spool, prepare_spool

if TYPE_CHECKING:
    from tests.fakes import MemoryFirewall
    from webknock.server.events import Event
    from webknock.server.loop import Daemon

REPO = Path(__file__).resolve().parent.parent
#: Where the webknock client keeps its state as root: the getinfo cache and the system-wide
#: profiles. No test may change what they hold (the lab's clients and the demo get their own:
#: tests/lab/client.py).
HOST_CLIENT_PLACES = (Path("/var/cache/webknock"), Path("/etc/webknock"))
VECTORS_FILE = REPO / "tests" / "vectors" / "v1.json"
V2_VECTORS_FILE = REPO / "tests" / "vectors" / "v2.json"


@pytest.fixture(autouse=True)
def close_bells() -> Iterator[None]:
    """Doorbells a test opened in the CGI's place (tests/cgi_side.py) do not outlive it."""
    yield
    cgi_side.close_all()


def listing(place: Path) -> list[str] | None:
    """Every path below `place`, relative to it; None when `place` does not exist."""
    if not place.exists():
        return None
    return sorted(str(p.relative_to(place)) for p in place.rglob("*"))


@pytest.fixture(autouse=True)
def host_client_places_untouched() -> Iterator[None]:
    """Fail the test that created or removed anything in HOST_CLIENT_PLACES."""
    before = {place: listing(place) for place in HOST_CLIENT_PLACES}
    yield
    for place, found in before.items():
        now = listing(place)
        if now != found:
            old, new = set(found or ()), set(now or ())
            pytest.fail(
                f"{place} changed during the test: "
                f"{'created' if found is None else 'removed' if now is None else 'changed'}; "
                f"new {sorted(new - old)}, gone {sorted(old - new)} (a lab client must use "
                "a cache and profiles of its own: tests/lab/client.py)"
            )


@pytest.fixture(autouse=True)
def isolated_logging() -> Iterator[None]:
    """Every CLI's main() configures logging for its process; in one test process that
    would leave handlers bound to an earlier test's captured (closed) stderr."""
    names = ["webknock", "urllib3"]
    names += ["webknock.server.events", "webknock.server.audit", "webknock.server.firewall"]
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in names)]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


def _load_vectors(path: Path) -> dict[str, Any]:
    if not path.exists():
        pytest.fail(f"{path} missing from the checkout (protocol vectors, see docs/protocol-*.md)")
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="session")
def vectors() -> dict[str, Any]:
    """Protocol v1 vectors (docs/protocol-v1.md)."""
    return _load_vectors(VECTORS_FILE)


@pytest.fixture(scope="session")
def v2_vectors() -> dict[str, Any]:
    """Protocol v2 vectors (docs/protocol-v2.md)."""
    return _load_vectors(V2_VECTORS_FILE)


@pytest.fixture(scope="session")
def vector_keys(vectors: dict[str, Any]) -> Keys:
    return Keys.from_hex(vectors["keys"])


def write_instance(base: Path, keys: Keys, **overrides: str) -> Path:
    """Write keys + config for one instance under `base`; return the config path."""
    keys_file = base / "keys.ini"
    keys_file.write_text(format_keys(keys))
    os.chmod(keys_file, 0o600)
    settings = {
        "tcp_ports": "22, 2222",
        "udp_ports": "51820",
        "max_time": "3600",
        "keys_file": str(keys_file),
        "spool_dir": str(base / "spool"),
        "state_file": str(base / "state" / "grants.db"),
        "backend": "iptables",
        "web_user": "www-data",
    }
    settings.update(overrides)
    cfg = base / "webknock.ini"
    cfg.write_text("[server]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items() if v))
    return cfg


@pytest.fixture
def instance_config(tmp_path: Path, vector_keys: Keys) -> Path:
    return write_instance(tmp_path, vector_keys)


@pytest.fixture
def instance_cfg(instance_config: Path) -> ServerConfig:
    """`instance_config`, loaded."""
    return load(instance_config)


@dataclass
class MemoryInstance:
    """webknockd for `instance_cfg` on an in-memory firewall, and the events its engine
    delivered."""

    daemon: Daemon
    cfg: ServerConfig
    fw: MemoryFirewall
    events: list[Event]


@pytest.fixture
def daemon_clock() -> Callable[[], float]:
    """The clock `memory_instance` runs on; a module overrides this fixture to move time."""
    return time.time


@pytest.fixture
def memory_instance(
    instance_cfg: ServerConfig, daemon_clock: Callable[[], float]
) -> MemoryInstance:
    """webknockd (spool prepared) on an in-memory firewall. Its state file stays open (a
    test may have run the daemon's loop in a thread of its own, which then owns it)."""
    from tests.fakes import memory_daemon

    events: list[Event] = []
    d, fw = memory_daemon(instance_cfg, events.append, clock=daemon_clock)
    return MemoryInstance(d, instance_cfg, fw, events)


def spool_as(cfg: ServerConfig, rid: str, payload: bytes) -> cgi_side.Waiting:
    """Spool `payload` as the CGI does, under the request id `rid` (batches are claimed in
    name order), its doorbell open; return the bell."""
    waiting = cgi_side.open_bell(cfg, rid)
    path = cfg.spool.requests / f"{rid}{REQUEST_SUFFIX}"
    web = cgi_side.WEB
    write_atomic(path, payload, 0o640, uid=web.pw_uid, gid=web.pw_gid, fsync=False)
    return waiting


def run_in_mount_namespace(code: str, timeout: float = 120) -> str:
    """Run Python `code` (with this repository importable) in a child with a private mount
    namespace, so that it may mount without touching the host; return its stdout. Skips
    where unshare(1) or mount namespaces are missing; fails on any other error."""
    if shutil.which("unshare") is None:
        pytest.skip("unshare(1) missing")
    proc = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=False,
    )
    if proc.returncode != 0 and "unshare failed" in proc.stderr:
        pytest.skip(f"no mount namespaces here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def v1_keys_file(cfg: ServerConfig) -> Path:
    """The v1 keys file of a config that has one (every test instance does)."""
    assert cfg.keys_file is not None, f"{cfg.source}: no keys_file"
    return cfg.keys_file


def install_correctly(base: Path, keys: Keys, **overrides: str) -> Path:
    """A correct installation under `base` (root 0755, as /etc/webknock would be): config
    0644, keys root 0600, the spool on its own tmpfs (the caller unmounts it:
    :func:`webknock.spool.mount.unmount_spool`) and laid out, the state file; return the
    config."""
    web_gid = pwd.getpwnam("www-data").pw_gid
    os.chmod(base, 0o755)
    config = write_instance(base, keys, **overrides)
    os.chmod(config, 0o644)
    cfg = load(config)
    os.chown(v1_keys_file(cfg), 0, 0)
    if not mount_spool(cfg.spool, web_gid):
        pytest.skip("cannot mount a tmpfs for the spool here")
    prepare_spool(cfg.spool, web_gid)
    with StateStore(cfg.state_file).transaction():
        pass
    return config
