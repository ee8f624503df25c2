"""install.sh: server install (twice), client install and uninstall, checked file by file.

Two settings, never the real host paths:
* ``--root DIR``: a throwaway root prefix below /var/tmp; an instance installed with --v1
  (shared keys): owners, modes (keys root's alone), the venv the web user runs (a real
  getinfo through the installed CGI as www-data, answered by webknockd played in-process
  on the installed config), a re-run without --v1 keeps v1, the keys and the config and
  tightens an older version's group-readable keys file, check-config refuses keys others
  can read, the v1 client profile; a second instance without --v1 speaks v2 only (no keys
  file) until a re-run with --v1 adds v1; the client: a v1 blob, a v2 profile of
  `webknockctl client add` with its key made by keygen (first, or when the profile comes),
  profiles with both or neither refused; uninstall leaves nothing.
* a host-like install without --root inside the lab's server network namespace and a
  private mount namespace whose /etc, /opt, /usr/local, /var and /run are overlays on a
  tmpfs: the spool on its own bounded tmpfs, the daemon started without systemd,
  protect = yes granting the SSH session first, a client enrolled with the installed
  webknockctl knocking with v2 through nginx + fcgiwrap and the installed snippet with the
  installed client, uninstall removing the firewall chain, the spool's mount and every file.
"""

from __future__ import annotations

import configparser
import contextlib
import dataclasses
import json
import os
import pwd
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import v1_keys_file
from tests.fakes import memory_daemon
from tests.lab import (
    AGENT,
    CLIENT4,
    LISTENER,
    OTHER4,
    REPO,
    SERVER4,
    Lab,
    LabError,
    fcgiwrap_argv,
    shared_venv,
    stop_process,
)
from webknock.client import keygen
from webknock.client.profile import load_profile
from webknock.config import SpoolPaths, load
from webknock.keys import load_keys
from webknock.protocol import messages, transport, v1
from webknock.spool.mount import layout

pytestmark = pytest.mark.e2e

INSTALL = REPO / "install.sh"
URL = f"http://{SERVER4}/webknock"
WWW = pwd.getpwnam("www-data")
BEGIN, END = "-----BEGIN WEBKNOCK CLIENT PROFILE-----", "-----END WEBKNOCK CLIENT PROFILE-----"


