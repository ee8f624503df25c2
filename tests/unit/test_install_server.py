"""webknock.install: `install.sh server` on a root prefix, with a fake machine.

Every file and folder the installer writes is checked for owner and mode; a re-run
changes nothing and prints no key; differing options are reported, not applied; --v1
adds v1 to an instance without it; an admin's tighter modes stay.
"""

from __future__ import annotations

import grp
import io
import os
import pwd
import stat
from pathlib import Path

import pytest

from tests.unit.fixtures.install.fakehost import REPO, err, fake_host, out, runner
from webknock.config import load
from webknock.install.cli import main
from webknock.install.host import Host
from webknock.install.paths import untrusted_dirs
from webknock.keys import load_keys, load_server_key
from webknock.spool.mount import layout

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer chowns (root)")

WWW = pwd.getpwnam("www-data")
ADM = grp.getgrnam("adm").gr_gid if "adm" in {g.gr_name for g in grp.getgrall()} else 0


def server(root: Path, *extra: str, host: Host | None = None) -> tuple[int, Host]:
    host = host or fake_host()
    argv = ["server", "--root", str(root), "--yes", "--tcp-ports", "22,2222", "--udp-ports"]
    argv += ["51820", "--max-time", "600", "--url", "https://knock.example.org/webknock"]
    argv += ["--web-server", "nginx", "--cgi-dir", "/usr/lib/cgi-bin", *extra]
    return main(argv, host), host


