"""`webknock keygen` / `webknock pubkey`: the client's v2 key beside its profile, 0600, never
overwritten, its public text round-tripping through parse_public_key."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

import webknock.client.lookup as lookup_mod
from webknock.client import cli, keygen
from webknock.client.credentials import V2Keys
from webknock.client.errors import EXIT_CONFIG, EXIT_OK
from webknock.client.profile import load_profile
from webknock.protocol.v2 import SigningKey, parse_public_key


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_keygen_writes_0600_and_prints_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "office.ini"
    old = os.umask(0)  # the file mode must not depend on the umask
    try:
        rc, out, err = run(capsys, "--config", str(profile), "keygen")
    finally:
        os.umask(old)
    assert rc == EXIT_OK, err
    key_file = tmp_path / "office.key"
    assert mode(key_file) == 0o600
    pem = key_file.read_text()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n")
    key = SigningKey.from_pem(pem)

    (line,) = out.splitlines()
    raw, comment = parse_public_key(line)
    assert raw == key.public and line.startswith("wk2:")
    assert comment == f"office@{keygen.host_name()}"

    assert f"wrote this client's private key to {key_file} (0600" in err
    assert f"webknockctl client add {keygen.client_name()} --key '{line}'" in err
    assert "key_file = office.key" in err and "server_key = wk2:..." in err, "profile advice"
    assert [p.name for p in tmp_path.iterdir()] == ["office.key"], "no temp file left"


def test_keygen_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "p.ini"
    assert run(capsys, "--config", str(profile), "keygen")[0] == EXIT_OK
    key_file = tmp_path / "p.key"
    before = key_file.read_bytes()
    rc, out, err = run(capsys, "--config", str(profile), "keygen")
    assert rc == EXIT_CONFIG and out == ""
    assert f"{key_file} exists: not overwritten" in err and "webknock pubkey" in err
    assert err.count("\n") == 1
    assert key_file.read_bytes() == before

    key_file.unlink()
    key_file.symlink_to(tmp_path / "nowhere")  # a dangling link counts as existing
    assert run(capsys, "--config", str(profile), "keygen")[0] == EXIT_CONFIG
    assert not (tmp_path / "nowhere").exists()


def test_create_key_loses_a_race_without_overwriting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file appears between the check and the write: the other writer's file stays."""
    target = tmp_path / "p.key"
    real_link = os.link

    def racing_link(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        Path(dst).write_text("theirs")
        real_link(src, dst)

    monkeypatch.setattr(os, "link", racing_link)
    with pytest.raises(Exception, match="exists: not overwritten"):
        keygen.create_key(target)
    assert target.read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["p.key"]


def test_keygen_follows_the_profiles_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = SigningKey.generate()
    profile = tmp_path / "p.ini"
    profile.write_text(
        "[client]\nurl = https://knock.example.org/webknock\n"
        f"server_key = {server.public_text()}\nkey_file = keys/mine.pem\n"
    )
    rc, out, err = run(capsys, "--config", str(profile), "keygen")
    assert rc == EXIT_OK, err
    key_file = tmp_path / "keys" / "mine.pem"
    assert mode(key_file) == 0o600 and mode(key_file.parent) == 0o700
    assert "then put in" not in err, "the profile already speaks v2"
    creds = load_profile(profile).credentials()
    assert isinstance(creds, V2Keys)
    assert creds.client.public == parse_public_key(out.strip())[0]

    rc, again, _ = run(capsys, "--config", str(profile), "pubkey")
    assert rc == EXIT_OK and again == out


def test_keygen_advice_for_a_v1_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    profile = tmp_path / "p.ini"
    profile.write_text("[client]\nurl = https://h/webknock\nkeys_file = p.keys\n")
    rc, _, err = run(capsys, "--config", str(profile), "keygen")
    assert rc == EXIT_OK
    assert f"then put in {profile}, section [client] instead of keys_file: key_file = p.key" in err


def test_keygen_quiet_prints_only_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = run(capsys, "-q", "--config", str(tmp_path / "p.ini"), "keygen")
    assert rc == EXIT_OK and err == "" and out.startswith("wk2:")


def test_keygen_by_profile_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No profile yet: root's key goes to the system folder, a user's to ~/.config/webknock
    (where install.sh client puts the profile); an existing profile keeps its folder."""
    system = tmp_path / "system"
    monkeypatch.setattr(lookup_mod, "SYSTEM_DIR", system)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert run(capsys, "keygen", "--profile", "office")[0] == EXIT_OK
    assert mode(system / "office.key") == 0o600 and mode(system) == 0o755

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    rc, out, _ = run(capsys, "--profile", "lab", "keygen")
    user = tmp_path / "xdg" / "webknock"
    assert rc == EXIT_OK and mode(user / "lab.key") == 0o600 and mode(user) == 0o700
    assert parse_public_key(out)[1].startswith("lab@")

    (user / "office.ini").write_text("[client]\nurl = https://h/\n")  # found first
    assert run(capsys, "keygen", "--profile", "office")[0] == EXIT_OK
    assert (user / "office.key").exists()
    rc, _, err = run(capsys, "keygen", "--profile", "../x")
    assert rc == EXIT_CONFIG and "use letters, digits" in err


def test_pubkey_without_a_key_or_with_a_loose_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profile = tmp_path / "p.ini"
    rc, _, err = run(capsys, "--config", str(profile), "pubkey")
    assert rc == EXIT_CONFIG and "no key yet; make one with: webknock keygen" in err
    assert run(capsys, "--config", str(profile), "keygen")[0] == EXIT_OK
    os.chmod(tmp_path / "p.key", 0o644)
    rc, _, err = run(capsys, "--config", str(profile), "pubkey")
    assert rc == EXIT_CONFIG and "readable by everyone" in err


def test_comment_and_names_are_sanitised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "gethostname", lambda: "box 1';rm -rf.example.org")
    assert keygen.comment("o'ffice x") == "officex@box1rm-rf.example.org"
    assert keygen.client_name() == "box1rm-rf"
    monkeypatch.setattr(socket, "gethostname", lambda: "'''")
    assert keygen.comment("") == "default@localhost"
