"""Audit trail: one JSON line per event through the real daemon and engine (fake firewall),
file modes, rotation, the journal fallback, and `webknockctl log` filters."""

from __future__ import annotations

import grp
import gzip
import json
import logging
import os
import shutil
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cgi_side import frame, openports_packet, submit
from tests.conftest import write_instance
from tests.fakes import MemoryFirewall, memory_daemon
from webknock.addresses import parse_address
from webknock.config import ServerConfig, load
from webknock.ctl import cli as ctl
from webknock.protocol.v1 import Keys
from webknock.server import daemon as daemon_mod
from webknock.server.audit import AuditSink, parse_when, record, trail_files
from webknock.server.events import Event
from webknock.server.loop import Daemon

UA = "webknock-client/1.0 (audit test)"


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def make_daemon(cfg: ServerConfig, sink: AuditSink) -> Daemon:
    return memory_daemon(cfg, sink)[0]


def spool(
    cfg: ServerConfig, keys: Keys, ip: str, ports: list[tuple[str, int]], ua: str = UA
) -> None:
    """A knock from `ip`, relayed by the CGI with the client's User-Agent."""
    submit(cfg, payload=frame(openports_packet(keys, ip, ports), ip, agent=ua))


def test_every_event_kind_is_one_line_with_its_fields(tmp_path: Path, vector_keys: Keys) -> None:
    """A knock refused (a port not offered) is answered and logged: it is no event."""
    audit = tmp_path / "log" / "webknock.jsonl"
    cfg = load(write_instance(tmp_path, vector_keys, audit_log=str(audit)))
    sink = AuditSink(cfg.audit_log)
    d = make_daemon(cfg, sink)
    spool(cfg, vector_keys, "192.0.2.10", [("tcp", 22)])
    d.drain()  # open
    spool(cfg, vector_keys, "192.0.2.10", [("tcp", 22)], ua="other-agent/2")
    d.drain()  # renew
    spool(cfg, vector_keys, "2001:db8::7", [("udp", 51820)])
    d.drain()  # open (IPv6)
    spool(cfg, vector_keys, "192.0.2.10", [("tcp", 23)])  # not offered
    d.drain()  # no event
    d.engine.revoke(parse_address("2001:db8::7"), None, None, time.time())
    d.engine.reap(time.time() + 3600)  # expire
    sink.close()
    got = lines(audit)
    assert [(r["event"], r["ip"]) for r in got] == [
        ("open", "192.0.2.10"),
        ("renew", "192.0.2.10"),
        ("open", "2001:db8::7"),
        ("revoke", "2001:db8::7"),
        ("expire", "192.0.2.10"),
    ]
    opened, renewed, opened6, revoked, expired = got
    assert opened["user_agent"] == UA and renewed["user_agent"] == "other-agent/2"
    for r in (opened, renewed, opened6, revoked, expired):
        assert r["instance"] == "webknock" and isinstance(r["expires"], int)
        assert r["proto"] in ("tcp", "udp") and r["port"] in (22, 51820)
        assert abs(r["time"] - time.time()) < 3700
        assert r["date"].endswith("Z") and len(r["date"]) == 20
    assert [r.get("source") for r in got] == ["knock", "knock", "knock", None, None]
    assert (opened6["proto"], opened6["port"]) == ("udp", 51820)
    assert revoked["reason"] == "revoked by admin"
    assert "reason" not in opened and "user_agent" not in expired


