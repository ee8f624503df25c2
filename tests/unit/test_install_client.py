"""webknock.install: `install.sh client` and `uninstall --client` on a root prefix (root's
install) and in a home folder (a user's), with a fake machine; `webknock keygen` and
`pubkey` run for real."""

from __future__ import annotations

import io
import os
import stat
from pathlib import Path

import pytest

from tests.unit.fixtures.install.fakehost import err, fake_host, out, runner
from webknock.client.profile import load_profile
from webknock.install.cli import main
from webknock.install.host import Host
from webknock.keys import format_keys, load_keys
from webknock.protocol import v2
from webknock.protocol.v1 import Keys

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer chowns (root)")

URL = "https://knock.example.org/webknock"
SERVER_KEY = v2.SigningKey.generate().public_text()


def v2_profile(kid: str = "", client: str = "alice") -> str:
    enrolled = f"# webknock profile: client {client} of instance webknock (key id {kid})\n"
    body = f"[client]\nurl = {URL}\nserver_key = {SERVER_KEY}\nports = tcp/22\n"
    return (enrolled if kid else "") + body


def v1_blob(keys: Keys) -> str:
    body = format_keys(keys).split("[v1]\n", 1)[1]
    return (
        "-----BEGIN WEBKNOCK CLIENT PROFILE-----\n"
        f"[client]\nurl = {URL}\nports = tcp/22, udp/51820\ntime = 600\n[v1]\n{body}"
        "-----END WEBKNOCK CLIENT PROFILE-----\n"
    )


def client(root: Path, *args: str, stdin: str = "") -> tuple[int, Host]:
    host = fake_host(stdin=stdin)
    return main(["client", "--root", str(root), *args], host), host


def mode(path: Path) -> tuple[int, int, int]:
    st = os.lstat(path)
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def public_key(text: str) -> str:
    lines = text.splitlines()
    return lines[lines.index("This client's public key:") + 1].strip()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def test_keygen_first_then_the_enrolled_profile(root: Path) -> None:
    conf = root / "etc/webknock/client.d"
    code, first = client(root, "--profile", "lab", "--keygen-only")
    assert code == 0, err(first)
    key = conf / "lab.key"
    assert mode(key) == (0o600, 0, 0)
    assert mode(conf) == (0o755, 0, 0)
    assert not (conf / "lab.ini").exists()
    pub = public_key(out(first))
    assert "webknockctl client add " in out(first) and f"--key '{pub}'" in out(first)
    shim = root / "usr/local/bin/webknock"
    assert mode(shim) == (0o755, 0, 0)
    assert shim.read_text().startswith(f"#!{root}/opt/webknock-client/venv/bin/python3\n")
    pip = [c for c in runner(first).calls if c[1:5] == ["-I", "-m", "pip", "install"]]
    assert pip[0][-1].endswith("[client]")

    kid = v2.key_id(v2.parse_public_key(pub)[0]).hex()
    profile = v2_profile(kid)
    code, second = client(root, "--profile", "lab", "--from", "-", "--no-venv", stdin=profile)
    assert code == 0, err(second)
    text = out(second)
    assert public_key(text) == pub and "(0600, kept: it existed)" in text
    assert "enrolled this very key (client alice of instance webknock" in text
    assert "webknockctl client add" not in text, "nothing to send"
    ini = conf / "lab.ini"
    assert mode(ini) == (0o644, 0, 0)
    loaded = load_profile(ini)
    assert (loaded.protocol, loaded.key_file, loaded.url) == ("v2", key, URL)
    listed = (conf / ".install.sh-profiles").read_text().splitlines()
    assert listed == [f"key={key}", f"profile={ini}"]
    assert mode(conf / ".install.sh-profiles") == (0o644, 0, 0)

    # the same profile again: the same files, the key kept, no new one
    before = {p: p.read_bytes() for p in (ini, key)}
    code, third = client(root, "--profile", "lab", "--from", "-", "--no-venv", stdin=profile)
    assert code == 0, err(third)
    assert {p: p.read_bytes() for p in (ini, key)} == before
    assert "PRIVATE" not in out(third)

    cache = root / "var/cache/webknock"  # what `webknock --profile lab knock` leaves as root
    cache.mkdir(parents=True)
    (cache / "lab-1a2b3c4d.ipv4.json").write_text("{}")
    gone = fake_host()
    assert main(["uninstall", "--client", "--purge", "--root", str(root)], gone) == 0
    assert not any(p for p in root.rglob("*") if not p.is_dir()), list(root.rglob("*"))
    assert not (root / "opt/webknock-client").exists() and not conf.exists()
    assert not cache.exists()


