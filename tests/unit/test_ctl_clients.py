"""`webknockctl client`: add (file, mode, profile, server key made once), the refusals,
list, show, disable/enable, remove --revoke, on a temporary instance and an in-memory
firewall."""

from __future__ import annotations

import configparser
import datetime
import ipaddress
import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_instance
from tests.fakes import MemoryFirewall
from webknock.config import ServerConfig, load
from webknock.ctl import cli as ctl
from webknock.keys import load_server_key
from webknock.protocol.v1 import Keys
from webknock.protocol.v2 import SigningKey, key_id, parse_public_key
from webknock.server import daemon
from webknock.server.clients import load_clients
from webknock.server.grants import GrantRequest

URL = "https://knock.example.org/wk"
OTHER = SigningKey.generate().public_text()  # a second client's key


@pytest.fixture
def fw(monkeypatch: pytest.MonkeyPatch) -> MemoryFirewall:
    firewall = MemoryFirewall()
    monkeypatch.setattr(daemon, "make_firewall", lambda cfg, **kw: firewall)
    return firewall


@pytest.fixture
def config(tmp_path: Path, vector_keys: Keys) -> Path:
    return write_instance(tmp_path, vector_keys, url=URL)


@pytest.fixture
def cfg(config: Path) -> ServerConfig:
    return load(config)


