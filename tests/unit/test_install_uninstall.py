"""webknock.install: `install.sh uninstall` on a root prefix, with a fake machine.

A snippet the web server still includes stays (the line to remove is named) with its
record, and goes on the next run once the include is gone; without --purge keys, config
and server key stay; with it nothing does; one instance of two leaves the shared parts.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.unit.fixtures.install.fakehost import FIXTURES, err, fake_host, out, runner
from webknock.install.cli import main
from webknock.install.host import Host

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer chowns (root)")


def run(*argv: str) -> tuple[int, Host]:
    host = fake_host()
    return main(list(argv), host), host


def files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    code, host = run(
        "server", "--root", str(root), "--yes", "--v1", "--web-server", "nginx",
        "--cgi-dir", "/usr/lib/cgi-bin", "--url", "https://knock.example.org/webknock",
    )  # fmt: skip
    assert code == 0, err(host)
    return root


def test_a_snippet_the_web_server_includes_stays_until_the_include_is_gone(root: Path) -> None:
    shutil.copytree(FIXTURES / "etc/nginx", root / "etc/nginx")
    site = root / "etc/nginx/sites-enabled/knock"
    snippet = root / "etc/webknock/nginx-webknock.conf"
    manifest = root / "opt/webknock/instances/webknock"
    code, held = run("uninstall", "--root", str(root))
    assert code == 0, err(held)
    assert snippet.exists() and manifest.exists()
    assert f"kept {snippet}: the web server still includes it" in err(held)
    assert f"        {site}:4:    include /etc/webknock/nginx-webknock.conf;" in err(held)
    assert "old.conf" not in err(held), "a commented include is no include"
    assert not (root / "usr/lib/cgi-bin/webknock.cgi").exists(), "the CGI copy went"
    assert not (root / "run/webknock/webknock").exists(), "the spool went"
    assert "instances still installed: webknock" in out(held)

    shutil.rmtree(root / "etc/nginx")  # the admin removes the include
    code, host = run("uninstall", "--root", str(root))
    assert code == 0, err(host)
    assert not snippet.exists() and not manifest.exists()
    assert "--purge deletes them" in out(host)
    assert files(root) == {
        "etc/webknock/webknock.ini",
        "etc/webknock/webknock.keys",
        "etc/webknock/webknock.server-key",
    }
    assert not runner(host).commands("webknockctl"), "--root: no teardown"
    code, host = run("uninstall", "--root", str(root), "--purge")
    assert code == 0, err(host)
    assert list(root.iterdir()) == [] or files(root) == set()
    for gone in ("opt/webknock", "etc/webknock", "run/webknock", "var/lib/webknock"):
        assert not (root / gone).exists(), gone


def test_purge_removes_state_and_audit_trail(root: Path) -> None:
    state = root / "var/lib/webknock/webknock.db"
    made = [state, Path(f"{state}-wal"), Path(f"{state}.lock"), Path(f"{state}.metrics.json")]
    for path in made:
        path.write_text("")
    audit = root / "var/log/webknock/webknock.jsonl"
    audit.write_text("{}\n")
    mine = root / "var/lib/webknock/admin-notes.txt"
    mine.write_text("mine\n")
    code, host = run("uninstall", "--root", str(root), "--purge")
    assert code == 0, err(host)
    assert not any(p.exists() for p in [*made, audit])
    assert mine.exists(), "a file webknock did not make stays"
    assert f"kept {mine.parent}: it holds files webknock did not make" in out(host)


def test_one_instance_of_two_keeps_the_shared_parts(root: Path) -> None:
    code, host = run(
        "server", "--root", str(root), "--yes", "--instance", "office", "--web-server", "none"
    )
    assert code == 0, err(host)
    code, host = run("uninstall", "--root", str(root), "--instance", "office", "--purge")
    assert code == 0, err(host)
    assert not (root / "etc/webknock/office.ini").exists()
    assert (root / "opt/webknock/venv").is_dir() and (root / "usr/local/sbin/webknockd").exists()
    jobs = [ln for ln in (root / "etc/cron.d/webknock").read_text().splitlines() if ln[:1] == "*"]
    assert len(jobs) == 1 and "webknock.ini reap" in jobs[0]
    code, host = run("uninstall", "--root", str(root), "--all", "--purge")
    assert code == 0, err(host)
    assert files(root) == set()


def test_an_entry_point_the_admin_replaced_stays(root: Path) -> None:
    ctl = root / "usr/local/sbin/webknockctl"
    ctl.write_text("#!/bin/sh\necho mine\n")
    code, host = run("uninstall", "--root", str(root), "--purge")
    assert code == 0, err(host)
    assert ctl.exists() and f"kept {ctl}: not the entry point install.sh wrote" in err(host)
    assert not (root / "usr/local/sbin/webknockd").exists()


def test_not_installed() -> None:
    code, host = run("uninstall", "--root", "/var/tmp/webknock-unit-none", "--instance", "x")
    assert code == 0 and "instance x: not installed" in out(host)
    shutil.rmtree("/var/tmp/webknock-unit-none", ignore_errors=True)
