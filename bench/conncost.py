#!/usr/bin/env python3
"""New-connection cost to a granted port at 10 000 grants against no other grants.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/conncost.py
    /var/tmp/webknock-venv/bin/python3 bench/conncost.py --connects 5000 --counts 0 1000 10000

For each backend (nftables, iptables+ipset, iptables linear) it builds a lab server with
a TCP listener on port 22, puts N grants of other addresses into the state file and the
kernel, then grants the client (``webknockctl grant``: for the linear chain its rule
comes last, the worst case), and times --connects TCP connects from the client namespace
to the granted port, one at a time, each closed with a reset. The daemon is not running,
so nothing else competes for the CPU. It prints the time per connect (p50, mean) and the
ratio of the mean to the same backend's mean at 0 other grants (baseline of the same run).
"""

from __future__ import annotations

import argparse
import json
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lab import (
    BACKENDS,
    fill_state_and_kernel,
    inner,
    percentiles,
    pick,
    require_root,
    server,
    table,
)
from tests.lab import CLIENT4, SERVER4, start_listeners, stop_process

LINGER_RESET = struct.pack("ii", 1, 0)


def connect_loop(connects: int, budget: float) -> dict[str, Any]:
    """(Inside the client namespace.) Time TCP connects to the granted port."""
    times: list[float] = []
    refused = 0
    deadline = time.monotonic() + budget
    for _ in range(connects):
        if time.monotonic() > deadline:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
            s.settimeout(2)
            s.bind((CLIENT4, 0))
            t0 = time.perf_counter()
            try:
                s.connect((SERVER4, 22))
            except OSError:
                refused += 1
                continue
            times.append(time.perf_counter() - t0)
    return {**percentiles(times), "refused": refused}


def run_inner(params: dict[str, Any]) -> dict[str, Any]:
    if params["step"] == "fill":
        return {"sync_s": fill_state_and_kernel(params["config"], params["count"], 3600)}
    return connect_loop(params["connects"], params["budget"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), metavar="NAME")
    parser.add_argument("--counts", nargs="+", type=int, default=[0, 10000])
    parser.add_argument("--connects", type=int, default=2000, help="connects per N (2000)")
    parser.add_argument("--budget", type=float, default=30, help="seconds per N (30)")
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(run_inner(json.loads(args.inner))))
        return 0
    require_root()
    rows = [("backend", "grants", "n", "p50 us", "mean us", "mean/base", "refused")]
    for backend in pick(args.backends):
        base = None
        with server(backend) as (lab, site):
            listener = start_listeners(lab.server, site)
            try:
                for count in args.counts:
                    cfg = str(site.config)
                    inner(lab.server, "conncost", 600, step="fill", config=cfg, count=count)
                    site.ctl(lab.server, "grant", CLIENT4, "--port", "22", "--time", "3600")
                    res = inner(
                        lab.client,
                        "conncost",
                        args.budget + 60,
                        step="connect",
                        connects=args.connects,
                        budget=args.budget,
                    )
                    base = base or res["mean_ms"]
                    rows.append(
                        (
                            backend.label,
                            str(count),
                            str(res["n"]),
                            f"{res['p50_ms'] * 1000:.1f}",
                            f"{res['mean_ms'] * 1000:.1f}",
                            f"{res['mean_ms'] / base:.2f}",
                            str(res["refused"]),
                        )
                    )
                    print(table(rows), "\n", flush=True)
            finally:
                stop_process(listener)
    print("new-connection cost to a granted port (TCP connect, client namespace)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
