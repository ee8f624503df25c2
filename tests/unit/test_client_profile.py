"""Client profiles: parsing, every error naming file and key, ports, keys file mode, lookup;
v1 (keys_file) and v2 (server_key + key_file), never both."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from webknock.client.credentials import V2Keys
from webknock.client.errors import EXIT_CONFIG, ConfigError
from webknock.client.lookup import find_profile
from webknock.client.profile import format_ports, load_profile, parse_ports
from webknock.keys import format_keys
from webknock.protocol.v1 import Keys
from webknock.protocol.v2 import SigningKey


def write_profile(tmp: Path, body: str, *, keys_mode: int = 0o600, name: str = "p") -> Path:
    keys = tmp / f"{name}.keys"
    keys.write_text(format_keys(Keys.generate()))
    os.chmod(keys, keys_mode)
    path = tmp / f"{name}.ini"
    path.write_text(body)
    return path


BASE = "[client]\nurl = https://knock.example.org/webknock\nkeys_file = p.keys\n"


def test_full_profile(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    path = write_profile(
        tmp_path,
        BASE + "ports = tcp/22, UDP/51820, tcp/22\ntime = 600\nverify = ca.pem\n"
        "timeout = 2.5\nfamily = both\n",
    )
    p = load_profile(path)
    assert p.name == "p" and p.url == "https://knock.example.org/webknock"
    assert p.keys_file == tmp_path / "p.keys", "relative keys_file is beside the profile"
    assert p.ports == (("tcp", 22), ("udp", 51820))
    assert (p.time, p.verify, p.timeout, p.family) == (600, str(ca), 2.5, "both")
    assert p.keys().sign and len(p.keys().key1) == 32


def test_defaults(tmp_path: Path) -> None:
    p = load_profile(write_profile(tmp_path, BASE))
    assert (p.ports, p.time, p.verify, p.timeout, p.family) == ((), None, True, 10.0, "any")


def test_install_sh_profile_is_accepted(tmp_path: Path) -> None:
    """The exact layout PY_CLIENT_PROFILE in install.sh writes (absolute keys path, comments)."""
    keys = tmp_path / "lab.keys"
    keys.write_text(format_keys(Keys.generate()))
    os.chmod(keys, 0o600)
    path = tmp_path / "lab.ini"
    path.write_text(
        "# webknock client profile lab, written by install.sh client.\n"
        "# Use: webknock --profile lab knock|keep|exec -- CMD|info (see webknock --help)\n"
        f"[client]\nurl = http://192.0.2.1/webknock\nkeys_file = {keys}\n"
        "ports = tcp/22, tcp/2222, udp/51820\ntime = 3600\n"
        "# verify = yes       # check the server certificate (https)\n"
        "# timeout = 10       # seconds per request\n"
        "# family = ...       # address family to knock from: see webknock --help\n"
    )
    p = load_profile(path)
    assert p.ports == (("tcp", 22), ("tcp", 2222), ("udp", 51820)) and p.time == 3600
    assert p.keys_file == keys


def test_profile_blob_with_inline_keys(tmp_path: Path) -> None:
    """The blob install.sh server prints works as a profile: keys in its own [v1]."""
    path = tmp_path / "blob.ini"
    path.write_text(
        "[client]\nurl = http://192.0.2.1/webknock\nports = tcp/22\n" + format_keys(Keys.generate())
    )
    os.chmod(path, 0o600)
    p = load_profile(path)
    assert p.keys_file == path and len(p.keys().iv1) == 16
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="readable by everyone"):
        load_profile(path).keys()


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ("[other]\n", r"p\.ini: missing section \[client\]"),
        ("[client\n", r"p\.ini: not a valid INI file"),
        ("[client]\nkeys_file = p.keys\n", r"p\.ini: \[client\] url: missing"),
        (BASE.replace("https://", "ftp://"), r"\[client\] url: .*http:// or https://"),
        (BASE.replace("knock.example.org", ""), r"\[client\] url: .*has no host"),
        (BASE.replace("example.org", "example.org:99999"), r"\[client\] url: .*bad port"),
        ("[client]\nurl = http://h/\n", r"\[client\] keys_file: missing"),
        (BASE + "ports = tcp/22, ssh\n", r"\[client\] ports: 'ssh' is not tcp/N"),
        (BASE + "ports = tcp/0\n", r"\[client\] ports: 'tcp/0'"),
        (BASE + "ports = udp/65536\n", r"\[client\] ports: 'udp/65536'"),
        (BASE + "time = soon\n", r"\[client\] time: 'soon' is not a number"),
        (BASE + "time = 0\n", r"\[client\] time: '0' is out of range"),
        (BASE + "time = 999999\n", r"\[client\] time: '999999' is out of range"),
        (BASE + "timeout = -1\n", r"\[client\] timeout: '-1' is out of range"),
        (BASE + "verify = /nonexistent/ca.pem\n", r"\[client\] verify: .*neither yes/no"),
        (BASE + "family = inet\n", r"\[client\] family: 'inet' is not one of"),
        (BASE + "famly = ipv4\n", r"\[client\] famly: unknown key"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, body: str, expected: str) -> None:
    path = write_profile(tmp_path, body)
    with pytest.raises(ConfigError, match=expected) as info:
        load_profile(path)
    assert str(path) in info.value.message
    assert info.value.code == EXIT_CONFIG


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.ini: cannot read"):
        load_profile(tmp_path / "nope.ini")


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_keys_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    p = load_profile(write_profile(tmp_path, BASE, keys_mode=mode))
    with pytest.raises(ConfigError, match=r"p\.ini: \[client\] keys_file: .*p\.keys") as info:
        p.keys()
    assert "chmod o-rwx" in info.value.message


def test_keys_group_readable_is_fine(tmp_path: Path) -> None:
    assert load_profile(write_profile(tmp_path, BASE, keys_mode=0o640)).keys()


def test_bad_keys_file(tmp_path: Path) -> None:
    path = write_profile(tmp_path, BASE)
    (tmp_path / "p.keys").write_text("[v1]\nkey1 = 00\n")
    with pytest.raises(ConfigError, match=r"keys_file: .*key1 must be 64 hex"):
        load_profile(path).keys()
    (tmp_path / "p.keys").unlink()
    with pytest.raises(ConfigError, match=r"keys_file: .*cannot read"):
        load_profile(path).keys()


def test_parse_ports() -> None:
    assert parse_ports("") == ()
    assert parse_ports(" tcp/22 ,udp/51820,, ") == (("tcp", 22), ("udp", 51820))
    assert format_ports(parse_ports("tcp/22, udp/1")) == "tcp/22, udp/1"
    for bad in ("22", "tcp:22", "sctp/1", "tcp/-1", "tcp/123456"):
        with pytest.raises(ValueError, match="is not tcp/N"):
            parse_ports(bad)


def test_find_profile_user_then_system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import webknock.client.lookup as lookup_mod

    system = tmp_path / "system"
    system.mkdir()
    monkeypatch.setattr(lookup_mod, "SYSTEM_DIR", system)
    env = {"HOME": str(tmp_path / "home")}
    (system / "office.ini").write_text(BASE)
    assert find_profile("office", env) == system / "office.ini"
    user = tmp_path / "home" / ".config" / "webknock"
    user.mkdir(parents=True)
    (user / "office.ini").write_text(BASE)
    assert find_profile("office", env) == user / "office.ini"
    xdg = {"XDG_CONFIG_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path / "home")}
    assert find_profile("office", xdg) == system / "office.ini"
    with pytest.raises(ConfigError, match=r"profile 'lab' not found .*lab\.ini"):
        find_profile("lab", env)
    with pytest.raises(ConfigError, match="use letters, digits"):
        find_profile("../etc/passwd", env)


# -- protocol v2: server_key + key_file ---------------------------------------------------

V2_BASE = "[client]\nurl = https://knock.example.org/webknock\n"


def v2_profile(
    tmp: Path, server: SigningKey, extra: str = "", *, key_mode: int = 0o600, key: str = "p.key"
) -> Path:
    """A v2 profile with a fresh client key in `key` (relative to tmp) and `server` pinned."""
    key_path = tmp / key
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_text(SigningKey.generate().to_pem())
    os.chmod(key_path, key_mode)
    path = tmp / "p.ini"
    path.write_text(
        V2_BASE + f"server_key = {server.public_text('srv@example')}\nkey_file = {key}\n{extra}"
    )
    return path


def test_v2_profile(tmp_path: Path) -> None:
    server = SigningKey.generate()
    p = load_profile(v2_profile(tmp_path, server, "ports = tcp/22\n", key="sub/p.key"))
    assert p.protocol == "v2" and p.keys_file is None
    assert p.key_file == tmp_path / "sub" / "p.key", "relative key_file is beside the profile"
    assert p.server_key == server.public and p.ports == (("tcp", 22),)
    creds = p.credentials()
    assert isinstance(creds, V2Keys) and creds.server == server.public
    assert creds.server_kid == server.kid
    assert (
        creds.client.public == SigningKey.from_pem((tmp_path / "sub" / "p.key").read_text()).public
    )
    with pytest.raises(ConfigError, match=r"keys_file: missing \(this is a v2 profile\)"):
        p.keys()


def test_v2_profile_absolute_key_file_and_bare_server_key(tmp_path: Path) -> None:
    server = SigningKey.generate()
    key = tmp_path / "elsewhere.pem"
    key.write_text(SigningKey.generate().to_pem())
    os.chmod(key, 0o600)
    path = tmp_path / "p.ini"
    path.write_text(V2_BASE + f"server_key = {server.public_text()}\nkey_file = {key}\n")
    p = load_profile(path)
    assert p.key_file == key and isinstance(p.credentials(), V2Keys)


def test_v1_profile_credentials_are_the_keys(tmp_path: Path) -> None:
    p = load_profile(write_profile(tmp_path, BASE))
    assert p.protocol == "v1" and isinstance(p.credentials(), Keys)
    with pytest.raises(ConfigError, match=r"key_file: missing \(this is a v1 profile\)"):
        p.signing_key()


SERVER_TEXT = "wk2:Kay64UG8yvCyLhqU000LxzYeUm0L_hLIl5S8kyKWbdc"


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            BASE + f"server_key = {SERVER_TEXT}\nkey_file = p.key\n",
            r"\[client\] server_key: this profile also has keys_file \(protocol v1\).*not both",
        ),
        (BASE + "key_file = p.key\n", r"\[client\] key_file: this profile also has keys_file"),
        (
            V2_BASE + f"server_key = {SERVER_TEXT}\nkey_file = p.key\n[v1]\nkey1 = 00\n",
            r"\[client\] server_key: this profile also has a \[v1\] section",
        ),
        (V2_BASE, r"\[client\] keys_file: missing \(protocol v1: .* v2: server_key"),
        (V2_BASE + f"server_key = {SERVER_TEXT}\n", r"\[client\] key_file: missing .*keygen"),
        (V2_BASE + "key_file = p.key\n", r"\[client\] server_key: missing \(the server's public"),
        (
            V2_BASE + "server_key = wk1:abc\nkey_file = k\n",
            r"server_key: 'wk1:abc' is not a v2 .*wk2:",
        ),
        (V2_BASE + "server_key = wk2:a+b/\nkey_file = k\n", r"server_key: .*not base64url"),
        (V2_BASE + "server_key = wk2:AAAA\nkey_file = k\n", r"server_key: .*32 bytes, this one 3"),
        (
            V2_BASE + f"server_key = {SERVER_TEXT[:-3]}AAA\nkey_file = k\n",
            r"server_key: .*(not a point|32 bytes)",
        ),
    ],
)
def test_v2_errors_name_file_and_key(tmp_path: Path, body: str, expected: str) -> None:
    path = write_profile(tmp_path, body)
    with pytest.raises(ConfigError, match=expected) as info:
        load_profile(path)
    assert str(path) in info.value.message and info.value.code == EXIT_CONFIG


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o602])
def test_v2_key_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    p = load_profile(v2_profile(tmp_path, SigningKey.generate(), key_mode=mode))
    with pytest.raises(ConfigError, match=r"p\.ini: \[client\] key_file: .*p\.key: readable by"):
        p.credentials()
    with pytest.raises(ConfigError, match="chmod o-rwx"):
        p.signing_key()


def test_v2_key_group_readable_is_fine(tmp_path: Path) -> None:
    assert load_profile(v2_profile(tmp_path, SigningKey.generate(), key_mode=0o640)).signing_key()


def test_v2_bad_or_missing_key_file(tmp_path: Path) -> None:
    path = v2_profile(tmp_path, SigningKey.generate())
    key = tmp_path / "p.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match=r"key_file: .*p\.key: not a PKCS#8 PEM Ed25519"):
        load_profile(path).credentials()
    key.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"key_file: .*not a PEM text file"):
        load_profile(path).credentials()
    key.unlink()
    with pytest.raises(ConfigError, match=r"key_file: .*cannot read.*keygen") as info:
        load_profile(path).credentials()
    assert f"webknock --config {path} keygen" in info.value.message
    key.mkdir()
    with pytest.raises(ConfigError, match=r"key_file: .*(not a regular file|cannot read)"):
        load_profile(path).credentials()