def test_the_trail_says_whether_a_knock_or_an_admin_opened(
    tmp_path: Path,
    vector_keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """ "admin" only for `webknockctl grant`; a knock is a knock whatever its agent says."""
    audit = tmp_path / "webknock.jsonl"
    config = write_instance(tmp_path, vector_keys, audit_log=str(audit))
    cfg = load(config)
    monkeypatch.setattr(daemon_mod, "make_firewall", lambda cfg, **kw: MemoryFirewall())
    assert ctl.main(["--config", str(config), "grant", "192.0.2.20", "--port", "22"]) == 0
    capsys.readouterr()
    sink = AuditSink(cfg.audit_log)
    d = make_daemon(cfg, sink)
    spool(cfg, vector_keys, "192.0.2.21", [("tcp", 22)], ua="webknockctl")
    spool(cfg, vector_keys, "192.0.2.22", [("tcp", 22)], ua="admin")
    d.drain()
    sink.close()
    assert sorted((r["ip"], r["source"], r.get("user_agent")) for r in lines(audit)) == [
        ("192.0.2.20", "admin", None),
        ("192.0.2.21", "knock", "webknockctl"),
        ("192.0.2.22", "knock", "admin"),
    ]


def test_file_is_created_root_adm_0640_and_appended(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.parent.chmod(0o755)
    sink = AuditSink(path)
    ev = Event("open", 1_800_000_000.5, "x", "192.0.2.1", "tcp", 22, 1_800_000_060, user_agent=UA)
    sink(ev)
    sink(ev)
    st = path.stat()
    adm = grp.getgrnam("adm").gr_gid
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, adm, 0o640)
    assert lines(path) == [record(ev), record(ev)]
    assert record(ev) == {
        "time": 1_800_000_000.5,
        "date": "2027-01-15T08:00:00Z",
        "event": "open",
        "instance": "x",
        "ip": "192.0.2.1",
        "proto": "tcp",
        "port": 22,
        "expires": 1_800_000_060,
        "user_agent": UA,
    }
    fd = sink.fd
    assert fd is not None
    flags = Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0]
    assert int(flags, 8) & os.O_APPEND


def test_missing_log_directory_is_made_root_adm_0750(tmp_path: Path) -> None:
    path = tmp_path / "var" / "log" / "webknock" / "a.jsonl"
    AuditSink(path)(Event("open", 1.0, "x", "192.0.2.1", "tcp", 22, 5))
    st = path.parent.stat()
    adm = grp.getgrnam("adm").gr_gid
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, adm, 0o750)
    assert len(lines(path)) == 1


def test_reopened_after_rotation_and_removal(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    sink = AuditSink(path)
    ev = Event("expire", 1.0, "x", "192.0.2.1", "tcp", 22, 1)
    sink(ev)
    path.rename(tmp_path / "a.jsonl.1")  # what logrotate does
    sink(ev)
    sink(ev)
    path.unlink()
    sink(ev)
    assert len(lines(tmp_path / "a.jsonl.1")) == 1
    assert len(lines(path)) == 1


def test_control_characters_in_the_agent_stay_on_one_line(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    sink = AuditSink(path)
    evil = 'x"\n{"event":"open","ip":"203.0.113.66"}\r\x1b[2J\u2028'
    sink(Event("open", 1.0, "x", "192.0.2.1", "tcp", 22, 5, user_agent=evil))
    text = path.read_text()
    assert text.count("\n") == 1 and "\x1b" not in text
    assert lines(path)[0]["user_agent"] == evil


def test_journal_when_no_file(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="webknock.server.audit")
    AuditSink(None)(Event("revoke", 2.0, "x", "192.0.2.1", "tcp", 22, 9, reason="r"))
    (rec,) = [r for r in caplog.records if r.name == "webknock.server.audit"]
    assert json.loads(rec.getMessage())["event"] == "revoke"


def test_unwritable_file_is_logged_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    sink = AuditSink(blocker / "a.jsonl")  # parent is a file
    sink(Event("open", 1.0, "x", "192.0.2.1", "tcp", 22, 5))
    (rec,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"cannot append to audit log {blocker / 'a.jsonl'}" in rec.getMessage()
    assert '"ip":"192.0.2.1"' in rec.getMessage()  # the event itself is not lost


@pytest.mark.skipif(shutil.which("logrotate") is None, reason="logrotate is not installed")
def test_shipped_logrotate_config_rotates_and_the_sink_follows(tmp_path: Path) -> None:
    shipped = (Path(__file__).parents[2] / "etc/logrotate.d/webknock").read_text()
    conf = tmp_path / "logrotate.conf"
    conf.write_text(shipped.replace("/var/log/webknock/", f"{tmp_path}/log/"))
    (tmp_path / "log").mkdir(mode=0o750)
    path = tmp_path / "log" / "i.jsonl"
    sink = AuditSink(path)
    for n in range(3):
        sink(Event("open", float(n), "i", "192.0.2.1", "tcp", 22, 5))
        subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "state"), str(conf)], check=True)
    sink(Event("open", 3.0, "i", "192.0.2.1", "tcp", 22, 5))
    names = [p.name for p in trail_files(path)]
    assert names == ["i.jsonl.3.gz", "i.jsonl.2.gz", "i.jsonl.1", "i.jsonl"]
    assert [r["time"] for r in lines(path)] == [3.0]


