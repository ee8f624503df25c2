#!/usr/bin/env python3
"""A burst of 1 000 knocks from 1 000 distinct addresses through nginx + fcgiwrap.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/burst.py
    /var/tmp/webknock-venv/bin/python3 bench/burst.py --backends nftables --knocks 2000

For each backend (nftables, iptables+ipset, iptables linear) it deploys the lab server
(nginx + fcgiwrap from the shipped snippet, webknockd), gives the client namespace
--knocks extra addresses from 198.18.0.0/15 (one ``ip -batch``), and sends one v1
openports for tcp/22 from each address, --concurrency at a time. It prints knocks/s, the
replies that were not a success, and the grants lost: knocks answered with success whose
grant is missing from the state file or from the kernel afterwards (target 0). The
baseline of the same run is a getinfo burst from the same addresses (the CGI without the
spool round trip): the ratio says what the daemon path costs under load.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._lab import (
    BACKENDS,
    BENCH_NET,
    filler,
    inner,
    pick,
    require_root,
    settle,
    table,
)
from tests.lab import SERVER4, deployment, run


def burst(params: dict[str, Any]) -> dict[str, Any]:
    """(Inside the client namespace.) One request per address, `concurrency` at a time."""
    from tests.lab.agent import exchange
    from webknock.protocol import messages, v1

    keys = v1.Keys.from_hex(params["keys"])
    addresses = [str(a) for a in filler(params["knocks"])]

    def one(src: str) -> tuple[str, int, bool]:
        now = int(time.time())
        if params["kind"] == "getinfo":
            data = messages.getinfo_request(now)
        else:
            data = messages.openports_request(src, [("tcp", 22)], 3600, now)
        try:
            result = exchange(keys, {"server": SERVER4, "src": src}, data)
        except OSError:
            return src, 0, False
        reply = result["reply"] or {}
        ok = result["status"] == 200 and bool(reply.get("success", params["kind"] == "getinfo"))
        return src, result["status"], ok

    t0 = time.perf_counter()
    with ThreadPoolExecutor(params["concurrency"]) as pool:
        results = list(pool.map(one, addresses))
    seconds = time.perf_counter() - t0
    statuses: dict[str, int] = {}
    for _, status, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "seconds": seconds,
        "ok": [src for src, _, ok in results if ok],
        "failed": sum(not ok for _, _, ok in results),
        "statuses": statuses,
    }


def held(config: str) -> dict[str, Any]:
    """(Inside the server namespace.) Addresses in the kernel and in the state file."""
    from webknock.config import load
    from webknock.server.firewall import make_firewall
    from webknock.server.state import StateStore

    cfg = load(config)
    kernel = [str(k.ip) for k in make_firewall(cfg).listed() if k.port == 22]
    state = [str(g.key.ip) for g in StateStore(cfg.state_file).read().live(time.time())]
    return {"kernel": kernel, "state": state}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--inner", help=argparse.SUPPRESS)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), metavar="NAME")
    parser.add_argument("--knocks", type=int, default=1000, help="distinct addresses (1000)")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight (8)")
    args = parser.parse_args()
    if args.inner:
        params = json.loads(args.inner)
        print(json.dumps(held(params["config"]) if params["kind"] == "held" else burst(params)))
        return 0
    require_root()
    rows = [("backend", "kind", "knocks", "s", "knocks/s", "/getinfo", "not ok", "lost")]
    for backend in pick(args.backends):
        extra = {"ipset": backend.ipset, "result_timeout": "30"}
        with deployment(
            "nginx", backend=backend.backend, protect=backend.protect, extra=extra
        ) as d:
            settle(d.site.root)
            lab = d.lab
            batch = "".join(
                f"address add {ip}/{BENCH_NET.prefixlen} dev {lab.client_if}\n"
                for ip in filler(args.knocks)
            )
            run(lab.client.cmd(["ip", "-batch", "-"]), input=batch)
            lab.server.run(["ip", "route", "add", str(BENCH_NET), "dev", lab.server_if])
            common = {"keys": d.site.keys.to_hex(), "knocks": args.knocks}
            common["concurrency"] = args.concurrency
            wall = 60 + args.knocks
            base = inner(lab.client, "burst", wall, kind="getinfo", **common)
            res = inner(lab.client, "burst", wall, kind="openports", **common)
            have = inner(lab.server, "burst", 300, kind="held", config=str(d.site.config))
            both = set(have["kernel"]) & set(have["state"])
            lost = len(set(res["ok"]) - both)
            base_rate = args.knocks / base["seconds"]
            rate = args.knocks / res["seconds"]
            rows.append(
                (
                    backend.label,
                    "getinfo",
                    str(args.knocks),
                    f"{base['seconds']:.1f}",
                    f"{base_rate:.0f}",
                    "1.00",
                    str(base["failed"]),
                    "-",
                )
            )
            rows.append(
                (
                    backend.label,
                    "openports",
                    str(args.knocks),
                    f"{res['seconds']:.1f}",
                    f"{rate:.0f}",
                    f"{rate / base_rate:.2f}",
                    f"{res['failed']} {res['statuses']}" if res["failed"] else "0",
                    str(lost),
                )
            )
            print(table(rows), "\n", flush=True)
    print("burst of knocks from distinct addresses through nginx + fcgiwrap")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
