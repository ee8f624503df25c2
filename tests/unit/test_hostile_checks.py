"""`webknockctl check-config`: wrong owners and modes of keys, config, state and spool are
reported, as errors when they let someone other than root change what root trusts."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import install_correctly, run_in_mount_namespace, v1_keys_file
from webknock.config import ServerConfig, load
from webknock.ctl import cli as ctl
from webknock.protocol.v1 import Keys
from webknock.server.checks import check_installation
from webknock.spool.mount import mount_spool, prepare_spool, unmount_spool

WEB = pwd.getpwnam("www-data")


@pytest.fixture
def site(vector_keys: Keys) -> Iterator[ServerConfig]:
    """A correct installation in a fresh directory (root 0755, as /etc/webknock would be):
    keys root 0600 (only webknockd reads them), the spool on a bounded tmpfs of its own
    (as `webknockctl prepare-spool` mounts it; unmounted at the end)."""
    base = Path(tempfile.mkdtemp(prefix="webknock-check-"))
    cfg: ServerConfig | None = None
    try:
        cfg = load(install_correctly(base, vector_keys))
        os.chown(v1_keys_file(cfg), 0, 0)
        os.chmod(v1_keys_file(cfg), 0o600)
        if not mount_spool(cfg.spool, WEB.pw_gid):
            pytest.skip("cannot mount a tmpfs for the spool here")
        prepare_spool(cfg.spool, WEB.pw_gid)
        yield cfg
    finally:  # also when the installation itself failed
        if cfg is not None:
            unmount_spool(cfg.spool)
        shutil.rmtree(base)


def test_correct_installation_is_clean(site: ServerConfig) -> None:
    assert check_installation(site) == []


def chmod(path: str, mode: int) -> Callable[[ServerConfig], None]:
    return lambda cfg: os.chmod(resolve(cfg, path), mode)


def chown(path: str, uid: int, gid: int = -1) -> Callable[[ServerConfig], None]:
    return lambda cfg: os.chown(resolve(cfg, path), uid, gid)


def resolve(cfg: ServerConfig, path: str) -> Path:
    return {
        "keys": v1_keys_file(cfg),
        "config": cfg.source,
        "etc": cfg.source.parent,
        "state": cfg.state_file,
        "state dir": cfg.state_file.parent,
        "lock": Path(f"{cfg.state_file}.lock"),
        "claimed": cfg.spool.claimed,
        "rejected": cfg.spool.rejected,
        "requests": cfg.spool.requests,
        "waits": cfg.spool.waits,
    }[path]


def symlink_state(cfg: ServerConfig) -> None:
    real = cfg.state_file.with_name("real.db")
    os.rename(cfg.state_file, real)
    os.symlink(real, cfg.state_file)


@pytest.mark.parametrize(
    ("damage", "level", "text"),
    [
        (chmod("keys", 0o644), "error", "readable by everyone"),
        (chmod("keys", 0o660), "error", "keys file"),
        (chown("keys", WEB.pw_uid), "error", "owned by uid"),
        (chown("keys", 0, WEB.pw_gid), None, ""),  # no group may read them anyway
        (chmod("keys", 0o640), "error", "whoever can read the keys can open the firewall"),
        (chmod("config", 0o666), "error", "writable by others than root"),
        (chmod("config", 0o640), None, ""),
        (chown("config", WEB.pw_uid), "error", "config file"),
        (chmod("etc", 0o777), "error", "config, keys, spool's parent directory"),
        (chown("etc", WEB.pw_uid), "error", "config, keys"),
        (chmod("state", 0o644), "warning", "readable by more users"),
        (chmod("state", 0o666), "error", "state file"),
        (chown("state dir", WEB.pw_uid), "error", "state directory"),
        (chmod("lock", 0o666), "error", ".lock"),
        (symlink_state, "error", "is a symlink"),
        (chmod("claimed", 0o777), "error", "claimed"),
        (chown("rejected", WEB.pw_uid), "error", "rejected"),
        (chmod("requests", 0o1733), "error", "requests"),
        (chmod("waits", 0o1733), "error", "waits"),
        (chmod("waits", 0o1731), "error", "others could answer a CGI"),
    ],
)
def test_wrong_owner_or_mode_is_reported(
    site: ServerConfig,
    damage: Callable[[ServerConfig], None],
    level: str | None,
    text: str,
) -> None:
    damage(site)
    problems = check_installation(site)
    if level is None:
        assert problems == []
        return
    assert any(lv == level and text in msg for lv, msg in problems), problems
    assert all("run: " in msg for lv, msg in problems if "mode" in msg or "owned" in msg)


def test_a_spool_without_its_own_tmpfs_is_a_warning(site: ServerConfig) -> None:
    """The web user writes into the spool: on the host's file system it could fill it."""
    unmount_spool(site.spool)
    prepare_spool(site.spool, WEB.pw_gid)
    assert check_installation(site) == [
        (
            "warning",
            f"spool {site.spool.root} is not its own size-bounded tmpfs: the web user can "
            "fill the file system it is on; run: webknockctl prepare-spool",
        )
    ]


def test_web_user_root_is_an_error(site: ServerConfig, vector_keys: Keys) -> None:
    text = site.source.read_text().replace("web_user = www-data", "web_user = root")
    site.source.write_text(text)
    problems = check_installation(load(site.source))
    assert ("error", f"{site.source}: [server] web_user root is root: no privilege boundary") in (
        problems
    )


def test_exit_status_and_output(site: ServerConfig, capsys: pytest.CaptureFixture[str]) -> None:
    assert ctl.main(["--config", str(site.source), "check-config"]) == 0
    assert "OK" in capsys.readouterr().out
    os.chmod(site.state_file, 0o640)
    assert ctl.main(["--config", str(site.source), "check-config"]) == 3
    assert capsys.readouterr().out.startswith("warning: state file")
    os.chmod(site.source, 0o666)
    assert ctl.main(["--config", str(site.source), "check-config"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("error: config file") and out[-1].startswith("warning:")


def test_spool_split_over_file_systems_is_an_error(site: ServerConfig) -> None:
    """The daemon claims requests by rename(2): a mount inside the spool breaks that."""
    code = (
        "import subprocess\n"
        "from webknock.server.checks import check_installation\n"
        "from webknock.config import load\n"
        "from webknock.spool.mount import prepare_spool\n"
        f"cfg = load({str(site.source)!r})\n"
        "subprocess.run(['mount', '-t', 'tmpfs', 'tmpfs', str(cfg.spool.claimed)], check=True)\n"
        f"prepare_spool(cfg.spool, {WEB.pw_gid})\n"
        "print(repr(check_installation(cfg)))\n"
    )
    stdout = run_in_mount_namespace(code, timeout=60)
    assert "spans 2 file systems" in stdout and "claimed" in stdout
