#!/usr/bin/env python3
"""Whole client knock time through real nginx + fcgiwrap: first knock vs cached knock.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/knock.py --runs 30

It builds the test lab (server and client namespaces, nginx + fcgiwrap, webknockd,
iptables) and runs the webknock client inside the client namespace with the site's
venv python. It times, in one process and one after the other:

* first   a knock with an empty getinfo cache: getinfo + openports (2 requests);
* cached  a knock with the cache filled by the previous one: openports only (1 request);

and, for the whole command as a user or cron runs it (Python start-up included):

* cmd-first / cmd-cached  `webknock knock` as a new process (via `ip netns exec`),
  cache empty / filled.

Every knock after the first renews the same grant. It prints p50/p99 per kind and
the ratio cached/first (about 0.5 when the server's cost per request dominates).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._lab import settle  # noqa: E402
from tests.lab import SERVER4, deployment  # noqa: E402
from webknock.keys import format_keys  # noqa: E402

#: Runs in the client namespace: knocks `runs` times per kind, prints seconds per knock.
INNER = r"""
import json, sys, time
from pathlib import Path
from webknock.client.targets import knockers_for
from webknock.client.profile import load_profile

profile_path, runs = Path(sys.argv[1]), int(sys.argv[2])
(knocker,) = knockers_for(load_profile(profile_path))
out = {"first": [], "cached": []}
for _ in range(runs):
    knocker.cache.drop()
    t0 = time.perf_counter()
    first = knocker.knock()
    t1 = time.perf_counter()
    cached = knocker.knock()
    t2 = time.perf_counter()
    assert (first.requests, cached.requests) == (2, 1), (first, cached)
    out["first"].append(t1 - t0)
    out["cached"].append(t2 - t1)
print(json.dumps(out))
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="knocks per kind (max 200)")
    args = parser.parse_args()
    runs = max(1, min(args.runs, 200))
    with deployment("nginx") as d, tempfile.TemporaryDirectory() as home:
        settle(d.site.root)
        keys = Path(home) / "lab.keys"
        keys.write_text(format_keys(d.site.keys))
        os.chmod(keys, 0o600)
        profile = Path(home) / "lab.ini"
        profile.write_text(
            f"[client]\nurl = http://{SERVER4}/webknock\nkeys_file = lab.keys\nports = tcp/22\n"
        )
        env = {
            **d.site.env(),
            "PYTHONPATH": str(REPO),
            "HOME": home,
            "XDG_CACHE_HOME": f"{home}/cache",
        }
        py = str(d.site.python)
        inner = d.lab.client.run(
            [py, "-c", INNER, str(profile), str(runs)], env=env, timeout=30 + runs * 10
        )
        times: dict[str, list[float]] = json.loads(inner.stdout)

        cmd = d.lab.client.cmd([py, str(REPO / "client" / "webknock"), "--config", str(profile)])
        cache = Path(home) / "cache" / "webknock"
        times["cmd-first"], times["cmd-cached"] = [], []
        for _ in range(runs):
            for kind in ("cmd-first", "cmd-cached"):
                if kind == "cmd-first":
                    for f in cache.glob("*.json"):
                        f.unlink()
                t0 = time.perf_counter()
                subprocess.run(
                    [*cmd, "-q", "knock"],
                    env=env,
                    check=True,
                    timeout=60,
                    stdout=subprocess.DEVNULL,
                )
                times[kind].append(time.perf_counter() - t0)

    print(f"client knock through nginx+fcgiwrap, {runs} runs per kind")
    print(f"{'kind':<12} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for kind, values in times.items():
        p50, p99 = percentile(values, 0.5) * 1000, percentile(values, 0.99) * 1000
        print(f"{kind:<12} {p50:8.1f} {p99:8.1f} {statistics.fmean(values) * 1000:8.1f}")
    for a, b in (("cached", "first"), ("cmd-cached", "cmd-first")):
        ratio = percentile(times[a], 0.5) / percentile(times[b], 0.5)
        print(f"ratio p50 {a}/{b}: {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