def test_purge_keeps_what_is_not_a_cache_entry(root: Path) -> None:
    code, host = client(root, "--profile", "lab", "--keygen-only")
    assert code == 0, err(host)
    cache = root / "var/cache/webknock"
    cache.mkdir(parents=True)
    (cache / "lab-1a2b3c4d.any.json").write_text("{}")
    (cache / "notes.txt").write_text("the admin's")
    assert main(["uninstall", "--client", "--purge", "--root", str(root)], fake_host()) == 0
    assert sorted(p.name for p in cache.iterdir()) == ["notes.txt"]


def test_a_profile_for_another_key_says_what_to_send(root: Path) -> None:
    code, host = client(root, "--profile", "lab", "--from", "-", stdin=v2_profile("0" * 16, "bob"))
    assert code == 0, err(host)
    pub = public_key(out(host))
    assert "The profile is for another key (client bob, key id 0000000000000000)" in out(host)
    assert f"webknockctl client remove bob && webknockctl client add bob --key '{pub}'" in out(host)


def test_v1_blob(root: Path) -> None:
    keys = Keys.generate()
    code, host = client(root, "--profile", "old", "--from", "-", stdin="noise\n" + v1_blob(keys))
    assert code == 0, err(host)
    conf = root / "etc/webknock/client.d"
    assert mode(conf / "old.keys") == (0o600, 0, 0)
    assert load_keys(conf / "old.keys").to_hex() == keys.to_hex()
    loaded = load_profile(conf / "old.ini")
    assert (loaded.protocol, loaded.url, loaded.time) == ("v1", URL, 600)
    assert not (conf / "old.key").exists(), "no v2 key for a v1 profile"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (v2_profile() + "keys_file = /x.keys\n", "both v1 keys"),
        (f"[client]\nurl = {URL}\nports = tcp/22\n", "neither the [v1] keys"),
        ("   \n", "no profile given: the input was empty"),
        (v2_profile().replace(f"url = {URL}\n", ""), "--url https://HOST/PATH"),
    ],
    ids=["both", "neither", "empty", "no-url"],
)
def test_refused_profiles_build_nothing(root: Path, text: str, needle: str) -> None:
    code, host = client(root, "--profile", "bad", "--from", "-", stdin=text)
    assert code == 2 and needle in err(host), err(host)
    assert not any(root.iterdir()), "refused before building anything"
    assert runner(host).calls == []


def test_a_profile_the_client_refuses_is_not_written(root: Path) -> None:
    assert client(root, "--profile", "lab", "--keygen-only")[0] == 0
    bad = v2_profile().replace("ports = tcp/22", "ports = tcp/99999")
    code, host = client(root, "--profile", "x", "--from", "-", "--no-venv", stdin=bad)
    assert code == 1 and "profile blob" in err(host), err(host)
    assert not (root / "etc/webknock/client.d/x.ini").exists()


def test_no_venv_without_an_installed_client(root: Path) -> None:
    code, host = client(root, "--profile", "lab", "--no-venv", "--from", "-", stdin=v2_profile())
    assert code == 1 and "the client is not installed" in err(host)


def test_a_users_install_goes_to_its_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    xdg = tmp_path / "xdg"
    env = {"HOME": str(home), "XDG_CONFIG_HOME": str(xdg), "PATH": "/usr/bin"}
    host = fake_host(stdin=v2_profile(), environ=env)
    host.uid = 1000
    assert main(["client", "--profile", "me", "--from", "-"], host) == 0, err(host)
    conf = xdg / "webknock"
    assert stat.S_IMODE(conf.stat().st_mode) == 0o700
    assert stat.S_IMODE((conf / "me.ini").stat().st_mode) == 0o600
    assert (home / ".local/bin/webknock").is_file()
    assert (home / ".local/share/webknock-client/venv").is_dir()
    assert f"(add {home}/.local/bin to your PATH)" in out(host)
    assert not runner(host).commands("apt-get") and not runner(host).commands("dpkg-query")
    host = fake_host(environ=env)
    host.uid = 1000
    assert main(["client", "--root", str(tmp_path / "r")], host) == 2
    assert "--root needs root" in err(host)


class Terminal(io.StringIO):
    """A profile pasted on a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_pasted_profile_ends_after_its_last_line(root: Path) -> None:
    host = fake_host()
    host.stdin = Terminal(v2_profile() + "this line is never read\n")
    assert main(["client", "--root", str(root), "--profile", "lab"], host) == 0, err(host)
    assert "Paste the client profile" in out(host) and "(profile read)" in out(host)
    assert load_profile(root / "etc/webknock/client.d/lab.ini").url == URL
    assert host.stdin.read() == "this line is never read\n"