@pytest.fixture
def alice_key(v2_vectors: dict[str, Any]) -> str:
    public: str = v2_vectors["client"]["public"]
    return public


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = ctl.main(["--config", str(config), "client", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def profile(out: str) -> configparser.SectionProxy:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(out)
    return parser["client"]


def add_alice(capsys: pytest.CaptureFixture[str], config: Path, key: str) -> str:
    code, out, err = run(
        capsys,
        config,
        "add",
        "alice",
        "--key",
        f"{key} alice@laptop",
        "--ports",
        "tcp/22,udp/51820",
        "--max-time",
        "600",
        "--from",
        "192.0.2.0/24, 2001:db8::/32",
        "--open-prefix",
        "24,64",
        "--expires",
        "2099-06-30",
    )
    assert code == 0, err
    return out


# -- add ----------------------------------------------------------------------------------


def test_add_writes_the_file_and_prints_the_profile(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert not cfg.clients_dir.exists() and not cfg.server_key_file.exists()
    code, out, err = run(
        capsys,
        config,
        "add",
        "alice",
        "--key",
        f"{alice_key} alice@laptop",
        "--ports",
        "tcp/22,udp/51820",
        "--max-time",
        "600",
        "--from",
        "192.0.2.0/24, 2001:db8::/32",
        "--expires",
        "2099-06-30",
    )
    assert code == 0, err
    path = cfg.clients_dir / "alice.conf"
    assert path.read_text() == (
        "# webknock client alice\n"
        f"key = {alice_key} alice@laptop\n"
        "ports = tcp/22, udp/51820\n"
        "max_time = 600\n"
        "from = 192.0.2.0/24, 2001:db8::/32\n"
        "expires = 2099-06-30\n"
        "enabled = yes\n"
    )
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o644 and st.st_uid == 0
    st = os.stat(cfg.clients_dir)
    assert stat.S_IMODE(st.st_mode) == 0o755 and st.st_uid == 0
    assert [n for n in os.listdir(cfg.clients_dir) if n != "alice.conf"] == []  # no temp left
    st = os.stat(cfg.server_key_file)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == 0
    server = load_server_key(cfg.server_key_file)

    assert f"created the server key {cfg.server_key_file}" in err
    assert f"enrolled client alice: {path}" in err
    prof = profile(out)
    assert dict(prof) == {
        "url": URL,
        "server_key": server.public_text(),
        "ports": "tcp/22, udp/51820",
    }
    assert "# key_file = " in out and "fill in" in out

    clients, problems = load_clients(cfg.clients_dir)
    assert problems == [] and list(clients) == ["alice"]
    assert clients["alice"].kid.hex() == "56475aa75463474c"


def test_server_key_is_made_once(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = add_alice(capsys, config, alice_key)
    before = cfg.server_key_file.read_bytes(), os.stat(cfg.server_key_file).st_ino
    code, out2, err = run(capsys, config, "add", "bob", "--key", OTHER)
    assert code == 0, err
    assert "server key" not in err
    assert (cfg.server_key_file.read_bytes(), os.stat(cfg.server_key_file).st_ino) == before
    assert profile(out)["server_key"] == profile(out2)["server_key"]
    assert profile(out2)["ports"] == "tcp/22, tcp/2222, udp/51820"  # default: all offered
    assert (cfg.clients_dir / "bob.conf").read_text() == (
        f"# webknock client bob\nkey = {OTHER}\nenabled = yes\n"
    )


def test_profile_without_url_tells_the_admin(
    tmp_path: Path, vector_keys: Keys, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_instance(tmp_path, vector_keys)
    code, out, _ = run(capsys, config, "add", "alice", "--key", alice_key)
    assert code == 0
    prof = profile(out)
    assert "url" not in prof and prof["server_key"].startswith("wk2:")
    assert not any(line.startswith("url") for line in out.splitlines())
    hint = out[out.index("# url = ") :]
    assert "[server] url" in hint and str(config) in hint


def test_add_on_an_existing_clients_dir_and_a_bad_server_key(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.server_key_file.write_text("not a key\n")
    os.chmod(cfg.server_key_file, 0o600)
    code, _, err = run(capsys, config, "add", "alice", "--key", alice_key)
    assert code == 1 and "server key unusable" in err
    assert not (cfg.clients_dir / "alice.conf").exists()
    assert cfg.server_key_file.read_text() == "not a key\n"  # never replaced


TOMORROW = (datetime.datetime.now(datetime.UTC).date() + datetime.timedelta(days=1)).isoformat()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["../evil"], "no '/'"),
        (["sub/evil"], "no '/'"),
        (["ev\x01il"], "control characters"),
        (["ev\nil"], "control characters"),
        (["a" * 65], "1-64"),
        (["bob", "--key", "wk2:AAAA"], "32 bytes"),
        (["bob", "--key", "ssh-ed25519 AAAA"], "starts with 'wk2:'"),
        (["bob", "--key", "wk2:not*base64"], "base64url"),
        (["bob", "--key", f"{OTHER} bo\x1bb"], "control characters"),
        (["bob", "--key", f"{OTHER} bob #2"], "cannot be kept"),
        (["bob", "--ports", "tcp/23"], "tcp/23 not offered"),
        (["bob", "--ports", "tcp/22,udp/22"], "udp/22 not offered"),
        (["bob", "--ports", "ssh"], "--ports"),
        (["bob", "--ports", ","], "no port given"),
        (["bob", "--max-time", "0"], "--max-time"),
        (["bob", "--max-time", "3601"], "over the instance's max_time 3600"),
        (["bob", "--max-time", "1h"], "--max-time"),
        (["bob", "--from", "192.0.2.0/33"], "--from"),
        (["bob", "--from", " "], "no network given"),
        (["bob", "--expires", "2020-01-01"], "past"),
        (["bob", "--open-prefix", "8"], "--open-prefix: '8' is not an IPv4 prefix length"),
        (["bob", "--open-prefix", "24,16"], "'16' is not an IPv6 prefix length from 32 to 128"),
        (["bob", "--open-prefix", "/24"], "--open-prefix: '/24' is not"),
        (["bob", "--open-prefix", "24,64,64"], "--open-prefix: must be"),
        (["bob", "--expires", "tomorrow"], "YYYY-MM-DD"),
    ],
)
def test_add_refuses(
    cfg: ServerConfig,
    config: Path,
    args: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if "--key" not in args:
        args = [*args, "--key", OTHER]
    code, out, err = run(capsys, config, "add", *args)
    assert code == 2, err
    assert message in err and err.startswith("webknockctl client add: ")
    assert out == ""
    assert not cfg.server_key_file.exists()  # nothing made for a refused enrolment
    assert not cfg.clients_dir.exists()


def test_add_accepts_today_as_last_day(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    today = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert run(capsys, config, "add", "bob", "--key", OTHER, "--expires", today)[0] == 0
    carol = SigningKey.generate().public_text()
    assert run(capsys, config, "add", "carol", "--key", carol, "--expires", TOMORROW)[0] == 0


def test_add_refuses_an_enrolled_key_or_name(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    add_alice(capsys, config, alice_key)
    before = (cfg.clients_dir / "alice.conf").read_text()
    code, _, err = run(capsys, config, "add", "alice", "--key", OTHER)
    assert code == 2 and "client alice is already enrolled" in err
    code, _, err = run(capsys, config, "add", "bob", "--key", f"{alice_key} other comment")
    assert code == 2 and "already enrolled as client alice" in err
    # also when the one on file is disabled
    assert run(capsys, config, "disable", "alice")[0] == 0
    code, _, err = run(capsys, config, "add", "bob", "--key", alice_key)
    assert code == 2 and "already enrolled as client alice" in err
    assert sorted(os.listdir(cfg.clients_dir)) == ["alice.conf"]
    assert (cfg.clients_dir / "alice.conf").read_text() == before.replace(
        "enabled = yes", "enabled = no"
    )
    server = load_server_key(cfg.server_key_file).public_text()
    code, _, err = run(capsys, config, "add", "bob", "--key", server)
    assert code == 2 and "server's own key" in err


def test_add_refuses_a_name_taken_by_a_broken_file(
    cfg: ServerConfig, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.clients_dir.mkdir()
    (cfg.clients_dir / "bob.conf").write_text("garbage\n")
    code, _, err = run(capsys, config, "add", "bob", "--key", OTHER)
    assert code == 2 and "already enrolled" in err
    assert (cfg.clients_dir / "bob.conf").read_text() == "garbage\n"


# -- list, show ---------------------------------------------------------------------------


def test_list_json_shape(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, config, "list", "--json")
    assert code == 0 and json.loads(out) == []
    code, out, _ = run(capsys, config, "list")
    assert code == 0 and out == f"no clients enrolled in {cfg.clients_dir}\n"
    add_alice(capsys, config, alice_key)
    assert run(capsys, config, "add", "bob", "--key", OTHER)[0] == 0
    assert run(capsys, config, "disable", "bob")[0] == 0
    code, out, err = run(capsys, config, "list", "--json")
    assert code == 0 and err == ""
    alice, bob = json.loads(out)
    assert alice == {
        "name": "alice",
        "enabled": True,
        "comment": "alice@laptop",
        "ports": ["tcp/22", "udp/51820"],
        "max_time": 600,
        "from": ["192.0.2.0/24", "2001:db8::/32"],
        "open_prefix": {"ipv4": 24, "ipv6": 64},
        "expires": "2099-06-30",
        "kid": "56475aa75463474c",
    }
    assert bob == {
        "name": "bob",
        "enabled": False,
        "comment": "",
        "ports": ["tcp/22", "tcp/2222", "udp/51820"],
        "max_time": 3600,
        "from": [],
        "open_prefix": {"ipv4": 32, "ipv6": 128},  # the address alone
        "expires": None,
        "kid": key_id(parse_public_key(OTHER)[0]).hex(),
    }

    code, out, _ = run(capsys, config, "list")
    header, row_a, row_b = out.splitlines()
    assert header.split() == [
        "NAME",
        "ENABLED",
        "PORTS",
        "MAX_TIME",
        "FROM",
        "OPEN_PREFIX",
        "EXPIRES",
        "COMMENT",
    ]
    assert row_a.split() == [
        "alice",
        "yes",
        "tcp/22,udp/51820",
        "600",
        "192.0.2.0/24,2001:db8::/32",
        "24,64",
        "2099-06-30",
        "alice@laptop",
    ]
    assert row_b.split() == [
        "bob",
        "no",
        "tcp/22,tcp/2222,udp/51820",
        "3600",
        "any",
        "-",
        "never",
        "-",
    ]


def test_list_names_files_not_served(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    add_alice(capsys, config, alice_key)
    (cfg.clients_dir / "broken.conf").write_text(f"key = {OTHER}\nports = tcp/0\n")
    code, out, err = run(capsys, config, "list", "--json")
    assert code == 0 and [c["name"] for c in json.loads(out)] == ["alice"]
    assert (
        f"webknockctl client list: not served: {cfg.clients_dir / 'broken.conf'}:2: ports:" in err
    )


def test_show(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    add_alice(capsys, config, alice_key)
    code, out, _ = run(capsys, config, "show", "alice")
    assert code == 0
    fields = dict(line.split(":", 1) for line in out.splitlines())
    fields = {k: v.strip() for k, v in fields.items()}
    assert fields == {
        "name": "alice",
        "file": str(cfg.clients_dir / "alice.conf"),
        "state": "active",
        "enabled": "yes",
        "key": f"{alice_key} alice@laptop",
        "kid": "56475aa75463474c",
        "comment": "alice@laptop",
        "ports": "tcp/22, udp/51820",
        "max_time": "600",
        "from": "192.0.2.0/24, 2001:db8::/32",
        "opens": "its IPv4 /24, its IPv6 /64 (open_prefix = 24, 64)",
        "expires": "2099-06-30",
    }
    run(capsys, config, "disable", "alice")
    assert "state:    disabled" in run(capsys, config, "show", "alice")[1]


def test_show_a_client_skipped_for_a_duplicate_key(
    cfg: ServerConfig, config: Path, alice_key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    add_alice(capsys, config, alice_key)
    (cfg.clients_dir / "copy.conf").write_text(f"key = {alice_key}\n")
    code, out, _ = run(capsys, config, "show", "copy")
    assert code == 0 and "NOT SERVED: same key as alice" in out
    assert "(every port the instance offers)" in out and "(the instance's max_time)" in out
    assert "opens:    the address alone\n" in out


@pytest.mark.parametrize(
    ("value", "line", "opens"),
    [
        ("24", "open_prefix = 24", "its IPv4 /24, the IPv6 address alone (open_prefix = 24)"),
        ("32,64", "open_prefix = 32, 64", "the IPv4 address alone, its IPv6 /64"),
        ("32,128", "open_prefix = 32", "the address alone"),
    ],
)
def test_add_open_prefix_writes_its_line_and_show_says_what_a_knock_opens(
    cfg: ServerConfig,
    config: Path,
    value: str,
    line: str,
    opens: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, config, "add", "bob", "--key", OTHER, "--open-prefix", value)
    assert code == 0, err
    assert f"\n{line}\nenabled = yes\n" in (cfg.clients_dir / "bob.conf").read_text()
    assert f"opens:    {opens}" in run(capsys, config, "show", "bob")[1]


@pytest.mark.parametrize("command", ["show", "enable", "disable", "remove"])
def test_unknown_or_bad_name(
    config: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, config, command, "carol")
    assert code == 1 and f"webknockctl client {command}: no client carol" in err
    code, _, err = run(capsys, config, command, "../carol")
    assert code == 2 and "client name" in err


@pytest.mark.parametrize("command", ["show", "enable", "disable"])
def test_broken_file_is_named_with_its_line(
    cfg: ServerConfig, config: Path, command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.clients_dir.mkdir()
    path = cfg.clients_dir / "bob.conf"
    path.write_text(f"key = {OTHER}\nmax_time = forever\n")
    code, _, err = run(capsys, config, command, "bob")
    assert code == 1 and f"{path}:2: max_time:" in err
    assert path.read_text() == f"key = {OTHER}\nmax_time = forever\n"


# -- disable, enable ----------------------------------------------------------------------


def test_disable_enable_round_trip_keeps_the_rest(
    cfg: ServerConfig, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.clients_dir.mkdir()
    path = cfg.clients_dir / "bob.conf"
    original = (
        "# deployed by Ansible\n"
        f"key = {OTHER} bob@phone\n"
        "ports = tcp/22   # ssh only\n"
        "Enabled = yes    # until further notice\n"
        "max_time = 60\n"
    )
    path.write_text(original)
    os.chmod(path, 0o640)
    code, out, err = run(capsys, config, "disable", "bob")
    assert code == 0 and out == "client bob disabled\n" and "revoke --client bob" in err
    assert path.read_text() == original.replace(
        "Enabled = yes    # until further notice", "enabled = no"
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640  # as it was
    clients, _ = load_clients(cfg.clients_dir)
    assert clients["bob"].enabled is False
    code, out, _ = run(capsys, config, "disable", "bob")
    assert code == 0 and out == "client bob is already disabled\n"
    code, out, _ = run(capsys, config, "enable", "bob")
    assert code == 0 and out == "client bob enabled\n"
    assert path.read_text() == original.replace(
        "Enabled = yes    # until further notice", "enabled = yes"
    )
    clients, _ = load_clients(cfg.clients_dir)
    assert clients["bob"].enabled is True
    assert sorted(os.listdir(cfg.clients_dir)) == ["bob.conf"]


def test_disable_adds_the_line_when_there_is_none(
    cfg: ServerConfig, config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg.clients_dir.mkdir()
    path = cfg.clients_dir / "bob.conf"
    path.write_text(f"key = {OTHER}\n# enabled = no   (commented out: not this line)\n")
    assert run(capsys, config, "disable", "bob")[0] == 0
    assert path.read_text() == (
        f"key = {OTHER}\n# enabled = no   (commented out: not this line)\nenabled = no\n"
    )
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


# -- remove -------------------------------------------------------------------------------


def open_grant(cfg: ServerConfig, ip: str, client: str | None, rid: str) -> None:
    req = GrantRequest(
        rid, ipaddress.ip_address(ip), (("tcp", 22), ("udp", 51820)), 600, client=client
    )
    assert ctl._engine(cfg).open([req], time.time())[rid].ok


def test_remove_revoke_closes_the_clients_grants(
    cfg: ServerConfig,
    config: Path,
    alice_key: str,
    fw: MemoryFirewall,
    capsys: pytest.CaptureFixture[str],
) -> None:
    add_alice(capsys, config, alice_key)
    assert run(capsys, config, "add", "bob", "--key", OTHER)[0] == 0
    open_grant(cfg, "192.0.2.10", "alice", "a" * 32)
    open_grant(cfg, "192.0.2.11", "bob", "b" * 32)
    open_grant(cfg, "192.0.2.12", None, "c" * 32)
    assert len(fw.held) == 6

    code, out, _ = run(capsys, config, "remove", "bob")  # the file only
    assert code == 0 and out == f"removed client bob ({cfg.clients_dir / 'bob.conf'})\n"
    assert len(fw.held) == 6

    code, out, _ = run(capsys, config, "remove", "alice", "--revoke")
    assert code == 0
    assert out.splitlines() == [
        f"removed client alice ({cfg.clients_dir / 'alice.conf'})",
        "revoked 2 live grant(s) of client alice",
        "revoked 192.0.2.10:tcp/22",
        "revoked 192.0.2.10:udp/51820",
    ]
    assert sorted(str(k.ip) for k in fw.held) == ["192.0.2.11"] * 2 + ["192.0.2.12"] * 2
    assert os.listdir(cfg.clients_dir) == []
    code, _, err = run(capsys, config, "remove", "bob", "--revoke")
    assert code == 1 and "no client bob" in err and "revoke --client bob" in err


def test_disable_revoke(
    cfg: ServerConfig,
    config: Path,
    alice_key: str,
    fw: MemoryFirewall,
    capsys: pytest.CaptureFixture[str],
) -> None:
    add_alice(capsys, config, alice_key)
    open_grant(cfg, "192.0.2.10", "alice", "a" * 32)
    code, out, _ = run(capsys, config, "disable", "alice", "--revoke")
    assert code == 0
    assert out.splitlines()[:2] == [
        "client alice disabled",
        "revoked 2 live grant(s) of client alice",
    ]
    assert fw.held == {} and (cfg.clients_dir / "alice.conf").exists()
