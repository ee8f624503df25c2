"""`webknockctl check-config` for protocol v2: v1 optional, the server key (loads, 0600
root), no protocol at all, every client file that is skipped named with its line, files
the daemon ignores, and who may write the clients directory."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from tests.conftest import write_instance
from webknock.config import ServerConfig, load
from webknock.ctl import cli as ctl
from webknock.filemodes import Problem
from webknock.keys import create_server_key
from webknock.protocol.v1 import Keys
from webknock.protocol.v2 import SigningKey
from webknock.server import firewall
from webknock.server.checks import check_installation

KEY = SigningKey.generate().public_text()
NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture(autouse=True)
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The backend is not what these tests look at."""
    monkeypatch.setattr(firewall, "make_firewall", lambda cfg, **kw: None)


def instance(base: Path, keys: Keys, *, v1: bool = True, v2: bool = False) -> ServerConfig:
    cfg = load(write_instance(base, keys, **({} if v1 else {"keys_file": ""})))
    if v2:
        create_server_key(cfg.server_key_file)
    return cfg


def mine(problems: list[Problem]) -> list[Problem]:
    """The problems about keys, protocols and clients (not the spool or state file, which
    these temporary instances do not have)."""
    return [p for p in problems if not p[1].startswith(("spool ", "state "))]


def errors(cfg: ServerConfig) -> list[str]:
    return [msg for level, msg in check_installation(cfg) if level == "error"]


def test_v1_only_is_fine(tmp_path: Path, vector_keys: Keys) -> None:
    assert mine(check_installation(instance(tmp_path, vector_keys))) == []


