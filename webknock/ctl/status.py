"""``webknockctl status``: is the daemon running, the spool backlog, the grants, whether the
firewall holds what the state file says, and the daemon's own figures (its metrics)."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from webknock.config import ServerConfig
from webknock.ctl.common import EXIT_ATTENTION, EXIT_OK, engine_for


def cmd_status(cfg: ServerConfig, args: argparse.Namespace) -> int:
    """Print the report (--json: as JSON); EXIT_ATTENTION when the daemon is down or the
    firewall differs."""
    from webknock.server.claim import spool_backlog
    from webknock.server.daemon import daemon_running
    from webknock.server.metrics import read_snapshot

    now = time.time()
    pid = daemon_running(cfg)
    engine = engine_for(cfg)
    store = engine.store
    live = store.read().live(now)
    expired = store.read().expired(now)
    try:
        backlog = spool_backlog(cfg.spool)
    except OSError:
        backlog = -1
    drift = engine.drift(now)
    addresses = len({g.key.ip_text for g in live})  # a network grant counts once
    report: dict[str, Any] = {
        "instance": cfg.instance,
        "daemon": {
            "running": pid is not None,
            "pid": pid,
            "start": None if pid else start_hint(cfg),
        },
        "backend": engine.firewall.describe(),
        "spool_backlog": backlog,
        "grants": {
            "live": len(live),
            "expired_unreaped": len(expired),
            "addresses": addresses,
        },
        "firewall_agrees": drift.clean,
        "drift": {
            "missing": [str(k) for k in drift.missing],
            "extra": [str(k) for k in drift.extra],
            "duplicates": [str(k) for k in drift.duplicates],
        },
        "metrics": read_snapshot(cfg),  # the daemon's figures (webknock.server.metrics), or null
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"instance:        {cfg.instance} ({cfg.source})")
        print(f"daemon:          {'running, pid ' + str(pid) if pid else 'NOT RUNNING'}")
        if not pid:
            print(f"  start it:      {start_hint(cfg)}")
        print(f"backend:         {report['backend']}")
        print(f"spool backlog:   {backlog}")
        print(
            f"grants:          {len(live)} live for {addresses} "
            f"address(es), {len(expired)} expired not yet reaped"
        )
        if report["metrics"]:
            knocks = report["metrics"].get("knocks", {})
            counts = {o: sum(by.values()) for o, by in knocks.items() if sum(by.values())}
            summary = ", ".join(f"{n} {o}" for o, n in counts.items()) or "none"
            print(f"knocks:          {summary} (since the daemon started)")
        if drift.clean:
            print("firewall:        agrees with the state file")
        else:
            print(
                f"firewall:        DIFFERS: {len(drift.missing)} missing, {len(drift.extra)} "
                f"extra, {len(drift.duplicates)} duplicate (fix: webknockctl reconcile)"
            )
    return EXIT_OK if pid and drift.clean else EXIT_ATTENTION


def start_hint(cfg: ServerConfig) -> str:
    """How to start this instance's webknockd here: with systemd as PID 1 its unit, else
    the spool's tmpfs and the daemon by hand, as the unit would."""
    if os.path.isdir("/run/systemd/system"):
        unit = f"webknockd@{cfg.instance}"
        return f"systemctl start {unit}  (logs: journalctl -u {unit})"
    return (
        f"webknockctl --config {cfg.source} prepare-spool && "
        f"setsid webknockd --config {cfg.source} --syslog &  (no systemd: see README)"
    )