def sh(
    argv: Sequence[str | Path],
    *,
    timeout: float = 900,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; return it (never raises on a non-zero exit: tests assert)."""
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        env=env,
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, f"{proc.args} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def mode_of(path: Path) -> tuple[int, str, str]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), pwd.getpwuid(st.st_uid).pw_name, _group(st.st_gid)


def _group(gid: int) -> str:
    import grp

    return grp.getgrgid(gid).gr_name


def blob_of(output: str) -> str:
    """The client profile blob install.sh printed."""
    start, end = output.index(BEGIN), output.index(END)
    return output[start : end + len(END)] + "\n"


def files_below(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir() or p.is_symlink()}


# -- --root installs ----------------------------------------------------------------------


@dataclass
class Rooted:
    root: Path
    first: str
    second: str
    keys_after_first: bytes
    config_after_first: bytes

    def path(self, p: str) -> Path:
        return self.root / p.lstrip("/")

    @property
    def config(self) -> Path:
        return self.path("/etc/webknock/webknock.ini")

    @property
    def python(self) -> Path:
        return self.path("/opt/webknock/venv/bin/python3")


def install_server(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return sh(
        [
            INSTALL,
            "server",
            "--root",
            root,
            "--no-apt",
            "--no-start",
            "--web-server",
            "nginx",
            "--tcp-ports",
            "22,2222",
            "--udp-ports",
            "51820",
            "--max-time",
            "600",
            "--url",
            URL,
            "--cgi-dir",
            "/usr/lib/cgi-bin",
            "--yes",
            *extra,
        ]
    )


@pytest.fixture(scope="module")
def rooted() -> Iterator[Rooted]:
    # Not pytest's tmp_path: its parents are 0700 and the web user must reach the venv.
    root = Path(tempfile.mkdtemp(prefix="webknock-install-", dir="/var/tmp"))
    try:
        os.chmod(root, 0o755)
        first = ok(install_server(root, "--v1"))
        keys = (root / "etc/webknock/webknock.keys").read_bytes()
        config = (root / "etc/webknock/webknock.ini").read_bytes()
        second = ok(install_server(root))  # without --v1: an instance with v1 keeps it
        yield Rooted(root, first, second, keys, config)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_help_of_every_command() -> None:
    for argv in ([], ["server"], ["client"], ["uninstall"], ["profile"]):
        proc = sh([INSTALL, *argv, "--help"])
        assert proc.returncode == 0 and proc.stdout.startswith("Usage: install.sh"), proc
    assert "Usage: ./demo" in ok(sh([INSTALL, "demo", "--help"]))
    assert sh([INSTALL, "server", "--bogus"]).returncode == 2
    assert sh([INSTALL]).returncode == 2


def test_usage_errors_name_the_option(tmp_path: Path) -> None:
    for args, needle in (
        (["--tcp-ports", "22,70000"], "--tcp-ports: 70000"),
        (["--max-time", "0"], "--max-time"),
        (["--instance", "bad name"], "--instance"),
        (["--backend", "pf"], "--backend"),
        (["--url", "ftp://x"], "--url"),
        (["--url", "https://x/webknock#frag"], "--url"),
    ):
        proc = sh([INSTALL, "server", "--root", tmp_path, "--yes", *args])
        assert proc.returncode == 2 and needle in proc.stderr, proc
    assert not any(tmp_path.iterdir()), "a usage error must install nothing"


def test_files_owners_and_modes(rooted: Rooted) -> None:
    r = rooted
    # Only webknockd (root) reads the keys: the web user holds no secret.
    assert mode_of(r.path("/etc/webknock/webknock.keys")) == (0o600, "root", "root")
    assert mode_of(r.path("/etc/webknock/webknock.server-key")) == (0o600, "root", "root")
    assert mode_of(r.config) == (0o644, "root", "root")
    assert mode_of(r.path("/etc/webknock")) == (0o755, "root", "root")
    assert mode_of(r.path("/var/lib/webknock")) == (0o700, "root", "root")
    for p in ("/opt/webknock", "/opt/webknock/venv", "/opt/webknock/cgi-bin"):
        assert mode_of(r.path(p)) == (0o755, "root", "root"), p
    for p, flags in (
        ("/opt/webknock/cgi-bin/webknock.cgi", " -IS"),
        ("/usr/local/sbin/webknockd", ""),
    ):
        assert mode_of(r.path(p)) == (0o755, "root", "root"), p
        assert r.path(p).read_text().splitlines()[0] == f"#!{r.python}{flags}", p
    assert r.path("/usr/local/sbin/webknockctl").read_text().startswith(f"#!{r.python}\n")

    cfg = load(r.config)
    assert cfg.instance == "webknock" and cfg.chain == "WEBKNOCK"
    assert (cfg.tcp_ports, cfg.udp_ports, cfg.max_time) == (
        frozenset({22, 2222}),
        frozenset({51820}),
        600,
    )
    assert cfg.keys_file == r.path("/etc/webknock/webknock.keys")
    assert cfg.url == URL, "webknockctl client add prints it in each profile"
    assert cfg.spool_dir == r.path("/run/webknock/webknock")
    assert cfg.state_file == r.path("/var/lib/webknock/webknock.db")
    assert (cfg.backend, cfg.protect, cfg.web_user) == ("auto", False, "www-data")

    # The spool exactly as webknockd itself lays it out: writable only by root and the web
    # group, and nothing more (no seen/: replay marks live in root's state file).
    spool = SpoolPaths(cfg.spool_dir)
    for path, uid, gid, mode in layout(spool, WWW.pw_gid):
        st = os.lstat(path)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), path
        assert not st.st_mode & stat.S_IWOTH
    assert sorted(os.listdir(cfg.spool_dir)) == ["claimed", "rejected", "requests", "waits"]
    # Under --root install.sh mounts nothing: the spool stays a plain directory.
    assert not os.path.ismount(cfg.spool_dir)

    for found in r.root.rglob("*"):
        st = os.lstat(found)
        if not stat.S_ISLNK(st.st_mode):
            assert not st.st_mode & stat.S_IWOTH, f"{found} is world-writable"
        assert st.st_uid != WWW.pw_uid, f"{found} belongs to the web user"


def test_cron_unit_snippet_and_cgi_copy(rooted: Rooted) -> None:
    r = rooted
    cron = r.path("/etc/cron.d/webknock").read_text()
    jobs = [ln for ln in cron.splitlines() if ln.startswith("*")]
    sbin = r.path("/usr/local/sbin")
    assert jobs == [
        f"* * * * * root test -x {sbin}/webknockctl && {sbin}/webknockctl --config {r.config} reap -q"
    ]
    assert mode_of(r.path("/etc/cron.d/webknock"))[0] == 0o644
    rotate = r.path("/etc/logrotate.d/webknock")
    assert rotate.read_text() == (REPO / "etc/logrotate.d/webknock").read_text()
    assert mode_of(rotate) == (0o644, "root", "root")
    assert mode_of(r.path("/var/log/webknock")) == (0o750, "root", "adm")

    unit = r.path("/etc/systemd/system/webknockd@.service").read_text()
    etc = r.path("/etc/webknock")
    start = f"ExecStart={sbin}/webknockd --config {etc}/%i.ini\n"
    # The spool's own tmpfs is mounted (with privileges webknockd does not keep) first.
    mount = f"ExecStartPre=+{sbin}/webknockctl --config {etc}/%i.ini prepare-spool\n"
    assert start in unit and mount in unit and unit.index(mount) < unit.index(start)
    shipped = (REPO / "etc/systemd/webknockd@.service").read_text()
    assert unit.replace(str(r.root), "") == shipped, "only the paths may differ from etc/systemd"

    snippet = r.path("/etc/webknock/nginx-webknock.conf").read_text()
    assert (
        f"fastcgi_param SCRIPT_FILENAME {r.path('/opt/webknock/cgi-bin/webknock.cgi')};" in snippet
    )
    assert f"fastcgi_param WEBKNOCK_CONFIG {r.config};" in snippet
    assert "location = /webknock {" in snippet
    assert snippet in r.first.replace("\n    ", "\n"), "the snippet is printed"

    copy = r.path("/usr/lib/cgi-bin/webknock.cgi")
    assert mode_of(copy) == (0o755, "root", "root")
    text = copy.read_text()
    assert text.startswith(f"#!{r.python} -IS\n")
    assert f'os.environ.setdefault("WEBKNOCK_CONFIG", "{r.config}")' in text


def test_rerun_keeps_keys_and_config(rooted: Rooted) -> None:
    assert rooted.path("/etc/webknock/webknock.keys").read_bytes() == rooted.keys_after_first
    assert rooted.config.read_bytes() == rooted.config_after_first
    keys = rooted.path("/etc/webknock/webknock.keys")
    assert f"{keys}: new, from the OS random generator (owner root:root, mode 0600)" in rooted.first
    assert f"{keys}: kept (owner root:root, mode 600)" in rooted.second
    assert "webknock.ini: kept" in rooted.second
    assert f"protocol v1: on (keys_file {keys}; for the original PHP clients" in rooted.first
    assert f"protocol v1: on (kept: {rooted.config} has keys_file {keys};" in rooted.second
    for out in (rooted.first, rooted.second):
        assert "Protocol v1 is on" in out
        assert "client add NAME --key 'wk2:...'" in out, "how to enrol v2 clients"
    assert BEGIN in rooted.first, "the keys were made: their profile is printed"
    assert BEGIN not in rooted.second and "PRIVATE" not in rooted.second, "never again"
    assert f"`install.sh profile --root {rooted.root}` prints it" in rooted.second
    assert "--root: nothing started, firewall untouched" in rooted.second
    # the v2 server key: made once, then kept (the same public key both times)
    made = re.search(r"v2 server key: new \(public (wk2:\S+)\)", rooted.first)
    assert made and f"v2 server key: kept (public {made[1]})" in rooted.second


def test_keys_are_fresh_and_printed_in_the_profile(rooted: Rooted, vector_keys: v1.Keys) -> None:
    keys = load_keys(rooted.path("/etc/webknock/webknock.keys"))
    assert keys.to_hex() != vector_keys.to_hex()
    assert len(set(keys.to_hex().values())) == 5
    blob = configparser.ConfigParser(interpolation=None)
    blob.read_string(blob_of(rooted.first).split("\n", 1)[1].rsplit(END, 1)[0])
    assert dict(blob.items("v1")) == keys.to_hex()
    assert dict(blob.items("client")) == {
        "url": URL,
        "ports": "tcp/22, tcp/2222, udp/51820",
        "time": "600",
    }
    assert blob_of(ok(sh([INSTALL, "profile", "--root", rooted.root]))) == blob_of(rooted.first)
    again = ok(install_server(rooted.root, "--v1"))  # asked for: printed, the same keys
    assert blob_of(again) == blob_of(rooted.first)


def check_config(r: Rooted) -> subprocess.CompletedProcess[str]:
    return sh([r.path("/usr/local/sbin/webknockctl"), "--config", r.config, "check-config"])


def assert_config_passes(r: Rooted, proc: subprocess.CompletedProcess[str] | None = None) -> None:
    """check-config (`proc`, or run now) finds nothing to fix but what a --root install
    cannot have: exit 3 (warnings only), the state file webknockd makes when it first runs
    (--no-start) and the spool's own tmpfs (install.sh mounts it only on the real /run).
    Anything else (owners, modes, keys) is a failure."""
    proc = proc or check_config(r)
    assert proc.returncode == 3, proc
    spool = r.path("/run/webknock/webknock")
    expected_warnings = (
        f"warning: state file {r.path('/var/lib/webknock/webknock.db')} does not exist yet",
        f"warning: spool {spool} is not its own size-bounded tmpfs",
    )
    lines = proc.stdout.splitlines()
    for line in lines:
        assert line.startswith(expected_warnings), proc
    assert any(line.startswith(expected_warnings[1]) for line in lines), proc


def test_check_config_passes(rooted: Rooted) -> None:
    assert_config_passes(rooted)


def set_keys_mode(r: Rooted, mode: int, group: str) -> Path:
    """Give the installed keys file owner root, `group` and `mode`; return its path."""
    keys = r.path("/etc/webknock/webknock.keys")
    shutil.chown(keys, "root", group)
    os.chmod(keys, mode)
    return keys


@pytest.mark.parametrize(
    ("mode", "group"),
    [(0o640, "www-data"), (0o604, "root")],
    ids=["group-readable-by-the-web-user", "world-readable"],
)
def test_check_config_refuses_keys_others_can_read(rooted: Rooted, mode: int, group: str) -> None:
    """Whoever reads the keys can open the firewall: only root may (0600 root:root, as an
    older version's 0640 root:www-data was not)."""
    keys = set_keys_mode(rooted, mode, group)
    try:
        proc = check_config(rooted)
    finally:
        set_keys_mode(rooted, 0o600, "root")
    assert proc.returncode == 1, proc
    assert f"error: keys file {keys} has mode {mode:04o}, wider than 0600" in proc.stdout, proc
    assert f"run: chmod 0600 {keys}" in proc.stdout, proc
    assert_config_passes(rooted)


def test_rerun_tightens_keys_an_older_version_gave_the_web_group(rooted: Rooted) -> None:
    """Before webknockd verified knocks itself, install.sh gave the CGI's group read access
    (0640 root:www-data); a re-run takes it away, keeps the keys and says so."""
    r = rooted
    keys = set_keys_mode(r, 0o640, "www-data")
    before = keys.read_bytes()
    try:
        proc = install_server(r.root)
        after = mode_of(keys)
        checked = check_config(r)
    finally:
        set_keys_mode(r, 0o600, "root")
    out = ok(proc)
    assert after == (0o600, "root", "root")
    assert (
        f"{keys}: kept, tightened from 640 root:www-data to 600 root:root: "
        "only webknockd reads them now"
    ) in out
    assert keys.read_bytes() == before
    assert BEGIN not in out, "kept keys are not printed again"
    assert_config_passes(r, checked)


@pytest.mark.parametrize(
    ("mode", "group", "status"),
    [
        (0o400, "root", "kept (owner root:root, mode 400)"),
        (
            0o440,
            "www-data",
            "kept, tightened from 440 root:www-data to 400 root:root: "
            "only webknockd reads them now",
        ),
    ],
    ids=["0400", "0440-web-group"],
)
def test_rerun_never_loosens_keys_an_admin_tightened(
    rooted: Rooted, mode: int, group: str, status: str
) -> None:
    """A re-run takes away the web group and every bit beyond 0600, never adds one."""
    r = rooted
    keys = set_keys_mode(r, mode, group)
    try:
        proc = install_server(r.root)
        after = mode_of(keys)
        checked = check_config(r)
    finally:
        set_keys_mode(r, 0o600, "root")
    out = ok(proc)
    assert after == (0o400, "root", "root")
    assert f"{keys}: {status}" in out
    assert_config_passes(r, checked)


@contextlib.contextmanager
def webknockd_answering(config: Path) -> Iterator[list[int]]:
    """Play webknockd for the installed instance `config` while the block runs, as the CGI
    needs (it relays each request and waits for root's answer): the installed config, keys
    and spool, an in-memory firewall and a state file of its own (the --root tree stays as
    install.sh left it). Yields the number of requests each drain answered."""
    drained: list[int] = []
    ready, stop = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def serve(state: Path) -> None:
        try:  # all in this thread: the state's SQLite connection is used where it is made
            daemon, _ = memory_daemon(dataclasses.replace(load(config), state_file=state))
        except BaseException as exc:
            failed.append(exc)
            ready.set()
            return
        ready.set()
        try:
            while not stop.is_set():
                handled = daemon.drain()
                if handled:
                    drained.append(handled)
                stop.wait(0.02)
        except BaseException as exc:
            failed.append(exc)
        finally:
            daemon.engine.store.close()

    with tempfile.TemporaryDirectory(prefix="webknock-state-") as tmp:
        thread = threading.Thread(target=serve, args=(Path(tmp, "state.db"),), daemon=True)
        thread.start()
        ready.wait(30)
        try:
            if failed:
                raise failed[0]
            yield drained
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive(), "webknockd's drain did not stop"
        if failed:
            raise failed[0]


def cgi_getinfo(
    cgi: Path, config: Path | None, keys: v1.Keys, extra_env: dict[str, str] | None = None
) -> tuple[str, dict[str, object]]:
    """POST a getinfo through the installed CGI as www-data; return (status line, reply)."""
    body = (
        b"data="
        + transport.encode_field(
            v1.encode(keys, messages.getinfo_request(int(time.time())))
        ).encode()
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "REQUEST_METHOD": "POST",
        "CONTENT_LENGTH": str(len(body)),
        "CONTENT_TYPE": "application/x-www-form-urlencoded",
        "REMOTE_ADDR": CLIENT4,
    }
    if config:
        env["WEBKNOCK_CONFIG"] = str(config)
    env.update(extra_env or {})
    proc = subprocess.run(
        ["setpriv", "--reuid=www-data", "--regid=www-data", "--init-groups", str(cgi)],
        input=body,
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )
    head, _, payload = proc.stdout.partition(b"\r\n\r\n")
    status = head.split(b"\r\n")[0].decode()
    if not status.startswith("Status: 200"):
        return status + " " + proc.stderr.decode(errors="replace"), {}
    reply: dict[str, object] = json.loads(v1.decode(keys, payload))
    return status, reply


def test_installed_cgi_starts_isolated(rooted: Rooted) -> None:
    """The CGI starts with -IS: its venv's packages reach it, no .pth file and no PYTHONPATH
    do (here each would end the process before it answers)."""
    r = rooted
    site_packages = next(r.path("/opt/webknock/venv/lib").glob("python3*/site-packages"))
    assert (site_packages / "webknock" / "cgi" / "relay.py").is_file()
    planted = site_packages / "zz-webknock-test.pth"
    with tempfile.TemporaryDirectory(dir="/var/tmp") as tmp:  # the web user can read it
        os.chmod(tmp, 0o755)
        fake = Path(tmp, "webknock")
        fake.mkdir(mode=0o755)
        (fake / "__init__.py").write_text("import os; os._exit(4)\n")
        os.chmod(fake / "__init__.py", 0o644)
        planted.write_text("import os; os._exit(3)\n")
        try:
            with webknockd_answering(r.config) as drained:
                status, reply = cgi_getinfo(
                    r.path("/opt/webknock/cgi-bin/webknock.cgi"),
                    r.config,
                    load_keys(r.path("/etc/webknock/webknock.keys")),
                    {"PYTHONPATH": tmp},
                )
        finally:
            planted.unlink()
    assert status == "Status: 200 OK", status
    assert reply["ip"] == CLIENT4
    assert drained == [1], "the CGI relayed its request and returned webknockd's answer"


def test_web_user_runs_the_installed_cgi_without_writing(rooted: Rooted) -> None:
    r = rooted
    before = files_below(r.path("/opt"))
    proc = sh(
        [
            "setpriv",
            "--reuid=www-data",
            "--regid=www-data",
            "--init-groups",
            r.python,
            "-c",
            "import webknock.cgi.relay, webknock.config, webknock.keys, "
            "webknock.protocol.v1, webknock.spool.request, webknock.spool.doorbell",
        ]
    )
    ok(proc)
    keys = load_keys(r.path("/etc/webknock/webknock.keys"))
    with webknockd_answering(r.config) as drained:
        status, reply = cgi_getinfo(r.path("/opt/webknock/cgi-bin/webknock.cgi"), r.config, keys)
        assert status == "Status: 200 OK", status
        assert reply["tcp"] == [22, 2222] and reply["udp"] == [51820] and reply["ip"] == CLIENT4
        status, _ = cgi_getinfo(r.path("/usr/lib/cgi-bin/webknock.cgi"), None, keys)
        assert status == "Status: 200 OK", f"the CGI copy has its config built in: {status}"
    assert drained == [1, 1]
    assert files_below(r.path("/opt")) == before, "the web user wrote into the venv"
    assert not [p for p in r.path("/opt").rglob("__pycache__") if p.stat().st_uid != 0]
    # The spool is all the web user writes to, and each request and doorbell is gone once
    # answered: nothing in the tree belongs to it.
    spool = SpoolPaths(r.path("/run/webknock/webknock"))
    for sub in (spool.requests, spool.claimed, spool.rejected, spool.waits):
        assert os.listdir(sub) == [], sub
    assert not [p for p in r.root.rglob("*") if p.lstat().st_uid == WWW.pw_uid]


def test_client_install_from_the_printed_profile(rooted: Rooted) -> None:
    r = rooted
    proc = sh(
        [INSTALL, "client", "--root", r.root, "--profile", "lab", "--from", "-"],
        input=blob_of(r.first),
    )
    ok(proc)
    try:
        profile = r.path("/etc/webknock/client.d/lab.ini")
        keys_file = r.path("/etc/webknock/client.d/lab.keys")
        assert mode_of(keys_file) == (0o600, "root", "root")
        assert (
            load_keys(keys_file).to_hex()
            == load_keys(r.path("/etc/webknock/webknock.keys")).to_hex()
        )
        parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
        parser.read(profile)
        assert dict(parser.items("client")) == {
            "url": URL,
            "keys_file": str(keys_file),
            "ports": "tcp/22, tcp/2222, udp/51820",
            "time": "600",
        }
        shim = r.path("/usr/local/bin/webknock")
        assert shim.read_text().startswith(f"#!{r.path('/opt/webknock-client/venv/bin/python3')}\n")
        venv_python = r.path("/opt/webknock-client/venv/bin/python3")
        ok(sh([venv_python, "-I", "-c", "import requests, webknock.protocol.v1"]))
        (site,) = r.path("/opt/webknock-client/venv/lib").glob("python3*/site-packages")
        server_only = [p.name for p in site.iterdir() if p.name.startswith(("filelock", "inotify"))]
        assert server_only == [], "the client venv holds no server-only package"
        bad = sh(
            [INSTALL, "client", "--root", r.root, "--profile", "x", "--from", "-", "--no-venv"],
            input="[v1]\nkey1 = 00\n",
        )
        assert bad.returncode == 1 and "profile blob" in bad.stderr, bad
        assert not r.path("/etc/webknock/client.d/x.ini").exists()
    finally:
        ok(sh([INSTALL, "uninstall", "--client", "--purge", "--root", r.root]))
    assert not r.path("/opt/webknock-client").exists()
    assert not r.path("/usr/local/bin/webknock").exists()
    assert not r.path("/etc/webknock/client.d").exists()


def printed_key(out: str) -> str:
    """The public key line `install.sh client` printed (after "This client's public key:")."""
    found = re.search(r"^This client's public key:\n    (wk2:\S+ \S+)$", out, re.M)
    assert found, out
    return found[1]


def test_client_v2_keygen_first_then_the_profile(rooted: Rooted) -> None:
    """The usual order: the client makes its key and sends the public key; the admin enrols
    it with the installed webknockctl; the client installs the profile it gets back. And a
    profile that comes first: its key is made then, and the admin must enrol that one."""
    r = rooted
    conf = r.path("/etc/webknock/client.d")
    ctl: list[str | Path] = [r.path("/usr/local/sbin/webknockctl"), "--config", r.config]
    client: list[str | Path] = [INSTALL, "client", "--root", r.root]
    key, other_key = conf / "lab2.key", conf / "lab3.key"
    enrolled: list[str] = []
    try:
        first = ok(sh([*client, "--profile", "lab2", "--keygen-only"]))
        assert mode_of(key) == (0o600, "root", "root")
        assert not (conf / "lab2.ini").exists(), "no profile before the admin sends it"
        pub = printed_key(first)
        assert pub.endswith(f" {keygen.comment('lab2')}")
        assert f"\n    webknockctl client add {keygen.client_name()} --key '{pub}'\n" in first
        assert "install.sh client --profile lab2 --no-venv" in first
        private = key.read_bytes()
        again = ok(sh([*client, "--profile", "lab2", "--keygen-only", "--no-venv"]))
        assert printed_key(again) == pub and "(0600, kept: it existed)" in again
        assert key.read_bytes() == private, "never a new key over an existing one"

        # The admin enrols it; its profile (stdout of client add) goes back to the client.
        profile_text = ok(sh([*ctl, "client", "add", "alice", "--key", pub, "--ports", "tcp/2222"]))
        enrolled.append("alice")
        server_key = re.search(r"v2 server key: new \(public (wk2:\S+)\)", r.first)
        assert server_key and f"server_key = {server_key[1]}" in profile_text
        out = ok(sh([*client, "--profile", "lab2", "--from", "-", "--no-venv"], input=profile_text))
        assert printed_key(out) == pub and key.read_bytes() == private
        assert "enrolled this very key (client alice of instance webknock" in out, out
        assert "webknockctl client add" not in out, "nothing to send"
        ini = conf / "lab2.ini"
        assert mode_of(ini) == (0o644, "root", "root")
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(ini)
        assert dict(parser.items("client")) == {
            "url": URL,
            "server_key": server_key[1],
            "key_file": "lab2.key",
            "ports": "tcp/2222",
        }
        loaded = load_profile(ini)
        assert (loaded.protocol, loaded.key_file, loaded.keys_file) == ("v2", key, None)
        assert loaded.signing_key().public_text(keygen.comment("lab2")) == pub

        # The profile first, no key yet: keygen makes one, which the admin must enrol instead.
        out = ok(sh([*client, "--profile", "lab3", "--from", "-", "--no-venv"], input=profile_text))
        new_pub = printed_key(out)
        assert new_pub != pub and mode_of(other_key) == (0o600, "root", "root")
        assert "The profile is for another key (client alice, key id" in out
        assert (
            f"\n    webknockctl client remove alice && webknockctl client add alice --key "
            f"'{new_pub}'\n"
        ) in out
        # A profile without the enrolment line (written by hand): the add command, as is.
        bare = "".join(ln for ln in profile_text.splitlines(True) if not ln.startswith("#"))
        out = ok(sh([*client, "--profile", "lab3", "--from", "-", "--no-venv"], input=bare))
        assert printed_key(out) == new_pub and "(0600, kept: it existed)" in out
        assert f"\n    webknockctl client add {keygen.client_name()} --key '{new_pub}'\n" in out
    finally:
        for name in enrolled:
            ok(sh([*ctl, "client", "remove", name]))
        ok(sh([INSTALL, "uninstall", "--client", "--purge", "--root", r.root]))
    assert not key.exists() and not other_key.exists(), "--purge removes the keys it made"
    assert not conf.exists() and not r.path("/opt/webknock-client").exists()


def test_client_refuses_a_profile_with_both_protocols_or_neither(rooted: Rooted) -> None:
    r = rooted
    v2_profile = f"[client]\nurl = {URL}\nserver_key = wk2:{'A' * 43}\nports = tcp/22\n"
    how = "with --from FILE, on stdin with --from -"
    cases: list[tuple[str | None, str]] = [
        (blob_of(r.first).replace("[v1]", f"server_key = wk2:{'A' * 43}\n[v1]"), "both v1 keys"),
        (v2_profile + "keys_file = /etc/webknock/client.d/x.keys\n", "both v1 keys"),
        (f"[client]\nurl = {URL}\nports = tcp/22\n", "neither the [v1] keys"),
        ("", "no profile given: the input was empty"),
        (None, "no profile given: stdin is no terminal to paste it into, and no --from"),
    ]
    for text, needle in cases:
        argv: list[str | Path] = [INSTALL, "client", "--root", r.root, "--profile", "bad"]
        proc = sh([*argv, "--no-venv"] if text is None else [*argv, "--from", "-"], input=text)
        assert proc.returncode == 2, proc
        assert needle in proc.stderr and how in proc.stderr, proc.stderr
    no_url = sh(
        [INSTALL, "client", "--root", r.root, "--profile", "bad", "--no-venv", "--from", "-"],
        input=v2_profile.replace(f"url = {URL}\n", ""),
    )
    assert no_url.returncode == 2 and "--url https://HOST/PATH" in no_url.stderr, no_url
    assert not r.path("/etc/webknock/client.d/bad.ini").exists()
    assert not r.path("/opt/webknock-client").exists(), "refused before building anything"


def install_office(r: Rooted, *extra: str) -> str:
    return ok(
        sh(
            [
                INSTALL,
                "server",
                "--root",
                r.root,
                "--instance",
                "office",
                "--web-server",
                "apache",
                "--tcp-ports",
                "2222",
                "--protect",
                "yes",
                "--url",
                f"http://{SERVER4}/webknock-office",
                "--yes",
                *extra,
            ]
        )
    )


def test_second_instance_speaks_v2_only_until_rerun_with_v1(rooted: Rooted) -> None:
    """Without --v1 a new instance has no shared keys: the server key alone (v2), the URL in
    its config for the profiles of `webknockctl client add`, and the enrol steps printed
    instead of a v1 profile. A re-run with --v1 adds v1 to it."""
    r = rooted
    keys_before = r.path("/etc/webknock/webknock.keys").read_bytes()
    config = r.path("/etc/webknock/office.ini")
    keys = r.path("/etc/webknock/office.keys")
    out = install_office(r)
    try:
        cfg = load(config)
        assert (cfg.instance, cfg.chain, cfg.protect, cfg.tcp_ports) == (
            "office",
            "WK-office",
            True,
            frozenset({2222}),
        )
        assert cfg.spool_dir == r.path("/run/webknock/office")
        assert cfg.keys_file is None and not keys.exists(), "no v1 keys without --v1"
        assert "keys_file" not in config.read_text()
        assert cfg.url == f"http://{SERVER4}/webknock-office"
        assert mode_of(cfg.server_key_file) == (0o600, "root", "root")
        assert re.search(r"v2 server key: new \(public wk2:\S+\)", out), out
        assert "protocol v1: off (no keys file; --v1 turns it on" in out
        assert BEGIN not in out and "secret keys" not in out, "no v1 profile printed"
        ctl = f"{r.path('/usr/local/sbin/webknockctl')} --config {config}"
        assert f"here: {ctl} client add NAME --key 'wk2:...'" in out, out
        assert "install.sh client --profile NAME --keygen-only" in out
        refused = sh([INSTALL, "profile", "--root", r.root, "--instance", "office"])
        assert refused.returncode == 1 and "speaks protocol v2 only" in refused.stderr, refused

        snippet = r.path("/etc/webknock/apache-office.conf").read_text()
        assert (
            "ScriptAlias /webknock-office " in snippet and "<Location /webknock-office>" in snippet
        )
        assert f"SetEnv WEBKNOCK_CONFIG {config}" in snippet
        jobs = [
            ln for ln in r.path("/etc/cron.d/webknock").read_text().splitlines() if ln[:1] == "*"
        ]
        assert len(jobs) == 2 and "office.ini reap" in jobs[1]

        # A re-run without --v1 leaves it v2 only; with --v1 it adds the keys and keys_file.
        again = install_office(r)
        assert "protocol v1: off" in again and not keys.exists()
        before = config.read_text()
        added = install_office(r, "--v1")
        assert f"{keys}: new, from the OS random generator" in added
        assert "office.ini: kept, keys_file added (--v1)" in added
        assert BEGIN in added and "Protocol v1 is on" in added
        # the one change install.sh makes to a config it keeps: keys_file below [server]
        lines, after = before.splitlines(), config.read_text().splitlines()
        at = lines.index("[server]") + 1
        assert after[at].startswith("# protocol v1 (shared keys), added by install.sh server --v1")
        assert after == [*lines[:at], after[at], f"keys_file = {keys}", *lines[at:]]
        cfg = load(config)
        assert v1_keys_file(cfg) == keys and mode_of(keys) == (0o600, "root", "root")
        assert load_keys(keys).to_hex() != load_keys(r.path("/etc/webknock/webknock.keys")).to_hex()
        blob = configparser.ConfigParser(interpolation=None)
        blob.read_string(blob_of(added).split("\n", 1)[1].rsplit(END, 1)[0])
        assert dict(blob.items("v1")) == load_keys(keys).to_hex()
        assert blob.get("client", "url") == f"http://{SERVER4}/webknock-office"
        assert "url = http://192.0.2.1/webknock-office" in ok(
            sh([INSTALL, "profile", "--root", r.root, "--instance", "office"])
        )
    finally:
        ok(sh([INSTALL, "uninstall", "--root", r.root, "--instance", "office", "--purge"]))
    assert not config.exists() and not keys.exists()
    assert not r.path("/run/webknock/office").exists()
    assert r.path("/etc/webknock/webknock.keys").read_bytes() == keys_before
    assert r.python.exists(), "the first instance still needs the venv"
    jobs = [ln for ln in r.path("/etc/cron.d/webknock").read_text().splitlines() if ln[:1] == "*"]
    assert len(jobs) == 1 and "webknock.ini reap" in jobs[0]


def test_uninstall_then_purge_leaves_nothing(rooted: Rooted) -> None:
    """Runs last in this module: it removes the shared --root installation."""
    r = rooted
    # The admin's server block still includes the snippet: uninstall keeps it and says
    # which line to remove, so that nginx -t keeps passing.
    snippet = r.path("/etc/webknock/nginx-webknock.conf")
    site = r.path("/etc/nginx/sites-enabled/knock")
    site.parent.mkdir(parents=True)
    site.write_text(
        "server {\n    # include /etc/webknock/old.conf;\n"
        "    include /etc/webknock/nginx-webknock.conf;\n}\n"
    )
    held = sh([INSTALL, "uninstall", "--root", r.root])
    assert held.returncode == 0, held.stderr
    assert snippet.exists(), "a snippet the web server includes is kept"
    assert f"{site}:3:    include /etc/webknock/nginx-webknock.conf;" in held.stderr
    shutil.rmtree(r.path("/etc/nginx"))  # the admin removes the include
    out = ok(sh([INSTALL, "uninstall", "--root", r.root]))
    assert not snippet.exists(), "removed once nothing includes it"
    assert "--purge deletes them" in out
    assert files_below(r.root) == {
        "etc/webknock/webknock.ini",
        "etc/webknock/webknock.keys",
        "etc/webknock/webknock.server-key",
    }
    purged = ok(sh([INSTALL, "uninstall", "--root", r.root, "--purge"]))
    assert "(--purge empties it)" not in purged
    assert files_below(r.root) == set()
    for p in ("/opt/webknock", "/etc/webknock", "/run/webknock", "/var/lib/webknock"):
        assert not r.path(p).exists(), p


# -- host-like install in namespaces --------------------------------------------------------

# Runs in the lab's server network namespace under `unshare -m`: every directory install.sh
# writes to becomes an overlay whose upper layer lives on a tmpfs that disappears with the
# namespace. Refuses to go on unless each overlay is in place.
SANDBOX = r"""
set -euo pipefail
base=$1
mount -t tmpfs -o mode=0755 webknock-sandbox "$base"
for d in /etc /opt /usr/local /var /run; do
    mkdir -p "$base/upper$d" "$base/work$d"
    mount -t overlay webknock-sandbox \
        -o "lowerdir=$d,upperdir=$base/upper$d,workdir=$base/work$d" "$d"
done
for d in /etc /opt /usr/local /var /run; do
    [ "$(findmnt -n -o FSTYPE -M "$d")" = overlay ] || { echo "no overlay on $d" >&2; exit 99; }
done
# Hide the host's systemd: install.sh must take the no-systemd path, never the real manager.
[ ! -d /run/systemd ] || mount -t tmpfs -o mode=0755 webknock-sandbox /run/systemd
echo "ready $$"
exec sleep infinity
"""
SBIN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
RUNTIME_NOISE = re.compile(
    r"^(run/xtables\.lock|run/wk-fcgi.*|run/fcgiwrap\.socket|var/log/nginx.*)$"
)


class Sandbox:
    """A holder process keeps the mount namespace; commands join it with nsenter."""

    def __init__(self, lab: Lab, base: Path) -> None:
        self.base = base
        self.holder = subprocess.Popen(
            lab.server.cmd(
                [
                    "unshare",
                    "-m",
                    "--propagation",
                    "private",
                    "bash",
                    "-c",
                    SANDBOX,
                    "sandbox",
                    str(base),
                ]
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.holder.stdout is not None
        line = self.holder.stdout.readline().split()
        if line[:1] != ["ready"]:
            self.holder.wait(10)
            err = self.holder.stderr.read() if self.holder.stderr else ""
            pytest.skip(f"cannot build an overlay sandbox (kernel or tools lack it): {err.strip()}")
        self.pid = int(line[1])
        self.children: list[subprocess.Popen[bytes]] = []

    def cmd(self, argv: Sequence[str | Path]) -> list[str]:
        return ["nsenter", "-t", str(self.pid), "-m", "-n", "--", *[str(a) for a in argv]]

    def run(
        self, argv: Sequence[str | Path], *, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return sh(self.cmd(argv), env=env)

    def popen(self, argv: Sequence[str | Path], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.cmd(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.children.append(proc)
        return proc

    def upper_files(self) -> set[str]:
        """Files install.sh & co. left in the overlays (relative to /), via the namespace."""
        out = ok(self.run(["find", self.base / "upper", "-not", "-type", "d"]))
        prefix = f"{self.base}/upper/"
        return {ln[len(prefix) :] for ln in out.splitlines() if ln.startswith(prefix)}

    def close(self) -> None:
        for proc in self.children:
            stop_process(proc)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.holder.pid, 9)
        self.holder.communicate(timeout=10)


def agent(lab: Lab, request: dict[str, object], keys: v1.Keys | None = None) -> dict[str, object]:
    payload = {"keys": (keys or v1.Keys.generate()).to_hex(), **request}
    proc = lab.client.run(
        [str(shared_venv() / "bin" / "python3"), str(AGENT)],
        input=json.dumps(payload),
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
    )
    if proc.returncode != 0:
        raise LabError(f"agent {request['action']}: {proc.stderr[-2000:]}")
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def tcp_open(lab: Lab, src: str, port: int) -> bool:
    return bool(
        agent(lab, {"action": "tcp", "server": SERVER4, "src": src, "port": port, "timeout": 1.0})[
            "open"
        ]
    )


class Held:
    """An established TCP connection from the client namespace (agent.py 'hold')."""

    def __init__(self, lab: Lab, src: str, port: int) -> None:
        payload = {
            "action": "hold",
            "keys": v1.Keys.generate().to_hex(),
            "server": SERVER4,
            "src": src,
            "port": port,
        }
        self.proc = subprocess.Popen(
            lab.client.cmd([str(shared_venv() / "bin" / "python3"), str(AGENT)]),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(payload) + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "connected"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)

    def still_works(self) -> bool:
        out, _ = self.proc.communicate("again\n", timeout=30)
        return bool(json.loads(out)["second"])


NGINX_CONF = """user www-data;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    fastcgi_temp_path {dir}/fastcgi;
    proxy_temp_path {dir}/proxy;
    scgi_temp_path {dir}/scgi;
    uwsgi_temp_path {dir}/uwsgi;
    server {{
        listen {server}:80;
        include /etc/webknock/nginx-webknock.conf;
    }}
}}
"""


def start_web(sb: Sandbox, work: Path) -> None:
    """fcgiwrap (as www-data) on /run/fcgiwrap.socket and nginx with the installed snippet."""
    ok(sb.run(["sh", "-c", "mkdir -p /run/wk-fcgi && chown www-data:www-data /run/wk-fcgi"]))
    sb.popen(fcgiwrap_argv("/run/wk-fcgi/sock", 2), work / "fcgiwrap.log")
    deadline = time.monotonic() + 10
    while sb.run(["test", "-S", "/run/wk-fcgi/sock"]).returncode != 0:
        assert time.monotonic() < deadline, "fcgiwrap did not create its socket"
        time.sleep(0.05)
    ok(sb.run(["ln", "-sf", "/run/wk-fcgi/sock", "/run/fcgiwrap.socket"]))
    web = work / "nginx"
    web.mkdir(mode=0o755)
    shutil.copy("/etc/nginx/fastcgi_params", web)
    (web / "nginx.conf").write_text(NGINX_CONF.format(dir=web, server=SERVER4))
    sb.popen(["nginx", "-c", web / "nginx.conf", "-g", "daemon off;"], work / "nginx.log")
    deadline = time.monotonic() + 10
    while not sb.run(["ss", "-Hltn", "sport = :80"]).stdout.strip():
        assert time.monotonic() < deadline, (
            (web / "error.log").read_text() if (web / "error.log").exists() else "nginx"
        )
        time.sleep(0.05)


def daemon_pid(sb: Sandbox) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(a.endswith(b"/usr/local/sbin/webknockd") for a in cmdline[:2]):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/mnt") == os.readlink(f"/proc/{sb.pid}/ns/mnt"):
                    return int(pid)
    return None


def test_host_install_in_namespaces_protects_knocks_and_uninstalls() -> None:
    work = Path(tempfile.mkdtemp(prefix="webknock-hostinstall-", dir="/tmp"))
    os.chmod(work, 0o755)
    (work / "sandbox").mkdir()
    server_args: list[str | Path] = [
        INSTALL, "server", "--no-apt", "--yes", "--web-server", "nginx", "--tcp-ports", "22,2222",
        "--udp-ports", "51820", "--max-time", "600", "--protect", "yes", "--url", URL,
    ]  # fmt: skip
    # The server namespace has no route to PyPI: pip gets a wheelhouse downloaded here.
    wheels = work / "wheels"
    ok(
        sh(
            [
                shared_venv() / "bin" / "python3",
                "-m",
                "pip",
                "download",
                "-q",
                "--disable-pip-version-check",
                "-d",
                wheels,
                "-c",
                REPO / "requirements.txt",
                "pycryptodome",
                "filelock",
                "inotify_simple",
                "setuptools>=61",
                "wheel",
            ]
        )
    )
    # The admin's SSH session comes from CLIENT4; OTHER4 holds a connection made before.
    ssh_env = {
        "PATH": SBIN_PATH,
        "LANG": "C.UTF-8",
        "SSH_CLIENT": f"{CLIENT4} 50000 22",
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(wheels),
    }
    # The client, installed the usual way on this host (below --root, so nothing of the host
    # changes) and run in the lab's client namespace: first its key (v2), then, once the admin
    # enrolled it, its profile.
    croot = work / "client"
    client_install: list[str | Path] = [INSTALL, "client", "--root", croot, "--profile", "lab"]
    webknock = [
        str(croot / "usr/local/bin/webknock"),
        "--config",
        str(croot / "etc/webknock/client.d/lab.ini"),
        "--no-cache",
    ]
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, work, True)
        pub = printed_key(ok(sh([*client_install, "--keygen-only"])))
        lab = Lab("i")
        stack.callback(lab.close)
        lab.add_client_address(OTHER4)
        # A host with a stateful rule already (policy ACCEPT): conntrack tracks connections
        # from their start. Without any such rule the kernel starts tracking only when
        # protect's rules load, sees an old connection as NEW and protect drops it.
        for tool in ("iptables", "ip6tables"):
            lab.server.run(
                [
                    tool,
                    "-A",
                    "INPUT",
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "RELATED,ESTABLISHED",
                    "-j",
                    "ACCEPT",
                ]
            )
        ports = json.dumps({"tcp": [22, 2222], "udp": [51820]})
        listener = lab.server.popen(
            [str(shared_venv() / "bin/python3"), str(LISTENER), ports], log=work / "listener.log"
        )
        stack.callback(stop_process, listener)
        deadline = time.monotonic() + 10
        while not tcp_open(lab, OTHER4, 22):
            assert time.monotonic() < deadline, "listener did not come up"
        held = Held(lab, OTHER4, 22)
        stack.callback(held.close)
        sb = Sandbox(lab, work / "sandbox")
        stack.callback(sb.close)

        first = sb.run(server_args, env=ssh_env)
        out = ok(first)
        assert "granting your SSH session's address first" in out
        assert f"granted {CLIENT4} tcp/22" in out
        assert "systemd is not running: starting webknockd directly" in out
        pid = daemon_pid(sb)
        assert pid, out
        # On the host's own /run, the spool is a tmpfs of its own, bounded in size and
        # entries: the web user writes into it and must not fill /run.
        fstype, options = ok(
            sb.run(["findmnt", "-n", "-o", "FSTYPE,OPTIONS", "-M", "/run/webknock/webknock"])
        ).split()
        assert fstype == "tmpfs", options
        assert {"nosuid", "nodev", "noexec", "size=16384k", "nr_inodes=16384"} <= set(
            options.split(",")
        ), options
        # v2 only (no --v1): the server key, no shared keys
        assert ok(sb.run(["stat", "-c", "%a %U:%G", "/etc/webknock/webknock.server-key"])) == (
            "600 root:root\n"
        )
        assert sb.run(["test", "-e", "/etc/webknock/webknock.keys"]).returncode == 1
        assert "protocol v1: off" in out and BEGIN not in out
        # The admin enrols the client's key with the installed webknockctl; it prints the
        # profile (with the url install.sh put in the config) to send back.
        ctl = "/usr/local/sbin/webknockctl"
        profile = ok(
            sb.run([ctl, "client", "add", "lab", "--key", pub, "--ports", "tcp/22,tcp/2222"])
        )
        assert f"url = {URL}\n" in profile
        installed = ok(sh([*client_install, "--no-venv", "--from", "-"], input=profile))
        assert "enrolled this very key (client lab of instance webknock" in installed, installed
        checked = sb.run(["/usr/local/sbin/webknockctl", "check-config"])
        assert checked.returncode == 0 and checked.stdout.endswith("OK (instance webknock)\n"), (
            checked
        )
        # The daemon runs with the unit's capability bounding set (setpriv), nothing more.
        cap_bnd = int(
            re.findall(r"CapBnd:\s+([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())[0], 16
        )
        caps = {"net_admin": 12, "net_raw": 13, "chown": 0, "dac_read_search": 2}
        assert cap_bnd == sum(1 << n for n in caps.values())
        assert "NoNewPrivs:\t1" in Path(f"/proc/{pid}/status").read_text()

        assert tcp_open(lab, CLIENT4, 22), "the SSH session's address was granted first"
        assert not tcp_open(lab, OTHER4, 22), "protect closes the port to others"
        assert not tcp_open(lab, CLIENT4, 2222), "only the SSH port was granted"
        assert held.still_works(), "an established connection never drops"

        start_web(sb, work)
        # The installed client knocks with v2 (from CLIENT4, the client's first address).
        knocked = lab.client.run([*webknock, "knock", "--json", "--time", "300"], check=False)
        assert knocked.returncode == 0, knocked
        grants = json.loads(knocked.stdout)["grants"]
        assert [(g["ip"], sorted(g["ports"])) for g in grants] == [
            (CLIENT4, ["tcp/22", "tcp/2222"])
        ]
        assert tcp_open(lab, CLIENT4, 2222), "the knock opened tcp/2222"
        assert not tcp_open(lab, OTHER4, 2222), "for the client's address only"
        listed = json.loads(ok(sb.run(["/usr/local/sbin/webknockctl", "list", "--json"])))
        assert sorted((g["ip"], g["port"]) for g in listed) == [(CLIENT4, 22), (CLIENT4, 2222)]
        assert {g["port"]: g.get("client") for g in listed}[2222] == "lab", listed

        server_key = ok(sb.run(["cat", "/etc/webknock/webknock.server-key"]))
        second = ok(sb.run(server_args, env=ssh_env))
        assert "v2 server key: kept" in second and "protocol v1: off" in second
        assert ok(sb.run(["cat", "/etc/webknock/webknock.server-key"])) == server_key
        new_pid = daemon_pid(sb)
        assert new_pid and new_pid != pid, "a re-run restarts webknockd"
        assert tcp_open(lab, CLIENT4, 2222), "grants survive the restart"
        info = lab.client.run([*webknock, "info", "--json"], check=False)
        assert info.returncode == 0 and json.loads(info.stdout)["servers"][0]["client"] == "lab", (
            info
        )

        # backend = auto chose nftables (usable in this lab): table inet webknock
        assert "webknock" in ok(lab.server.run(["nft", "list", "tables"])).split()
        gone = ok(sb.run([INSTALL, "uninstall", "--purge"], env=ssh_env))
        assert "removing the firewall chain" in gone
        assert daemon_pid(sb) is None
        assert sb.run(["findmnt", "-M", "/run/webknock/webknock"]).returncode != 0, (
            "uninstall unmounts the spool's tmpfs"
        )
        for tool in ("iptables-save", "ip6tables-save"):
            assert "WEBKNOCK" not in ok(lab.server.run([tool, "-t", "filter"]))
        assert "webknock" not in ok(lab.server.run(["nft", "list", "tables"])).split()
        assert tcp_open(lab, OTHER4, 2222), (
            "without webknock the host policy (ACCEPT) applies again"
        )
        left = {f for f in sb.upper_files() if not RUNTIME_NOISE.match(f)}
        assert left == set(), f"uninstall --purge left {sorted(left)}"
        ok(sh([INSTALL, "uninstall", "--client", "--purge", "--root", croot]))
        assert files_below(croot) == set(), "uninstall --client --purge leaves nothing"
