"""webknockd's metrics: the Prometheus text file (parsed as node_exporter would), the JSON
snapshot, and webknockctl status --json, after a scripted run of the daemon."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.cgi_side import frame, getinfo_packet, openports_packet, submit
from tests.conftest import write_instance
from tests.fakes import MemoryFirewall, memory_daemon
from webknock.config import load
from webknock.ctl import cli as ctl
from webknock.protocol import v1
from webknock.server import daemon
from webknock.server.metrics import BUCKETS, Metrics, read_snapshot, snapshot_path


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def knocks(outcome: str, protocol: str = "v1") -> tuple[str, tuple[tuple[str, str], ...]]:
    return ("webknock_knocks_total", (("outcome", outcome), ("protocol", protocol)))


def test_scripted_run_counts(
    tmp_path: Path,
    vector_keys: v1.Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    prom = tmp_path / "textfile" / "webknock.prom"
    prom.parent.mkdir()
    config = write_instance(tmp_path, vector_keys, metrics_file=str(prom), throttle_failures="2")
    cfg = load(config)
    d, fw = memory_daemon(cfg)
    wrong = v1.Keys(*(os.urandom(len(getattr(vector_keys, f))) for f in v1.Keys.__annotations__))
    replayed = frame(openports_packet(vector_keys, "192.0.2.10"), "192.0.2.10")
    bad = frame(openports_packet(wrong, "192.0.2.20"), "192.0.2.20")
    script = [
        submit(cfg, payload=replayed),  # granted
        submit(cfg, vector_keys, "192.0.2.11", [("tcp", 22), ("udp", 51820)]),  # granted
        submit(cfg, payload=frame(getinfo_packet(vector_keys), "192.0.2.12")),  # info
        submit(cfg, vector_keys, "192.0.2.13", [("tcp", 23)]),  # refused: not offered
    ]
    d.drain()
    script += [submit(cfg, payload=replayed)]  # replay (the 1st bad packet of .10)
    d.drain()
    for _ in range(3):  # two bad packets, then .20 is throttled
        script.append(submit(cfg, payload=bad))
        d.drain()
    statuses = [w.result(1)[0] for w in script]  # type: ignore[index]
    assert statuses == [200, 200, 200, 200, 403, 403, 403, 429]
    d.tick()

    assert oct(prom.stat().st_mode & 0o777) == "0o644"
    got = samples(prom.read_text())
    assert got[knocks("granted")] == 2
    assert got[knocks("info")] == 1
    assert got[knocks("refused")] == 1
    assert got[knocks("replay")] == 1
    assert got[knocks("bad_packet")] == 2
    assert got[knocks("throttled")] == 1
    assert got[knocks("error")] == 0 and got[knocks("granted", "v2")] == 0
    assert got[("webknock_grants_live", ())] == 3 == len(fw.held)
    assert got[("webknock_throttled_prefixes", ())] == 1
    assert got[("webknock_spool_backlog", ())] == 0
    assert got[("webknock_up", ())] == 1
    assert got[("webknock_apply_seconds_count", ())] == 1  # the first batch had grants
    assert got[("webknock_apply_seconds_bucket", (("le", "+Inf"),))] == 1
    assert 0 < got[("webknock_apply_seconds_sum", ())] < 1

    snapshot = snapshot_path(cfg)
    assert oct(snapshot.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setattr(daemon, "make_firewall", lambda cfg, **kw: fw)
    code = ctl.main(["--config", str(config), "status", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 3  # no daemon runs (this one is not: it holds no lock)
    metrics = report["metrics"]
    assert metrics["knocks"]["granted"] == {"v1": 2, "v2": 0}
    assert metrics["knocks"]["throttled"]["v1"] == 1
    assert metrics["grants_live"] == 3 and metrics["throttled_prefixes"] == 1
    assert metrics["apply_seconds"]["count"] == 1
    assert ctl.main(["--config", str(config), "status"]) == 3
    assert (
        "2 bad_packet, 2 granted, 1 info, 1 refused, 1 replay, 1 throttled"
        in capsys.readouterr().out
    )


def test_status_without_snapshot_is_null(
    tmp_path: Path,
    vector_keys: v1.Keys,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    config = write_instance(tmp_path, vector_keys)
    monkeypatch.setattr(daemon, "make_firewall", lambda cfg, **kw: MemoryFirewall())
    ctl.main(["--config", str(config), "status", "--json"])
    assert json.loads(capsys.readouterr().out)["metrics"] is None
    assert read_snapshot(load(config)) is None


def test_written_at_most_once_a_second(tmp_path: Path, vector_keys: v1.Keys) -> None:
    prom = tmp_path / "webknock.prom"
    cfg = load(write_instance(tmp_path, vector_keys, metrics_file=str(prom)))
    now = [1000.0]
    d, _ = memory_daemon(cfg, clock=lambda: now[0])
    d.tick()
    first = prom.stat().st_mtime_ns
    d.metrics.knock("granted", "v2")
    now[0] += 0.5
    d.tick()
    assert prom.stat().st_mtime_ns == first and read_snapshot(cfg)["knocks"]["granted"]["v2"] == 0  # type: ignore[index]
    now[0] += 0.6
    d.tick()
    assert samples(prom.read_text())[knocks("granted", "v2")] == 1


def test_write_failure_is_logged_once(
    tmp_path: Path, vector_keys: v1.Keys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "webknockd")
    prom = tmp_path / "missing-dir" / "webknock.prom"
    cfg = load(write_instance(tmp_path, vector_keys, metrics_file=str(prom)))
    now = [1000.0]
    d, _ = memory_daemon(cfg, clock=lambda: now[0])
    for _ in range(3):
        d.tick()
        now[0] += 1.1
    assert caplog.text.count("cannot write metrics") == 1
    prom.parent.mkdir()
    d.tick()
    assert prom.exists() and "metrics written again" in caplog.text


def test_histogram_buckets() -> None:
    m = Metrics(None, None)
    for seconds in (0.0001, 0.003, 0.003, 2.0):
        m.applied(seconds)
    got = samples(m.render())
    bucket = {
        le: got[("webknock_apply_seconds_bucket", (("le", le),))]
        for le in ("0.0005", "0.005", "1", "+Inf")
    }
    assert bucket == {"0.0005": 1, "0.005": 3, "1": 3, "+Inf": 4}
    assert len(BUCKETS) == 11
