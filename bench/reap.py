#!/usr/bin/env python3
"""Reap of 10 000 expired grants: one batch, target at most 1 s, per backend.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/reap.py
    /var/tmp/webknock-venv/bin/python3 bench/reap.py --backends nftables ipset --count 20000

For each backend (nftables, iptables+ipset, iptables linear) it builds a lab server, puts
--count grants into the state file and the kernel, and times ``GrantEngine.reap`` at a
moment when all of them have expired in the state file while the kernel still holds them
(the worst case: the daemon was down and the kernel's own timeouts have not fired yet).
It checks that the reap took exactly one firewall batch and left the kernel and the state
file empty, and prints the seconds, the ratio to the same backend's reap of one grant
(baseline of the same run) and to the 1 s target.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lab import (
    BACKENDS,
    fill_state_and_kernel,
    pick,
    require_root,
    server,
    table,
)
from bench._lab import inner as inner_run

TARGET_S = 1.0


def reap_once(config: str, count: int) -> dict[str, Any]:
    """(Inside the server namespace.) Fill, then time one reap of everything."""
    from webknock.config import load
    from webknock.server.engine import GrantEngine
    from webknock.server.firewall import make_firewall
    from webknock.server.state import StateStore

    fill_state_and_kernel(config, count, 3600)
    cfg = load(config)
    firewall = make_firewall(cfg)
    batches = 0
    apply = firewall.apply

    def counted(*args: Any, **kw: Any) -> None:
        nonlocal batches
        batches += 1
        apply(*args, **kw)

    firewall.apply = counted  # type: ignore[method-assign]
    engine = GrantEngine(cfg.instance, StateStore(cfg.state_file), firewall)
    t0 = time.perf_counter()
    gone = engine.reap(time.time() + 7200)
    seconds = time.perf_counter() - t0
    left = len(firewall.listed()) + len(engine.store.read().all())
    return {"seconds": seconds, "reaped": len(gone), "batches": batches, "left": left}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), metavar="NAME")
    parser.add_argument("--count", type=int, default=10000, help="expired grants (10000)")
    args = parser.parse_args()
    if args.inner:
        params = json.loads(args.inner)
        print(json.dumps(reap_once(params["config"], params["count"])))
        return 0
    require_root()
    rows = [("backend", "grants", "reap s", "batches", "left", "/1 grant", "/target 1 s")]
    for backend in pick(args.backends):
        with server(backend) as (lab, site):
            base = None
            for count in (1, args.count):
                res = inner_run(lab.server, "reap", 900, config=str(site.config), count=count)
                base = base or res["seconds"]
                rows.append(
                    (
                        backend.label,
                        str(res["reaped"]),
                        f"{res['seconds']:.3f}",
                        str(res["batches"]),
                        str(res["left"]),
                        f"{res['seconds'] / base:.1f}",
                        f"{res['seconds'] / TARGET_S:.2f}",
                    )
                )
                print(table(rows), "\n", flush=True)
    print("reap of expired grants still held by the kernel (state + kernel, one batch)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