def test_v1_and_v2_with_clients_is_fine(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = instance(tmp_path, vector_keys, v2=True)
    cfg.clients_dir.mkdir()
    (cfg.clients_dir / "alice.conf").write_text(f"key = {KEY}\n")
    assert mine(check_installation(cfg)) == []


def test_v2_only_skips_the_v1_checks(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = instance(tmp_path, vector_keys, v1=False, v2=True)
    assert cfg.keys_file is None
    cfg.clients_dir.mkdir()
    (cfg.clients_dir / "alice.conf").write_text(f"key = {KEY}\n")
    problems = check_installation(cfg)
    assert mine(problems) == []
    assert not any("keys.ini" in msg for _, msg in problems)


def test_v2_only_without_a_client_warns(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = instance(tmp_path, vector_keys, v1=False, v2=True)
    assert mine(check_installation(cfg)) == [
        ("warning", f"no usable client in {cfg.clients_dir}: nobody can knock")
    ]


def test_no_protocol_enabled(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = instance(tmp_path, vector_keys, v1=False)
    (msg,) = [m for m in errors(cfg) if "protocol" in m]
    assert msg.startswith(f"{cfg.source}: no protocol enabled")
    assert str(cfg.server_key_file) in msg


@pytest.mark.parametrize(
    ("damage", "text"),
    [
        (lambda p: os.chmod(p, 0o640), "wider than 0600"),
        (lambda p: os.chmod(p, 0o644), "chmod 0600"),
        (lambda p: os.chown(p, NOBODY, -1), "owned by uid"),
        (lambda p: p.write_text("-----BEGIN PRIVATE KEY-----\nnope\n"), "not a PKCS#8 PEM"),
        (lambda p: p.write_bytes(b"\xff\xfe"), "not a PEM text file"),
    ],
)
def test_server_key_must_load_and_be_root_0600(
    tmp_path: Path, vector_keys: Keys, damage: object, text: str
) -> None:
    cfg = instance(tmp_path, vector_keys, v2=True)
    damage(cfg.server_key_file)  # type: ignore[operator]
    found = [m for m in errors(cfg) if str(cfg.server_key_file) in m]
    assert any(text in m for m in found), found


def test_a_server_key_that_is_a_symlink_is_an_error(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = instance(tmp_path, vector_keys)
    real = tmp_path / "real.key"
    create_server_key(real)
    os.symlink(real, cfg.server_key_file)
    assert f"server key {cfg.server_key_file} is a symlink" in errors(cfg)


BAD_FILES = [
    # (file name, content, line, part of the message)
    ("ports.conf", f"key = {KEY}\nports = tcp/99999\n", 2, "ports: "),
    ("words.conf", "this is not a client file\n", 1, "expected one of key"),
    ("nokey.conf", "# no key\nenabled = yes\n", 0, "no line key"),
    ("short.conf", "key = wk2:AAAAAAAA\n", 1, "32 bytes"),
    ("prefix.conf", "key = ssh-ed25519 AAAA\n", 1, "wk2:"),
    ("twice.conf", f"key = {KEY}\nenabled = yes\nenabled = no\n", 3, "enabled given twice"),
    ("ctrl.conf", f"key = {KEY}\nfrom = 10.0.0.0/8\x07\n", 2, "control characters"),
    ("latin1.conf", "key = wk2:\xe9\n", 0, "not a UTF-8 text file"),
    ("bad\x01name.conf", f"key = {KEY}\n", 0, "client name"),
    ("-dash.conf", f"key = {KEY}\n", 0, "client name"),
]


@pytest.mark.parametrize(("name", "content", "line", "text"), BAD_FILES)
def test_every_skipped_client_file_is_an_error_naming_file_and_line(
    tmp_path: Path, vector_keys: Keys, name: str, content: str, line: int, text: str
) -> None:
    cfg = instance(tmp_path, vector_keys, v2=True)
    cfg.clients_dir.mkdir()
    path = cfg.clients_dir / name
    path.write_bytes(content.encode("latin-1") if "latin1" in name else content.encode())
    where = f"{path}:{line}: " if line else f"{path}: "
    found = [m for m in errors(cfg) if m.startswith(where)]
    assert len(found) == 1 and text in found[0], errors(cfg)


def test_a_key_enrolled_twice_names_both_files(tmp_path: Path, vector_keys: Keys) -> None:
    cfg = instance(tmp_path, vector_keys, v2=True)
    cfg.clients_dir.mkdir()
    for name in ("alice", "mallory"):
        (cfg.clients_dir / f"{name}.conf").write_text(f"key = {KEY} {name}\n")
    found = errors(cfg)
    assert f"{cfg.clients_dir / 'alice.conf'}: same key as mallory" in found
    assert f"{cfg.clients_dir / 'mallory.conf'}: same key as alice" in found


@pytest.mark.parametrize(
    "name", ["alice.conf.bak", "alice.conf~", "README", ".alice.conf.swp", ".hidden.conf"]
)
def test_files_the_daemon_ignores_are_a_warning(
    tmp_path: Path, vector_keys: Keys, name: str
) -> None:
    cfg = instance(tmp_path, vector_keys, v2=True)
    cfg.clients_dir.mkdir()
    (cfg.clients_dir / "alice.conf").write_text(f"key = {KEY}\n")
    (cfg.clients_dir / name).write_text("whatever\n")
    assert mine(check_installation(cfg)) == [
        (
            "warning",
            f"{cfg.clients_dir / name}: ignored by webknockd (only NAME.conf files are clients)",
        )
    ]


@pytest.mark.parametrize(
    ("target", "damage", "text"),
    [
        ("dir", lambda p: os.chmod(p, 0o777), "writable by others than root"),
        ("dir", lambda p: os.chown(p, NOBODY, -1), "owned by uid"),
        ("file", lambda p: os.chmod(p, 0o666), "writable by others than root"),
        ("file", lambda p: os.chown(p, NOBODY, -1), "owned by uid"),
    ],
)
def test_only_root_may_write_client_files(
    tmp_path: Path, vector_keys: Keys, target: str, damage: object, text: str
) -> None:
    cfg = instance(tmp_path, vector_keys, v2=True)
    cfg.clients_dir.mkdir(mode=0o755)
    path = cfg.clients_dir / "alice.conf"
    path.write_text(f"key = {KEY}\n")
    os.chmod(path, 0o644)
    damage(cfg.clients_dir if target == "dir" else path)  # type: ignore[operator]
    what = "clients directory" if target == "dir" else "client file"
    found = [m for m in errors(cfg) if m.startswith(what)]
    assert len(found) == 1 and text in found[0], found


def test_check_config_prints_file_and_line(
    tmp_path: Path, vector_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = instance(tmp_path, vector_keys, v1=False, v2=True)
    cfg.clients_dir.mkdir()
    (cfg.clients_dir / "alice.conf").write_text(f"key = {KEY}\n")
    (cfg.clients_dir / "bob.conf").write_text(f"# bob\nkey = {KEY[:-4]}\n")
    code = ctl.main(["--config", str(cfg.source), "check-config"])
    out = capsys.readouterr().out.splitlines()
    assert code == 1
    assert (
        f"error: {cfg.clients_dir / 'bob.conf'}:2: key: a public key is 32 bytes, this one 29"
        in out
    )
