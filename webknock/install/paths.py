"""The installed layout below a root prefix ("" for the real system, ``/DIR`` for --root).

Every path the installer writes comes from here; the paths written into files (config,
unit, cron, snippets) carry the prefix too, so a --root tree is self-consistent.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from webknock.install.console import InstallError, UsageError

#: Paths the installer accepts for --root and --cgi-dir (and removes spools below).
PATH_RE = re.compile(r"/[A-Za-z0-9._/+-]*")
DEFAULT_INSTANCE = "webknock"
#: What install.sh client wrote (profiles and keys), for uninstall --client --purge.
CLIENT_LIST = ".install.sh-profiles"


def check_root(text: str) -> str:
    """--root DIR: an absolute path (not /) without a trailing slash; "" stays "".
    Raises UsageError for a malformed path and InstallError for a tree that someone
    else could change under us (:func:`untrusted_dirs`)."""
    if not text:
        return ""
    if not PATH_RE.fullmatch(text):
        raise UsageError(f"--root: {text} must be an absolute path of letters, digits and ._/+-")
    root = text.rstrip("/")
    if not root:
        raise UsageError("--root /: that is the real system; leave --root out")
    bad = untrusted_dirs(Path(root), os.geteuid())
    if bad:
        raise InstallError(
            f"--root: {bad[0]} can be changed by others than root (owner uid "
            f"{bad[0].stat().st_uid}, mode {stat.S_IMODE(bad[0].stat().st_mode):04o}): a link "
            "planted there would make this installer write outside the tree; use a tree "
            "only root can write to"
        )
    return root


def untrusted_dirs(root: Path, uid: int) -> list[Path]:
    """The directories of `root`'s path and tree (as far as they exist) that someone other
    than root or `uid` could write to. A sticky directory (like /tmp) above `root` is fine:
    nobody else can replace the next folder in it; one inside the tree is not looked into
    (the installer writes nothing there), but `root` itself must be writable by its owner
    alone."""
    trusted = {0, uid}

    def writable_by_others(st: os.stat_result) -> bool:
        mode = st.st_mode
        return st.st_uid not in trusted or bool(mode & 0o022 and not mode & stat.S_ISVTX)

    bad = [p for p in root.parents if writable_by_others(p.stat())]
    if root.is_dir() and (writable_by_others(root.stat()) or root.stat().st_mode & 0o022):
        bad.insert(0, root)
    for top, dirs, _files in os.walk(root):
        kept = []
        for name in dirs:
            path = Path(top, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):  # made by whoever may write its folder: checked
                continue
            if writable_by_others(st):
                bad.append(path)
            elif not st.st_mode & stat.S_ISVTX:
                kept.append(name)
        dirs[:] = kept
    return bad


@dataclass(frozen=True)
class ServerLayout:
    """The shared parts of a server installation."""

    root: str = ""

    def at(self, path: str) -> Path:
        """`path` (absolute, as on the real system) below the root prefix."""
        return Path(self.root + path)

    @property
    def opt(self) -> Path:
        return self.at("/opt/webknock")

    @property
    def venv(self) -> Path:
        return self.opt / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python3"

    @property
    def cgi(self) -> Path:
        return self.opt / "cgi-bin" / "webknock.cgi"

    @property
    def share(self) -> Path:
        return self.opt / "share"

    @property
    def manifests(self) -> Path:
        return self.opt / "instances"

    @property
    def sbin(self) -> Path:
        return self.at("/usr/local/sbin")

    @property
    def etc(self) -> Path:
        return self.at("/etc/webknock")

    @property
    def run_dir(self) -> Path:
        """Spools (a tmpfs each) and the pid files of directly started daemons."""
        return self.at("/run/webknock")

    @property
    def state_dir(self) -> Path:
        return self.at("/var/lib/webknock")

    @property
    def log_dir(self) -> Path:
        return self.at("/var/log/webknock")

    @property
    def cron_file(self) -> Path:
        return self.at("/etc/cron.d/webknock")

    @property
    def logrotate(self) -> Path:
        return self.at("/etc/logrotate.d/webknock")

    @property
    def unit(self) -> Path:
        return self.at("/etc/systemd/system/webknockd@.service")

    def instance(self, name: str) -> InstanceLayout:
        return InstanceLayout(self, name)

    def installed_instances(self) -> list[str]:
        """Instances with a manifest, sorted."""
        if not self.manifests.is_dir():
            return []
        return sorted(p.name for p in self.manifests.iterdir() if p.is_file())


@dataclass(frozen=True)
class InstanceLayout:
    """The files of one server instance (defaults of a new config)."""

    layout: ServerLayout
    name: str

    @property
    def config(self) -> Path:
        return self.layout.etc / f"{self.name}.ini"

    @property
    def keys(self) -> Path:
        return self.layout.etc / f"{self.name}.keys"

    @property
    def server_key(self) -> Path:
        return self.layout.etc / f"{self.name}.server-key"

    @property
    def clients_dir(self) -> Path:
        return self.layout.etc / f"{self.name}.clients"

    @property
    def manifest(self) -> Path:
        return self.layout.manifests / self.name

    @property
    def unit_name(self) -> str:
        return f"webknockd@{self.name}.service"

    @property
    def daemon_log(self) -> Path:
        return self.layout.log_dir / f"{self.name}.log"

    @property
    def pidfile(self) -> Path:
        return self.layout.run_dir / f"{self.name}.pid"

    @property
    def spool_dir(self) -> Path:
        return self.layout.run_dir / self.name

    @property
    def state_file(self) -> Path:
        return self.layout.state_dir / f"{self.name}.db"

    @property
    def audit_log(self) -> Path:
        """The audit trail (every grant, renewal, expiry, revoke) of this instance."""
        return self.layout.log_dir / f"{self.name}.jsonl"

    def snippet(self, web_server: str) -> Path | None:
        """The web server snippet for `web_server` (nginx, apache; none has none)."""
        if web_server in ("nginx", "apache"):
            return self.layout.etc / f"{web_server}-{self.name}.conf"
        return None


@dataclass(frozen=True)
class ClientLayout:
    """Where the client goes: system-wide for root, in the home directory otherwise."""

    home: Path  # the venv's parent
    bin: Path
    conf_dir: Path
    system: bool  # root's install: profiles 0644, else 0600 in a 0700 folder

    @property
    def venv(self) -> Path:
        return self.home / "venv"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python3"

    @property
    def command(self) -> Path:
        return self.bin / "webknock"

    @property
    def list_file(self) -> Path:
        return self.conf_dir / CLIENT_LIST

    @property
    def profile_mode(self) -> int:
        return 0o644 if self.system else 0o600


def client_layout(root: str, uid: int, home: Path, conf_dir: Path) -> ClientLayout:
    """The client's layout; `conf_dir` is where the client looks for profiles
    (:mod:`webknock.client.profile`), below `root` for root's install."""
    if uid == 0:
        return ClientLayout(
            Path(root + "/opt/webknock-client"),
            Path(root + "/usr/local/bin"),
            Path(root + str(conf_dir)),
            system=True,
        )
    return ClientLayout(
        home / ".local/share/webknock-client", home / ".local/bin", conf_dir, system=False
    )