# -- webknockctl log ---------------------------------------------------------------------------

NOW = time.time()


def rec(t: float, kind: str = "open", ip: str = "192.0.2.10", **kw: Any) -> dict[str, Any]:
    ev = Event(kind, t, "webknock", ip, "tcp", 22, t + 60, user_agent=UA, **kw)
    return record(ev)


@pytest.fixture
def trail(tmp_path: Path, vector_keys: Keys) -> tuple[Path, list[dict[str, Any]]]:
    """Five events across a gzipped, a plain rotated and the live file."""
    audit = tmp_path / "webknock.jsonl"
    now = time.time()  # not NOW: relative --since forms are read against the clock of the test
    records = [
        rec(now - 3 * 86400, ip="198.51.100.7"),  # .2.gz
        rec(now - 3 * 3600, "renew"),  # .2.gz
        rec(now - 1800, "revoke", reason="revoked by admin"),  # .1
        rec(now - 120, ip="2001:db8::5"),  # live
        rec(now - 30, "expire", ip="2001:db8:1::9"),  # live
    ]

    def dump(rs: list[dict[str, Any]]) -> str:
        return "".join(json.dumps(r) + "\n" for r in rs)

    with gzip.open(tmp_path / "webknock.jsonl.2.gz", "wt") as fh:
        fh.write(dump(records[:2]))
    (tmp_path / "webknock.jsonl.1").write_text(dump(records[2:3]))
    audit.write_text(dump(records[3:]))
    return write_instance(tmp_path, vector_keys, audit_log=str(audit)), records


def run_log(capsys: pytest.CaptureFixture[str], config: Path, *args: str) -> tuple[int, str, str]:
    code = ctl.main(["--config", str(config), "log", *args])
    out, err = capsys.readouterr()
    return code, out, err


def times(out: str) -> list[float]:
    return [r["time"] for r in json.loads(out)]


def test_log_reads_rotated_and_gzipped_files_oldest_first(
    trail: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, records = trail
    code, out, err = run_log(capsys, config, "--json")
    assert code == 0 and err == ""
    assert json.loads(out) == records


def test_log_table_is_human_readable(
    trail: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, _ = trail
    code, out, _ = run_log(capsys, config)
    rows = out.splitlines()
    assert code == 0 and len(rows) == 6
    assert rows[0].split() == ["TIME", "EVENT", "ADDRESS", "PORT", "EXPIRES", "DETAIL"]
    assert rows[1].split()[2:5] == ["open", "198.51.100.7", "tcp/22"]
    assert rows[1].endswith(UA)
    assert rows[3].endswith("revoked by admin")
    assert time.strftime("%Y-%m-%d %H:%M", time.localtime(trail[1][4]["time"])) in rows[5]


@pytest.mark.parametrize(
    ("since", "count"),
    [
        ("{unix}", 3),
        ("2h", 3),
        ("10m", 2),
        ("90s", 1),
        ("1w", 5),
        ("{local}", 3),
        ("{zulu}", 3),
        ("{offset}", 3),
    ],
)
def test_log_since_forms(
    trail: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    since: str,
    count: int,
) -> None:
    config, records = trail
    hour_ago = records[-1]["time"] + 30 - 3600  # an hour before the trail was written
    since = since.format(
        unix=int(hour_ago),
        local=time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(hour_ago)),
        zulu=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(hour_ago)),
        offset=time.strftime("%Y-%m-%d %H:%M:%S+00:00", time.gmtime(hour_ago)),
    )
    code, out, _ = run_log(capsys, config, "--since", since, "--json")
    assert code == 0 and times(out) == [r["time"] for r in records[-count:]]


def test_log_until(
    trail: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, records = trail
    code, out, _ = run_log(capsys, config, "--since", "1d", "--until", "1h", "--json")
    assert code == 0 and times(out) == [records[1]["time"]]


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        ("192.0.2.10", [1, 2]),
        ("198.51.100.0/24", [0]),
        ("2001:db8::/32", [3, 4]),
        ("2001:db8::5", [3]),
        ("203.0.113.1", []),
    ],
)
def test_log_ip_address_or_cidr(
    trail: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    ip: str,
    expected: list[int],
) -> None:
    config, records = trail
    code, out, _ = run_log(capsys, config, "--ip", ip, "--json")
    assert code == 0 and times(out) == [records[i]["time"] for i in expected]