def tree(root: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Every path below `root`: (mode, uid, gid, content or link target)."""
    found = {}
    for path in sorted(root.rglob("*")):
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            data = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            data = os.readlink(path).encode()
        else:
            data = b""
        found[str(path.relative_to(root))] = (st.st_mode, st.st_uid, st.st_gid, data)
    return found


#: (mode, uid, gid) of everything the installer writes below the root (the fake venv's
#: inside is the fake's; spool entries come from webknock.spool.mount.layout).
EXPECTED = {
    "etc": (0o755, 0, 0),
    "etc/webknock": (0o755, 0, 0),
    "etc/webknock/webknock.ini": (0o644, 0, 0),
    "etc/webknock/webknock.keys": (0o600, 0, 0),
    "etc/webknock/webknock.server-key": (0o600, 0, 0),
    "etc/webknock/nginx-webknock.conf": (0o644, 0, 0),
    "etc/cron.d": (0o755, 0, 0),
    "etc/cron.d/webknock": (0o644, 0, 0),
    "etc/logrotate.d": (0o755, 0, 0),
    "etc/logrotate.d/webknock": (0o644, 0, 0),
    "etc/systemd": (0o755, 0, 0),
    "etc/systemd/system": (0o755, 0, 0),
    "etc/systemd/system/webknockd@.service": (0o644, 0, 0),
    "opt": (0o755, 0, 0),
    "opt/webknock": (0o755, 0, 0),
    "opt/webknock/venv": (0o755, 0, 0),
    "opt/webknock/cgi-bin": (0o755, 0, 0),
    "opt/webknock/cgi-bin/webknock.cgi": (0o755, 0, 0),
    "opt/webknock/share": (0o755, 0, 0),
    "opt/webknock/share/webknock.ini.example": (0o644, 0, 0),
    "opt/webknock/share/nginx-webknock.conf": (0o644, 0, 0),
    "opt/webknock/share/apache-webknock.conf": (0o644, 0, 0),
    "opt/webknock/instances": (0o755, 0, 0),
    "opt/webknock/instances/webknock": (0o644, 0, 0),
    "usr": (0o755, 0, 0),
    "usr/lib": (0o755, 0, 0),
    "usr/lib/cgi-bin": (0o755, 0, 0),
    "usr/lib/cgi-bin/webknock.cgi": (0o755, 0, 0),
    "usr/local": (0o755, 0, 0),
    "usr/local/sbin": (0o755, 0, 0),
    "usr/local/sbin/webknockd": (0o755, 0, 0),
    "usr/local/sbin/webknockctl": (0o755, 0, 0),
    "var": (0o755, 0, 0),
    "var/lib": (0o755, 0, 0),
    "var/lib/webknock": (0o700, 0, 0),
    "var/log": (0o755, 0, 0),
    "var/log/webknock": (0o750, 0, ADM),
    "run": (0o755, 0, 0),
    "run/webknock": (0o755, 0, 0),
}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


def test_first_install_writes_every_file_with_its_owner_and_mode(root: Path) -> None:
    code, host = server(root, "--v1")
    assert code == 0, err(host)
    found = tree(root)
    spool = {
        str(p.relative_to(root)): (mode, uid, gid)
        for p, uid, gid, mode in layout(load(root / "etc/webknock/webknock.ini").spool, WWW.pw_gid)
    }
    for rel, (mode, uid, gid, _data) in found.items():
        if rel.startswith("opt/webknock/venv/"):
            continue  # the fake venv's inside
        want = EXPECTED.get(rel) or spool.get(rel)
        assert want is not None, f"the installer wrote {rel}, which no test expects"
        assert (stat.S_IMODE(mode), uid, gid) == want, rel
        assert not mode & stat.S_IWOTH, rel
    assert set(EXPECTED) | set(spool) <= set(found)


def test_first_install_content(root: Path) -> None:
    code, host = server(root, "--v1")
    assert code == 0, err(host)
    cfg = load(root / "etc/webknock/webknock.ini")
    assert (cfg.instance, cfg.tcp_ports, cfg.udp_ports, cfg.max_time) == (
        "webknock", frozenset({22, 2222}), frozenset({51820}), 600,
    )  # fmt: skip
    assert cfg.keys_file == root / "etc/webknock/webknock.keys"
    assert cfg.spool_dir == root / "run/webknock/webknock"
    assert cfg.state_file == root / "var/lib/webknock/webknock.db"
    assert cfg.audit_log == root / "var/log/webknock/webknock.jsonl", "the audit trail"
    assert (cfg.url, cfg.backend, cfg.web_user, cfg.protect) == (
        "https://knock.example.org/webknock", "auto", "www-data", False,
    )  # fmt: skip
    python = root / "opt/webknock/venv/bin/python3"
    assert (root / "opt/webknock/cgi-bin/webknock.cgi").read_text().startswith(f"#!{python} -IS\n")
    assert (root / "usr/local/sbin/webknockd").read_text().startswith(f"#!{python}\n")
    copy = (root / "usr/lib/cgi-bin/webknock.cgi").read_text()
    assert f'os.environ.setdefault("WEBKNOCK_CONFIG", "{cfg.source}")' in copy
    unit = (root / "etc/systemd/system/webknockd@.service").read_text()
    assert unit.replace(str(root), "") == (REPO / "etc/systemd/webknockd@.service").read_text()
    snippet = (root / "etc/webknock/nginx-webknock.conf").read_text()
    assert f"fastcgi_param SCRIPT_FILENAME {root}/opt/webknock/cgi-bin/webknock.cgi;" in snippet
    assert f"fastcgi_param WEBKNOCK_CONFIG {cfg.source};" in snippet
    sbin = root / "usr/local/sbin"
    jobs = [ln for ln in (root / "etc/cron.d/webknock").read_text().splitlines() if ln[:1] == "*"]
    assert jobs == [
        f"* * * * * root test -x {sbin}/webknockctl && {sbin}/webknockctl --config {cfg.source} reap -q"
    ]
    manifest = (root / "opt/webknock/instances/webknock").read_text().splitlines()
    assert f"snippet={root}/etc/webknock/nginx-webknock.conf" in manifest
    assert f"cgi_copy={root}/usr/lib/cgi-bin/webknock.cgi" in manifest
    text = out(host)
    keys = load_keys(cfg.keys_file)
    assert all(value in text for value in keys.to_hex().values()), "the v1 profile is printed"
    public = load_server_key(cfg.server_key_file).public_text()
    assert f"v2 server key: new (public {public})" in text
    assert "--root: nothing started, firewall untouched" in text
    # pip installed this tree with the server extra; nothing was started or mounted
    pip = [c for c in runner(host).calls if c[1:5] == ["-I", "-m", "pip", "install"]]
    assert len(pip) == 1 and pip[0][-1].endswith("/build/webknock[server]")
    venv = root / "opt/webknock/venv"
    compiled = [str(venv / "bin/python3"), "-I", "-m", "compileall", "-q", "-j", "0"]
    assert [*compiled, f"{venv}/lib"] in runner(host).calls, "the web user cannot compile"
    assert not runner(host).commands("systemctl") and not runner(host).commands("apt-get")
    assert not runner(host).commands("setpriv")


def test_rerun_changes_nothing_and_prints_no_key(root: Path) -> None:
    code, host = server(root)
    assert code == 0, err(host)
    before = tree(root)
    cfg = load(root / "etc/webknock/webknock.ini")
    pem = cfg.server_key_file.read_text()
    code, again = server(root)
    assert code == 0, err(again)
    after = tree(root)
    assert after == before, sorted(k for k in after if after.get(k) != before.get(k))
    text = out(again) + err(again)
    assert "v2 server key: kept" in text and "webknock.ini: kept" in text
    assert "protocol v1: off" in text and "BEGIN WEBKNOCK CLIENT PROFILE" not in text
    body = "".join(pem.splitlines()[1:-1])
    assert body[:20] not in text and "PRIVATE KEY" not in text
    assert not (root / "etc/webknock/webknock.keys").exists()


def test_rerun_reports_differing_options_and_keeps_an_admins_modes(root: Path) -> None:
    assert server(root, "--v1")[0] == 0
    config = root / "etc/webknock/webknock.ini"
    keys = root / "etc/webknock/webknock.keys"
    config.chmod(0o600)
    keys.chmod(0o400)
    before = config.read_bytes()
    code, host = server(root, "--max-time", "900", "--backend", "nftables")
    assert code == 0, err(host)
    assert config.read_bytes() == before
    assert stat.S_IMODE(config.stat().st_mode) == 0o600, "never loosened"
    assert stat.S_IMODE(keys.stat().st_mode) == 0o400, "never loosened"
    assert f"{keys}: kept (owner root:root, mode 400)" in out(host)
    assert "its max_time is '600', not '900' from --max-time" in err(host)
    assert "its backend is 'auto', not 'nftables' from --backend" in err(host)


def test_rerun_tightens_keys_the_web_group_could_read(root: Path) -> None:
    assert server(root, "--v1")[0] == 0
    keys = root / "etc/webknock/webknock.keys"
    os.chown(keys, 0, WWW.pw_gid)
    keys.chmod(0o640)
    data = keys.read_bytes()
    code, host = server(root)
    assert code == 0, err(host)
    st = keys.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    assert keys.read_bytes() == data
    assert "kept, tightened from 640 root:www-data to 600 root:root" in out(host)


def test_v1_added_to_an_instance_without_it(root: Path) -> None:
    assert server(root)[0] == 0
    config = root / "etc/webknock/webknock.ini"
    lines = config.read_text().splitlines()
    code, host = server(root, "--v1")
    assert code == 0, err(host)
    after = config.read_text().splitlines()
    at = lines.index("[server]") + 1
    keys = root / "etc/webknock/webknock.keys"
    assert after == [*lines[:at], after[at], f"keys_file = {keys}", *lines[at:]]
    assert load(config).keys_file == keys and load_keys(keys)
    assert "kept, keys_file added (--v1)" in out(host)


def test_second_instance_with_apache(root: Path) -> None:
    assert server(root)[0] == 0
    host = fake_host()
    argv = ["server", "--root", str(root), "--yes", "--instance", "office", "--tcp-ports"]
    argv += ["2222", "--web-server", "apache", "--protect", "yes"]
    assert main(argv, host) == 0, err(host)
    cfg = load(root / "etc/webknock/office.ini")
    assert (cfg.chain, cfg.protect) == ("WK-office", True)
    assert cfg.url == "https://knock.example.org/webknock-office", "the default URL"
    snippet = (root / "etc/webknock/apache-office.conf").read_text()
    assert "ScriptAlias /webknock-office " in snippet and "<Location /webknock-office>" in snippet
    assert f"SetEnv WEBKNOCK_CONFIG {cfg.source}" in snippet
    jobs = [ln for ln in (root / "etc/cron.d/webknock").read_text().splitlines() if ln[:1] == "*"]
    assert [j.split(" --config ")[1] for j in jobs] == [
        f"{root}/etc/webknock/webknock.ini reap -q",
        f"{cfg.source} reap -q",
    ]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--tcp-ports", "22,70000"], "--tcp-ports: 70000"),
        (["--max-time", "0"], "--max-time"),
        (["--instance", "bad name"], "--instance"),
        (["--backend", "pf"], "--backend"),
        (["--url", "ftp://x"], "--url"),
        (["--web-user", "no-such-user-here"], "--web-user"),
        (["--bogus"], "unknown option --bogus"),
        (["--instance"], "--instance"),
    ],
)
def test_usage_errors_install_nothing(root: Path, args: list[str], needle: str) -> None:
    host = fake_host()
    assert main(["server", "--root", str(root), "--yes", *args], host) == 2
    assert needle in err(host) and "(see install.sh --help)" in err(host)
    assert not any(root.iterdir())
    assert runner(host).calls == []


def test_help_and_exit_codes() -> None:
    for command in ([], ["server"], ["client"], ["profile"], ["uninstall"]):
        host = fake_host()
        assert main([*command, "--help"], host) == 0
        assert out(host).startswith("Usage: install.sh")
    host = fake_host()
    assert main([], host) == 2 and err(host).startswith("Usage: install.sh")
    host = fake_host()
    assert main(["frobnicate"], host) == 2 and "unknown command frobnicate" in err(host)


def test_profile_prints_the_v1_blob_again(root: Path) -> None:
    assert server(root, "--v1")[0] == 0
    host = fake_host()
    assert main(["profile", "--root", str(root)], host) == 0, err(host)
    keys = load_keys(root / "etc/webknock/webknock.keys")
    assert "url = https://knock.example.org/webknock" in out(host)
    assert f"key1 = {keys.to_hex()['key1']}" in out(host)
    host = fake_host()
    assert main(["profile", "--root", str(root), "--instance", "none"], host) == 1
    assert "instance none is not installed" in err(host)


class Terminal(io.StringIO):
    """Answers typed on a terminal."""

    def isatty(self) -> bool:
        return True


def test_on_a_terminal_it_asks_for_what_no_option_gave(root: Path) -> None:
    host = fake_host()
    host.stdin = Terminal("2222\n-\n900\nyes\nnone\n\n")
    assert main(["server", "--root", str(root)], host) == 0, err(host)
    cfg = load(root / "etc/webknock/webknock.ini")
    assert (cfg.tcp_ports, cfg.udp_ports, cfg.max_time, cfg.protect) == (
        frozenset({2222}), frozenset(), 900, True,
    )  # fmt: skip
    assert cfg.url == "https://knock.example.org/webknock", "Enter keeps the default"
    assert "Knock URL clients use [https://knock.example.org/webknock]: " in out(host)
    assert not (root / "etc/webknock/nginx-webknock.conf").exists(), "web server none"
    # a re-run asks for nothing: the config holds the ports, the manifest URL and web server
    again = fake_host()
    again.stdin = Terminal("")
    assert main(["server", "--root", str(root)], again) == 0, err(again)
    assert "]: " not in out(again), "nothing asked"


@pytest.mark.parametrize("case", ["foreign owner", "world writable", "group writable root"])
def test_a_tree_others_can_write_to_is_refused(tmp_path: Path, case: str) -> None:
    """Root writes below --root: a folder someone else can change could hold a link that
    leads the installer's writes outside the tree (into /etc/cron.d, say)."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    if case == "foreign owner":
        os.chown(root / "etc", 65534, 65534)
    elif case == "world writable":
        (root / "etc").chmod(0o777)
    else:
        root.chmod(0o775)
    host = fake_host()
    assert main(["server", "--root", str(root), "-y"], host) == 1
    assert "can be changed by others than root" in err(host)
    assert sorted(p.name for p in root.rglob("*")) == ["etc"], "nothing written"


def test_a_sticky_folder_inside_the_tree_is_not_looked_into(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "tmp" / "someone").mkdir(parents=True)
    (root / "tmp").chmod(0o1777)
    os.chown(root / "tmp" / "someone", 65534, 65534)
    (root / "lib64").symlink_to("lib")  # as in every venv
    assert untrusted_dirs(root, 0) == []
    assert untrusted_dirs(root / "tmp", 0)[0] == root / "tmp", "as the tree itself: refused"


def test_a_rerun_brings_the_cgi_copies_of_earlier_runs_up_to_date(tmp_path: Path) -> None:
    """A copy made with --cgi-dir by an earlier run (which the re-run is not told about)
    still gets the new entry point: an old one would import what an upgrade moved."""
    root = tmp_path / "root"
    code, host = server(root)
    assert code == 0, err(host)
    copy = root / "usr/lib/cgi-bin/webknock.cgi"
    fresh = copy.read_text()
    copy.write_text(fresh.replace("from webknock.cgi.relay import main", "from old import main"))
    again = fake_host()
    assert main(["server", "--root", str(root), "--yes"], again) == 0, err(again)
    assert copy.read_text() == fresh


def test_v1_keys_are_printed_when_made_or_asked_for_only(tmp_path: Path) -> None:
    root = tmp_path / "root"
    code, first = server(root, "--v1")
    assert code == 0, err(first)
    keys = load_keys(root / "etc/webknock/webknock.keys").to_hex()
    assert keys["key1"] in out(first), "made now: the v1 profile with its keys"
    code, again = server(root)
    assert code == 0, err(again)
    assert keys["key1"] not in out(again) and "BEGIN WEBKNOCK" not in out(again)
    assert f"`install.sh profile --root {root}` prints it" in out(again)
    code, asked = server(root, "--v1")
    assert code == 0 and keys["key1"] in out(asked), "--v1: asked for"
