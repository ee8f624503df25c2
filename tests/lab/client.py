"""The webknock client as installed (`client/webknock`), run in a lab's client namespace.

``ClientHome`` is one client user's folder: profiles by name (``.config/webknock``, as
``install.sh client`` puts a user's), keys, and the getinfo cache. HOME and XDG_CACHE_HOME
point into it, so a lab run writes nothing into root's home or /var/cache/webknock (the
cache root gets without XDG_CACHE_HOME). ``client_home`` makes one in a temp dir and
removes it.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.lab import REPO, Deployment, LabError, Netns

CLIENT_SHIM = REPO / "client" / "webknock"
#: The [client] keys a profile written by ``install.sh client`` takes from what it is given.
INSTALLER_KEYS = frozenset({"ports", "time", "verify", "timeout", "family"})


class ClientHome:
    """A client user's folder and the `webknock` command run with it in `ns` by `python`
    (a lab site's venv python: made from /usr/bin/python3, as installed)."""

    def __init__(self, ns: Netns, python: Path, home: Path, base_env: dict[str, str]) -> None:
        self.ns, self.python, self.home = ns, python, home
        home.mkdir(mode=0o700, exist_ok=True)
        self.profiles = home / ".config" / "webknock"
        self.profiles.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.cache = home / "cache"
        self._base_env = {k: v for k, v in base_env.items() if k != "WEBKNOCK_CONFIG"}

    def env(self) -> dict[str, str]:
        """The client's environment: the lab's, with this home and this cache (webknock
        then comes from the site's venv, as installed)."""
        return {**self._base_env, "HOME": str(self.home), "XDG_CACHE_HOME": str(self.cache)}

    def argv(self, *args: str) -> list[str]:
        return self.ns.cmd([str(self.python), str(CLIENT_SHIM), *args])

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`webknock ARGS` to its end; never raises for its exit code."""
        return subprocess.run(
            self.argv(*args),
            check=False,
            capture_output=True,
            text=True,
            env=self.env(),
            timeout=timeout,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        """`webknock ARGS` in the background (keep), stdout and stderr piped."""
        return subprocess.Popen(
            self.argv(*args),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env(),
        )

    def write_group(self, name: str, members: list[str]) -> Path:
        """The profile group NAME: `[group] profiles = a, b`."""
        return self._write(name, ["[group]", f"profiles = {', '.join(members)}"])

    def write_v1_profile(self, name: str, d: Deployment, **extra: str) -> Path:
        """A v1 profile NAME for `d`'s server, as ``install.sh client`` writes the profile
        ``install.sh server --v1`` printed (:func:`v1_profile`), with `extra` set in it."""
        from webknock.config import load
        from webknock.install.v1profile import v1_profile

        blob = v1_profile(load(d.site.config), d.site.url or _link_url(d))
        return self._install_profile(name, blob, "v1", extra)

    def enrol_v2(self, name: str, d: Deployment, *options: str, **extra: str) -> Path:
        """A v2 profile NAME for `d`'s server: `webknock keygen`, `webknockctl client add`
        with `options` on the server, and the profile it printed written as ``install.sh
        client`` writes it, with `extra` set in it."""
        # --config, not --profile: for root, a profile that does not exist yet would be
        # placed in /etc/webknock/client.d (install.sh's place), outside this home
        keygen = self.run("--config", str(self.profiles / f"{name}.ini"), "keygen", "-q")
        if keygen.returncode != 0:
            raise LabError(f"webknock keygen exited {keygen.returncode}: {keygen.stderr}")
        printed = d.ctl("client", "add", name, "--key", keygen.stdout.strip(), *options).stdout
        url = "" if d.site.url else _link_url(d)  # what the user fills in without one
        return self._install_profile(name, printed, "v2", extra, url)

    def _install_profile(
        self, name: str, text: str, kind: str, extra: dict[str, str], url: str = ""
    ) -> Path:
        """Profile NAME (and for v1 its keys file) from the printed `text` of `kind`, with
        `extra` set in its [client] section and `url` (if any) as its URL, by the
        installer's :func:`write_profile` (``install.sh client --url``)."""
        from webknock.install.clientprofile import write_profile
        from webknock.install.serverconf import with_settings

        if unknown := extra.keys() - INSTALLER_KEYS:
            raise LabError(f"install.sh client does not write {sorted(unknown)}")
        profile = self.profiles / f"{name}.ini"
        text = with_settings(text, extra, section="client")
        write_profile(text, profile, self.profiles / f"{name}.keys", 0o600, url, kind)
        return profile

    def _write(self, name: str, lines: list[str]) -> Path:
        path = self.profiles / f"{name}.ini"
        path.write_text("\n".join(lines) + "\n")
        return path


def _link_url(d: Deployment) -> str:
    """The knock URL of `d`'s server on its link."""
    return f"http://{d.link.server4}/webknock"


@contextlib.contextmanager
def client_home(d: Deployment) -> Iterator[ClientHome]:
    """A ClientHome in a fresh temp dir for `d`'s client namespace, removed on exit."""
    with tempfile.TemporaryDirectory(prefix="webknock-client-") as home:
        yield ClientHome(d.lab.client, d.site.python, Path(home), d.site.env())