def test_log_event_kinds(
    trail: tuple[Path, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, records = trail
    _, out, _ = run_log(capsys, config, "--event", "open", "--json")
    assert times(out) == [records[0]["time"], records[3]["time"]]
    _, out, _ = run_log(capsys, config, "--event", "revoke,expire", "--event", "renew", "--json")
    assert times(out) == [r["time"] for r in records[1:3] + records[4:]]
    _, out, _ = run_log(capsys, config, "--event", "open", "--ip", "2001:db8::/32", "--json")
    assert times(out) == [records[3]["time"]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "--since: 'yesterday' is not a Unix time"),
        (["--since", "10x"], "--since: '10x' is not"),
        (["--until", "2026-13-45"], "--until: '2026-13-45' is not"),
        (["--ip", "192.0.2.300"], "--ip: '192.0.2.300' is not an IP address or CIDR"),
        (["--ip", "192.0.2.0/33"], "--ip: '192.0.2.0/33' is not"),
        (["--event", "opened"], "--event: 'opened' is not an event kind"),
    ],
)
def test_log_bad_arguments_are_one_line_and_exit_2(
    trail: tuple[Path, list[dict[str, Any]]],
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    message: str,
) -> None:
    config, _ = trail
    code, out, err = run_log(capsys, config, *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"webknockctl log: {message}")


def test_log_without_audit_file_points_to_the_journal(
    tmp_path: Path, vector_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run_log(capsys, write_instance(tmp_path, vector_keys))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "audit_log is not set" in err and "journalctl -u webknockd@webknock" in err


def test_log_missing_file_and_malformed_lines(
    tmp_path: Path, vector_keys: Keys, capsys: pytest.CaptureFixture[str]
) -> None:
    audit = tmp_path / "a.jsonl"
    config = write_instance(tmp_path, vector_keys, audit_log=str(audit))
    code, out, err = run_log(capsys, config, "--json")
    assert code == 0 and json.loads(out) == []
    code, out, err = run_log(capsys, config)
    assert code == 0 and out == "" and f"{audit} does not exist" in err
    audit.write_text(json.dumps(rec(NOW)) + "\nnot json\n[1]\n{}\n")
    code, out, err = run_log(capsys, config, "--json")
    assert code == 0 and times(out) == [rec(NOW)["time"]]
    assert err.strip() == f"webknockctl log: {audit}: skipped 3 malformed line(s)"


def test_trail_files_order_with_dateext(tmp_path: Path) -> None:
    base = tmp_path / "x.jsonl"
    for name in ("x.jsonl", "x.jsonl-20261101.gz", "x.jsonl-20261020.gz", "x.jsonl.other"):
        (tmp_path / name).write_text("")
    assert [p.name for p in trail_files(base)] == [
        "x.jsonl-20261020.gz",
        "x.jsonl-20261101.gz",
        "x.jsonl",
    ]


def test_parse_when_relative_units() -> None:
    assert parse_when("45s", 1000.0) == 955.0
    assert parse_when("2d", 1_000_000.0) == 1_000_000.0 - 2 * 86400
    assert parse_when("1700000000.5", 0) == 1_700_000_000.5


@pytest.mark.parametrize(
    ("ip", "found"),
    [
        ("198.51.100.7", True),  # an address inside the network grant
        ("198.51.100.0/24", True),
        ("198.51.0.0/16", True),
        ("198.51.100.128/25", True),
        ("198.51.101.7", False),
        ("::/0", False),  # never across families
    ],
)
def test_log_ip_matches_network_grants_that_overlap_it(ip: str, found: bool) -> None:
    from webknock.server.audit import matches, parse_network

    rec = {"time": 1.0, "event": "open", "ip": "198.51.100.0/24", "peer": "198.51.100.7"}
    kw: dict[str, Any] = {"since": None, "until": None, "kinds": frozenset()}
    assert matches(rec, network=parse_network(ip), **kw) is found
