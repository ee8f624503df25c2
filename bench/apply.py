#!/usr/bin/env python3
"""Apply latency, spool to kernel, at 0, 1 000 and 10 000 live grants, per backend.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/apply.py
    /var/tmp/webknock-venv/bin/python3 bench/apply.py --backends nftables --samples 100

For each backend (nftables, iptables+ipset, iptables linear) it builds a lab server,
puts N live grants into the state file and the kernel, starts webknockd (which reconciles
them), then writes one openports request at a time into the spool as the CGI does and
times it until the daemon's result is read from the doorbell (the spool round trip; the
daemon answers only after the kernel batch and the state commit, so this bounds
spool-to-kernel from above; watching the kernel with `nft monitor` instead would load the
2 cores we measure on). Each request opens tcp/22 for a new address. It prints p50/p99 per
N and the ratio of each p50 to the same backend's p50 at 0 grants (the baseline of the
same run). Samples per N are bounded by --samples and by --budget seconds.
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
    cpu_reference,
    fill_state_and_kernel,
    filler,
    inner,
    percentiles,
    pick,
    require_root,
    server,
    table,
)


def knock_loop(config: str, start: int, samples: int, budget: float) -> dict[str, Any]:
    """(Inside the server namespace.) For fresh addresses, one at a time: request written as
    the CGI writes it (its doorbell first) -> the daemon's result read from the doorbell."""
    from webknock.config import load
    from webknock.keys import load_keys
    from webknock.protocol import messages, v1
    from webknock.spool.doorbell import wait_bell
    from webknock.spool.request import (
        encode_request,
        install_bell,
        new_request_id,
        remove_bell,
        write_request,
    )

    cfg = load(config)
    keys = load_keys(cfg.keys_file)
    times: list[float] = []
    failed = 0
    deadline = time.monotonic() + budget
    for ip in filler(samples, start):
        if time.monotonic() > deadline:
            break
        rid = new_request_id()
        bell_path = str(cfg.spool.waits / rid)
        data = messages.openports_request(str(ip), [("tcp", 22)], 3600, int(time.time()))
        payload = encode_request("v1", str(ip), "", "bench", v1.encode(keys, data))
        bell = install_bell(bell_path)
        try:
            t0 = time.perf_counter()
            write_request(cfg.spool.requests, rid, payload)
            result = wait_bell(bell, 10)
            times.append(time.perf_counter() - t0)
        finally:
            remove_bell(bell_path, bell)
        failed += not (result and result[0] == 200)
    return {**percentiles(times), "failed": failed}


def run_inner(params: dict[str, Any]) -> dict[str, Any]:
    if params["step"] == "fill":
        return {"sync_s": fill_state_and_kernel(params["config"], params["count"], 3600)}
    return knock_loop(params["config"], params["start"], params["samples"], params["budget"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), metavar="NAME")
    parser.add_argument("--counts", nargs="+", type=int, default=[0, 1000, 10000])
    parser.add_argument("--samples", type=int, default=200, help="requests per N (200)")
    parser.add_argument("--budget", type=float, default=30, help="seconds per N (30)")
    args = parser.parse_args()
    if args.inner:
        print(json.dumps(run_inner(json.loads(args.inner))))
        return 0
    require_root()
    rows = [("backend", "grants", "sync s", "n", "p50 ms", "p99 ms", "p50/base", "failed", "host")]
    for backend in pick(args.backends):
        base = None
        with server(backend) as (lab, site):
            for count in args.counts:
                site.stop_daemon()
                fill = inner(
                    lab.server, "apply", 600, step="fill", config=str(site.config), count=count
                )
                site.start_daemon(lab.server)
                res = inner(
                    lab.server,
                    "apply",
                    args.budget + 120,
                    step="knock",
                    config=str(site.config),
                    start=count,
                    samples=args.samples,
                    budget=args.budget,
                )
                base = base or res["p50_ms"]
                rows.append(
                    (
                        backend.label,
                        str(count),
                        f"{fill['sync_s']:.2f}",
                        str(res["n"]),
                        f"{res['p50_ms']:.2f}",
                        f"{res['p99_ms']:.2f}",
                        f"{res['p50_ms'] / base:.2f}",
                        str(res["failed"]),
                        f"{cpu_reference():.1f}",
                    )
                )
                print(table(rows), "\n", flush=True)
    print("host: the host's speed after the row, ms for a reference loop (lower is faster)")
    print("apply latency: request written into the spool -> the daemon's result read")
    print("(the kernel has the grant before that: the result follows the batch and the commit)")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
