"""Fan-out: `webknock --profile a,b,c` and profile groups, against two fake servers at once
(the v1 FakeServer of test_client_http; a v2 profile through the FakeV2Server transport)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_client_http import REPO, FakeServer, free_port
from tests.unit.test_client_v2 import FakeV2Server
from webknock.client import cli, targets
from webknock.client.errors import (
    EXIT_CONFIG,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_SERVER,
    EXIT_UNREACHABLE,
    worst,
)
from webknock.client.lookup import expand_profiles
from webknock.client.net import Transport
from webknock.keys import format_keys
from webknock.protocol import v1
from webknock.protocol.v2 import SigningKey


@pytest.fixture(autouse=True)
def homes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Profiles in $XDG_CONFIG_HOME/webknock (the system folder is not looked at)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.setattr("webknock.client.lookup.SYSTEM_DIR", tmp_path / "system")
    (tmp_path / "config" / "webknock").mkdir(parents=True)
    yield tmp_path / "config" / "webknock"
    logger = logging.getLogger("webknock")
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)


@pytest.fixture
def servers() -> Iterator[tuple[FakeServer, FakeServer]]:
    a, b = FakeServer(v1.Keys.generate()), FakeServer(v1.Keys.generate())
    yield a, b
    a.close()
    b.close()


def v1_profile(folder: Path, name: str, keys: v1.Keys, url: str, extra: str = "") -> Path:
    keys_file = folder / f"{name}.keys"
    keys_file.write_text(format_keys(keys))
    os.chmod(keys_file, 0o600)
    path = folder / f"{name}.ini"
    path.write_text(
        f"[client]\nurl = {url}\nkeys_file = {name}.keys\nports = tcp/22\ntimeout = 2\n{extra}"
    )
    return path


def two(homes: Path, servers: tuple[FakeServer, FakeServer]) -> None:
    a, b = servers
    v1_profile(homes, "office", a.keys, a.url())
    v1_profile(homes, "lab", b.keys, b.url())


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_worst_is_the_highest_code() -> None:
    assert worst([]) == EXIT_OK and worst([0, 0]) == EXIT_OK
    assert worst([0, EXIT_REFUSED, EXIT_UNREACHABLE]) == EXIT_UNREACHABLE
    assert worst([EXIT_SERVER, EXIT_UNREACHABLE, EXIT_CONFIG]) == EXIT_SERVER


def test_two_profiles_both_open(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    two(homes, servers)
    rc, out, err = run(capsys, "--profile", "office,lab", "knock")
    assert rc == EXIT_OK, err
    lines = out.splitlines()
    assert len(lines) == 2 and err == ""
    assert lines[0].startswith("office: opened tcp/22 for 127.0.0.1 until ")
    assert lines[1].startswith("lab: opened tcp/22 for 127.0.0.1 until ")
    assert [s.apis() for s in servers] == [["getinfo", "openports"]] * 2


def test_one_down_exit_3_and_says_which(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = servers
    v1_profile(homes, "office", a.keys, a.url())
    v1_profile(homes, "lab", a.keys, f"http://127.0.0.1:{free_port()}/webknock")
    rc, out, err = run(capsys, "--profile", "office,lab", "knock")
    assert rc == EXIT_UNREACHABLE
    assert out.startswith("office: opened tcp/22") and out.count("\n") == 1
    assert err.startswith("lab: error: cannot connect to 127.0.0.1") and err.count("\n") == 1

    a.behaviour.status = 403  # refused (1) and unreachable (3): the highest wins
    rc, out, err = run(capsys, "--profile", "office,lab", "--no-cache", "knock")
    assert rc == EXIT_UNREACHABLE and out == ""
    assert "office: error: " in err and "lab: error: " in err


def test_slow_server_does_not_delay_the_other(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    two(homes, servers)
    servers[0].behaviour.delay = 1.0
    servers[1].behaviour.delay = 1.0
    start = time.monotonic()
    rc, _, _ = run(capsys, "--profile", "office,lab", "knock")
    assert rc == EXIT_OK
    assert time.monotonic() - start < 3.5, "in parallel: two requests each, not four in a row"


def test_json_array(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    two(homes, servers)
    servers[1].behaviour.status = 504
    rc, out, err = run(capsys, "--profile", "office,lab", "knock", "--json")
    assert rc == EXIT_SERVER
    office, lab = json.loads(out)
    assert office["profile"] == "office" and office["ok"] and office["code"] == 0
    assert len(office["grants"]) == 1 and office["errors"] == []
    assert lab["profile"] == "lab" and not lab["ok"] and lab["code"] == EXIT_SERVER
    assert lab["grants"] == [] and lab["errors"][0]["code"] == EXIT_SERVER
    assert "lab: error: " in err

    servers[1].behaviour.status = 200
    rc, out, _ = run(capsys, "--profile", "office,lab", "info", "--json")
    assert rc == EXIT_OK
    found = json.loads(out)
    assert [f["profile"] for f in found] == ["office", "lab"]
    assert found[1]["servers"][0]["maxtime"] == 3600
    rc, out, _ = run(capsys, "--profile", "office,lab", "info")
    assert out.splitlines()[1].startswith("lab: http://127.0.0.1:")


def test_group_file(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    two(homes, servers)
    (homes / "all.ini").write_text("[group]\nprofiles = office, lab\n")
    rc, out, _ = run(capsys, "--profile", "all", "knock")
    assert rc == EXIT_OK and [line.split(":")[0] for line in out.splitlines()] == ["office", "lab"]
    rc, out, _ = run(capsys, "--config", str(homes / "all.ini"), "knock")
    assert rc == EXIT_OK and out.count("\n") == 2
    rc, out, _ = run(capsys, "--profile", "all,office", "knock")  # each profile once
    assert rc == EXIT_OK and out.count("\n") == 2


def test_a_group_of_one_still_prefixes(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    two(homes, servers)
    (homes / "one.ini").write_text("[group]\nprofiles = lab\n")
    rc, out, _ = run(capsys, "--profile", "one", "knock", "--json")
    assert rc == EXIT_OK and [r["profile"] for r in json.loads(out)] == ["lab"]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"all": "[group]\nprofiles = office, nosuch\n"}, "profile 'nosuch' not found"),
        ({"all": "[group]\nprofiles = office, all\n"}, "'all' is this group itself (a cycle)"),
        (
            {"all": "[group]\nprofiles = office, sub\n", "sub": "[group]\nprofiles = all\n"},
            "'sub' is a group too",
        ),
        ({"all": "[group]\nprofiles =\n"}, "[group] profiles: missing"),
        ({"all": "[group]\nprofiles = a b\n"}, "'a b' is not a profile name"),
        ({"all": "[group]\nmembers = office\n"}, "[group] members: unknown key"),
        ({"all": "[group]\nprofiles = office\n[client]\nurl = x\n"}, "and no other"),
    ],
)
def test_group_errors_exit_2(
    homes: Path,
    servers: tuple[FakeServer, FakeServer],
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    expected: str,
) -> None:
    two(homes, servers)
    for name, text in files.items():
        (homes / f"{name}.ini").write_text(text)
    rc, out, err = run(capsys, "--profile", "all", "knock")
    assert rc == EXIT_CONFIG and out == ""
    assert expected in err and str(homes / "all.ini") in err
    assert [s.apis() for s in servers] == [[], []], "nothing is knocked before all are good"


def test_bad_member_or_list(
    homes: Path, servers: tuple[FakeServer, FakeServer], capsys: pytest.CaptureFixture[str]
) -> None:
    two(homes, servers)
    (homes / "lab.ini").write_text("[client]\nurl = ftp://x/\n")
    rc, _, err = run(capsys, "--profile", "office,lab", "knock")
    assert rc == EXIT_CONFIG and "lab.ini: [client] url:" in err
    assert run(capsys, "--profile", "office,,lab", "knock")[0] == EXIT_CONFIG
    with pytest.raises(Exception, match="not found"):
        expand_profiles("office,nosuch")
    assert expand_profiles("office") == ([("office", homes / "office.ini")], False)


def test_v1_and_v2_together(
    homes: Path,
    servers: tuple[FakeServer, FakeServer],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    v2_vectors: dict[str, Any],
) -> None:
    a, _ = servers
    v1_profile(homes, "office", a.keys, a.url())
    server_key = SigningKey.from_seed(bytes.fromhex(v2_vectors["server"]["seed_hex"]))
    client_key = SigningKey.from_seed(bytes.fromhex(v2_vectors["client"]["seed_hex"]))
    fake = FakeV2Server(server_key, [client_key.public])
    (homes / "cloud.key").write_text(client_key.to_pem())
    os.chmod(homes / "cloud.key", 0o600)
    (homes / "cloud.ini").write_text(
        "[client]\nurl = https://knock.example.org/webknock\n"
        f"server_key = {v2_vectors['server']['public']}\nkey_file = cloud.key\nports = tcp/22\n"
    )

    def transport(url: str, family: str, verify: bool | str, timeout: float) -> Any:
        return fake if "example.org" in url else Transport(url, family, verify, timeout)

    monkeypatch.setattr(targets, "Transport", transport)
    rc, out, err = run(capsys, "--profile", "office,cloud", "knock")
    assert rc == EXIT_OK, err
    assert out.startswith("office: opened") and "\ncloud: opened tcp/22" in out
    assert fake.apis() == ["getinfo", "openports"]


def test_exec_needs_every_grant_and_renews_each(
    homes: Path,
    servers: tuple[FakeServer, FakeServer],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    two(homes, servers)
    for s in servers:
        s.behaviour.maxtime = 3  # a renewal every second
    rc = cli.main(["--profile", "office,lab", "exec", "--", "sh", "-c", "sleep 2.5; exit 5"])
    assert rc == 5
    assert all(s.apis().count("openports") >= 3 for s in servers), "each renewed"
    capsys.readouterr()

    servers[1].behaviour.status = 429
    marker = tmp_path / "ran"
    rc, _, err = run(
        capsys, "--profile", "office,lab", "--no-cache", "exec", "--", "touch", str(marker)
    )
    assert rc == EXIT_REFUSED and not marker.exists(), "no command unless every server granted"
    assert "lab: error: " in err


def test_keep_renews_both_and_survives_one_failing(
    homes: Path, servers: tuple[FakeServer, FakeServer], tmp_path: Path
) -> None:
    two(homes, servers)
    a, b = servers
    a.behaviour.maxtime = b.behaviour.maxtime = 3
    b.behaviour.status = 503  # lab fails from the start
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "XDG_CONFIG_HOME": str(tmp_path / "config"),
    }
    argv = [sys.executable, "-m", "webknock.client", "--profile", "office,lab", "keep"]
    proc = subprocess.Popen([*argv, "--poll", "0.2"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while a.apis().count("openports") < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert a.apis().count("openports") >= 3, "office renewed while lab failed"
        b.behaviour.status = 200
        while b.apis().count("openports") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert b.apis().count("openports") >= 2, "lab recovered and renewed"
    assert "office: [any] opened tcp/22" in err
    assert "lab: [any] knock failed (1 in a row)" in err
    assert "lab: [any] knock works again" in err
    assert "SIGTERM received: stopping" in err and err.rstrip().endswith("stopped")
