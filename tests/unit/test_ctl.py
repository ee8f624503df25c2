"""webknockctl against an in-memory firewall: list, grant, revoke, reap, status, exit codes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fakes import MemoryFirewall
from webknock.ctl import cli as ctl
from webknock.server import daemon


@pytest.fixture
def fw(monkeypatch: pytest.MonkeyPatch) -> MemoryFirewall:
    firewall = MemoryFirewall()
    monkeypatch.setattr(daemon, "make_firewall", lambda cfg, **kw: firewall)
    return firewall


def run(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = ctl.main(["--config", str(config), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_grant_list_revoke(
    instance_config: Path, fw: MemoryFirewall, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(
        capsys, instance_config, "grant", "2001:db8::10", "--port", "22", "--time", "60"
    )
    assert code == 0 and "granted 2001:db8::10 tcp/22" in out
    assert len(fw.held) == 1
    code, out, _ = run(capsys, instance_config, "list", "--json")
    (grant,) = json.loads(out)
    assert grant["ip"] == "2001:db8::10" and grant["proto"] == "tcp" and grant["port"] == 22
    assert 55 <= grant["remaining"] <= 60 and isinstance(grant["expires"], int)
    code, out, _ = run(capsys, instance_config, "list")
    assert out.splitlines()[0].split()[:4] == ["ADDRESS", "PROTO", "PORT", "EXPIRES"]
    assert "2001:db8::10" in out
    code, out, _ = run(capsys, instance_config, "revoke", "2001:db8::10")
    assert code == 0 and "revoked [2001:db8::10]:tcp/22" in out and fw.held == {}
    code, _, err = run(capsys, instance_config, "revoke", "2001:db8::10")
    assert code == 1 and "no grant matches" in err


def test_grant_refuses_port_not_offered(
    instance_config: Path, fw: MemoryFirewall, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, instance_config, "grant", "192.0.2.10", "--port", "23")
    assert code == 2 and "not offered" in err and fw.held == {}


@pytest.mark.parametrize("bad", ["300.1.1.1", "not-an-ip", "0.0.0.0", "ff02::1"])
def test_bad_address_is_usage_error(
    instance_config: Path, fw: MemoryFirewall, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["--config", str(instance_config), "revoke", bad])
    assert info.value.code == 2
    assert bad in capsys.readouterr().err


def test_status_reports_daemon_down_and_drift(
    instance_config: Path, fw: MemoryFirewall, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, instance_config, "grant", "192.0.2.10", "--port", "22")
    code, out, _ = run(capsys, instance_config, "status", "--json")
    report = json.loads(out)
    assert code == 3 and report["daemon"]["running"] is False
    start = report["daemon"]["start"]  # with systemd as PID 1 its unit, else by hand
    assert "systemctl start webknockd@" in start or f"{instance_config} prepare-spool" in start
    assert report["firewall_agrees"] is True and report["grants"]["live"] == 1
    fw.held.clear()
    code, out, _ = run(capsys, instance_config, "status")
    assert code == 3 and "DIFFERS: 1 missing" in out and "NOT RUNNING" in out


def test_reconcile_restores_and_reap_removes_expired(
    instance_config: Path, fw: MemoryFirewall, capsys: pytest.CaptureFixture[str]
) -> None:
    run(capsys, instance_config, "grant", "192.0.2.10", "--port", "22", "--time", "60")
    fw.held.clear()  # someone flushed the firewall
    code, out, _ = run(capsys, instance_config, "reconcile")
    assert code == 0 and "1 live grant" in out and len(fw.held) == 1
    run(capsys, instance_config, "grant", "192.0.2.11", "--port", "22", "--time", "1")
    assert len(fw.held) == 2
    time.sleep(1.2)
    assert run(capsys, instance_config, "reap")[0] == 0
    assert [str(k.ip) for k in fw.held] == ["192.0.2.10"]


def test_bad_config_is_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, tmp_path / "missing.ini", "list")
    assert code == 2 and "missing.ini: cannot read" in err


def test_grant_time_beyond_a_port_number_is_capped_at_max_time(
    instance_config: Path, fw: MemoryFirewall, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, _ = run(capsys, instance_config, "grant", "192.0.2.10", "--time", "86400")
    assert code == 0
    _, out, _ = run(capsys, instance_config, "list", "--json")
    assert {g["remaining"] <= 3600 and g["remaining"] > 3590 for g in json.loads(out)} == {True}


@pytest.mark.parametrize("bad", ["0", "-5", "1.5", "soon"])
def test_grant_time_must_be_positive_seconds(
    instance_config: Path, fw: MemoryFirewall, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        run(capsys, instance_config, "grant", "192.0.2.10", "--time", bad)
    assert info.value.code == 2
    assert "positive number of seconds" in capsys.readouterr().err
    assert fw.held == {}


def test_grant_and_revoke_print_only_what_they_did(
    instance_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """No INFO event lines or raw audit JSON on the admin's terminal (those are the daemon
    log's and the audit trail's)."""
    from tests.fakes import MemoryFirewall
    from webknock.config import load
    from webknock.ctl import cli as ctl
    from webknock.server.audit import AuditSink
    from webknock.server.engine import GrantEngine
    from webknock.server.events import EventBus, log_sink
    from webknock.server.state import StateStore

    cfg = load(instance_config)
    engine = GrantEngine(
        cfg.instance,
        StateStore(cfg.state_file),
        MemoryFirewall(),
        EventBus(log_sink, AuditSink(None)),
    )
    monkeypatch.setattr(ctl, "_engine", lambda _cfg: engine)
    assert ctl.main(["--config", str(instance_config), "grant", "192.0.2.10", "--port", "22"]) == 0
    assert ctl.main(["--config", str(instance_config), "revoke", "192.0.2.10"]) == 0
    out, err = capsys.readouterr()
    assert "granted 192.0.2.10 tcp/22 until" in out and "revoked 192.0.2.10:tcp/22" in out
    assert err == "", err


def test_network_grants_are_listed_as_networks_and_revoked_by_address_or_network(
    instance_config: Path, fw: MemoryFirewall, capsys: pytest.CaptureFixture[str]
) -> None:
    """A client's open_prefix grant (made here through the engine, as webknockd would)."""
    import ipaddress

    from webknock.config import load
    from webknock.server.grants import GrantRequest

    engine = ctl._engine(load(instance_config))

    def open_net(addr: str, prefixlen: int | None, rid: str) -> None:
        ip = ipaddress.ip_address(addr)
        request = GrantRequest(rid, ip, (("tcp", 22),), 60, client="alice", prefixlen=prefixlen)
        assert engine.open([request], time.time())[rid].ok

    open_net("198.51.100.7", 24, "1" * 32)
    open_net("2001:db8::7", 64, "2" * 32)
    code, out, _ = run(capsys, instance_config, "list", "--json")
    assert [g["ip"] for g in json.loads(out)] == ["198.51.100.0/24", "2001:db8::/64"]
    code, out, _ = run(capsys, instance_config, "list")
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "198.51.100.0/24",
        "2001:db8::/64",
    ]
    code, out, _ = run(capsys, instance_config, "status", "--json")
    assert json.loads(out)["grants"]["addresses"] == 2
    code, out, _ = run(capsys, instance_config, "revoke", "198.51.100.200")
    assert code == 0 and out == "revoked 198.51.100.0/24:tcp/22\n", "an address inside it"
    code, out, _ = run(capsys, instance_config, "revoke", "2001:db8::/64", "--proto", "udp")
    assert code == 1, "another protocol: nothing"
    code, out, _ = run(capsys, instance_config, "revoke", "2001:db8::/64")
    assert code == 0 and out == "revoked [2001:db8::/64]:tcp/22\n" and fw.held == {}
    open_net("198.51.100.7", None, "3" * 32)
    open_net("198.51.101.7", None, "4" * 32)
    code, out, _ = run(capsys, instance_config, "revoke", "198.51.100.0/23")
    assert code == 0 and out == "revoked 198.51.100.7:tcp/22\nrevoked 198.51.101.7:tcp/22\n"


@pytest.mark.parametrize("bad", ["198.51.100.0/33", "2001:db8::/129", "x/24"])
def test_bad_network_is_usage_error(
    instance_config: Path, fw: MemoryFirewall, bad: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        ctl.main(["--config", str(instance_config), "revoke", bad])
    assert info.value.code == 2 and "not an address or a CIDR network" in capsys.readouterr().err
