#!/usr/bin/env python3
"""Cost of one CGI request through real nginx + fcgiwrap, against baselines of the same run.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/cgi.py --requests 200

It builds the test lab (server and client network namespaces, nginx + fcgiwrap from the
shipped snippet, webknockd, nftables by default), serves three baseline CGIs beside ours,
and times requests sent one at a time from the client namespace, each on a fresh
connection, in interleaved rounds (every kind once per round, in a seeded shuffled order,
so drift of the host hits all kinds alike), for the kinds below. Every baseline ends as
ours does (answer, flush, os._exit: no interpreter teardown):

* print-only    a Python CGI that only prints a reply, started as ours (the floor of any
                Python CGI: the interpreter line, its -IS, the venv's path);
* print-site    the same started as Python starts by default (site: every .pth file of the
                system's site-packages), for what -IS saves (no budget);
* imports-only  a CGI that imports what ours imports for an openports, then prints (to
                see what our imports cost; no budget);
* junk          our CGI, a POST whose `data` is not base64 of 512-byte blocks;
* getinfo       our CGI, a valid getinfo (relayed: webknockd verifies and answers);
* open-new      our CGI, openports from an address without a grant (spool round trip);
* open-renew    our CGI, openports renewing that address's grant;
* v2-getinfo, v2-open-new, v2-open-renew: the same with protocol v2 (an enrolled client's
                Ed25519 key; its grants are of tcp/2222, so they never meet v1's).

It prints p50/p90 per kind and the figures the latency budget is about: getinfo and
open-new (v1 and v2) each at most 1.3 x print-only + 2 ms (p50), and junk / print-only.
Numbers depend on the host; the ratios compare runs of the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench._lab import cpu_reference, settle  # noqa: E402
from tests.lab import SERVER6, deployment  # noqa: E402

REPLY = "Status: 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n"
#: Every baseline ends as ours does: answer, flush, and end the process at once
#: (webknock.cgi.relay.main): an interpreter teardown, which ours never runs, kept the web server
#: waiting (imports-only measured 18 ms more with it).
END = """sys.stdout.flush()
import os
os._exit(0)
"""
PRINT_ONLY = f"""import sys
sys.stdout.write("{REPLY}")
{END}"""
#: The baseline CGIs' bodies by kind: print-only and print-site print a reply; imports-only
#: imports what our CGI imports on the openports path, as a plain script would, and prints.
#: Each then ends as ours does.
BASELINES = {
    "print-only": PRINT_ONLY,
    "print-site": PRINT_ONLY,
    "imports-only": f"""import sys
import webknock.cgi.relay, webknock.cgi.conf, webknock.spool.request, webknock.spool.doorbell
import webknock.protocol.transport
sys.stdout.write("{REPLY}")
{END}""",
}

#: Runs in the client namespace: sends the requests of one kind, prints seconds per request.
CLIENT = r"""
import http.client, json, random, sys, time
from webknock.protocol import messages, transport, v1, v2

spec = json.loads(sys.stdin.read())
keys = v1.Keys.from_hex(spec["keys"])
client = v2.SigningKey.from_seed(bytes.fromhex(spec["v2_seed"]))
server_kid = bytes.fromhex(spec["v2_server_kid"])
PATHS = {k: "/bench-" + k for k in ("print-only", "print-site", "imports-only")}

def body(kind, src):
    now = int(time.time())
    if kind in PATHS or kind == "junk":
        return b"data=" + b"!" * 683
    if kind.startswith("v2-"):
        req = {"api": "getinfo", "ts": now, "nonce": v2.new_nonce()}
        if kind != "v2-getinfo":
            req.update(api="openports", ip=src, ports=["tcp/2222"], time=3600)
        packet = v2.encode_request(client, server_kid, v2.dumps(req))
        return b"v2=" + transport.encode_field(packet).encode()
    if kind == "getinfo":
        data = messages.getinfo_request(now)  # with a nonce: not a replay within a second
    else:
        # the lab's max_time: no grant expires before the end of the longest run (2 000
        # rounds, ~20 min), so that the count of grants at the end checks every knock
        data = messages.openports_request(src, [("tcp", 22)], 3600, now)
    return b"data=" + transport.encode_field(v1.encode(keys, data)).encode()

def send(kind, src):
    data = body(kind, src)
    conn = http.client.HTTPConnection(spec["server"], 80, timeout=30, source_address=(src, 0))
    t0 = time.perf_counter()
    conn.request("POST", PATHS.get(kind, "/webknock"), data,
                 {"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    took = time.perf_counter() - t0
    conn.close()
    return [took, resp.status]

# Interleaved rounds: every kind once per round, in a shuffled order, so that drift of the
# host (other load, CPU frequency) hits baselines and our CGI alike, and every kind follows
# every other equally often (what the previous request leaves running, a process's exit,
# must not always weigh on the same kind).
kinds = spec["kinds"]
rng = random.Random(spec["seed"])
out = {k: [] for k in kinds}
for src in spec["sources"]:
    for kind in rng.sample(kinds, len(kinds)):
        out[kind].append(send(kind, src))
        if kind in ("open-new", "v2-open-new"):
            renew = kind.replace("new", "renew")
            out.setdefault(renew, []).append(send(renew, src))
print(json.dumps(out))
"""

EXPECTED_STATUS = {
    "print-only": 200,
    "print-site": 200,
    "imports-only": 200,
    "junk": 403,
    "getinfo": 200,
    "open-new": 200,
    "v2-getinfo": 200,
    "v2-open-new": 200,
    "v2-open-renew": 200,
    "open-renew": 200,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def median_difference_interval(
    a: list[float], b: list[float], rounds: int = 1000, seed: int = 1
) -> tuple[float, float]:
    """95% bootstrap interval of median(a) - median(b): how far the budget's figure can be
    moved by the noise of one run (each CGI varies by ~10 ms; the budget is 3)."""
    rng = random.Random(seed)
    diffs = sorted(
        statistics.median(rng.choices(a, k=len(a))) - statistics.median(rng.choices(b, k=len(b)))
        for _ in range(rounds)
    )
    return diffs[int(0.025 * rounds)], diffs[int(0.975 * rounds) - 1]


#: What a round sends, each once (open-new is followed by its open-renew).
KINDS = (
    "print-only",
    "print-site",
    "imports-only",
    "junk",
    "getinfo",
    "open-new",
    "v2-getinfo",
    "v2-open-new",
)


def run_rounds(d: Any, sources: list[str], kinds: list[str]) -> dict[str, list[float]]:
    """Send one request of every kind per source address; seconds per request by kind."""
    spec = {
        "keys": d.site.keys.to_hex(),
        "v2_seed": BENCH_SEED.hex(),
        "v2_server_kid": d.site.server_key.kid.hex(),
        "server": SERVER6,
        "sources": sources,
        "kinds": kinds,
        "seed": len(sources),
    }
    proc = d.lab.client.run(
        [str(d.site.python), "-c", CLIENT],
        input=json.dumps(spec),
        timeout=1800,
        env={**d.site.env(), "PYTHONPATH": str(REPO)},
    )
    results: dict[str, list[list[float]]] = json.loads(proc.stdout)
    for kind, timings in results.items():
        bad = [s for _, s in timings if s != EXPECTED_STATUS[kind]]
        if bad:
            raise SystemExit(f"{kind}: unexpected statuses {sorted(set(bad))}\n{d.diagnostics()}")
    return {kind: [t for t, _ in timings] for kind, timings in results.items()}


#: The v2 client the bench knocks as (a fixed seed: a benchmark, not a secret).
BENCH_SEED = bytes(range(100, 132))


def enrol(d: Any) -> None:
    """Enrol the bench's v2 client for tcp/2222 (a file in clients_dir, as `webknockctl
    client add` writes it)."""
    from webknock.protocol.v2 import SigningKey
    from webknock.server.clients import Client

    key = SigningKey.from_seed(BENCH_SEED)
    d.site.clients_dir.mkdir(mode=0o755, exist_ok=True)
    client = Client("bench", key.public, "bench", ports=frozenset({("tcp", 2222)}))
    (d.site.clients_dir / "bench.conf").write_text(client.render())


def serve_baselines(d: Any) -> None:
    """The baseline CGIs beside ours, each at its own URL of the same nginx + fcgiwrap
    (a copy of the shipped location block), then reload nginx. They start as ours does:
    its shim up to the import of webknock.cgi (interpreter line, flags, path), then their
    own body; print-site starts as Python does by default (site, every .pth)."""
    snippet = (d.web.dir / "webknock.conf").read_text()
    ours = str(d.site.cgi)
    start, found, _ = d.site.cgi.read_text().partition("from webknock.cgi.relay import main")
    if not found:
        raise SystemExit(f"{d.site.cgi}: no import of webknock.cgi to start the baselines from")
    blocks = []
    for kind, script in BASELINES.items():
        cgi = d.site.cgi.with_name(f"bench-{kind}.cgi")
        head = f"#!{d.site.python}\n" if kind == "print-site" else start
        cgi.write_text(head + script)
        os.chmod(cgi, 0o755)
        blocks.append(
            snippet.replace("location = /webknock", f"location = /bench-{kind}").replace(
                ours, str(cgi)
            )
        )
    (d.web.dir / "webknock.conf").write_text(snippet + "\n".join(blocks))
    d.lab.server.run(["nginx", "-c", str(d.web.dir / "nginx.conf"), "-s", "reload"])
    time.sleep(1.0)  # old workers finish, new ones serve the added locations


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per kind (≤ 2000)")
    parser.add_argument(
        "--backend",
        choices=("nftables", "iptables"),
        default="nftables",
        help="firewall backend of the server (default nftables, what auto picks)",
    )
    parser.add_argument(
        "--kinds",
        nargs="+",
        choices=KINDS,
        default=list(KINDS),
        metavar="KIND",
        help=f"what each round sends (default all: {', '.join(KINDS)}); getinfo and open-new "
        "are always sent (fewer kinds: more rounds in the same time)",
    )
    args = parser.parse_args()
    kinds = [k for k in KINDS if k in {*args.kinds, "getinfo", "open-new"}]
    n = max(10, min(args.requests, 2000))
    if os.geteuid() != 0:
        raise SystemExit("bench/cgi.py: run as root (it builds network namespaces)")
    limits = {"max_grants_per_prefix": "100000"}  # every bench address is in one /64
    with deployment(
        "nginx", backend=args.backend, protect=args.backend == "nftables", extra=limits
    ) as d:
        settle(d.site.root)
        serve_baselines(d)
        enrol(d)
        sources = [f"2001:db8::2:{i:x}" for i in range(1, n + 11)]
        batch = "".join(f"addr add {a}/64 dev {d.lab.client_if} nodad\n" for a in sources)
        d.lab.client.run(["ip", "-batch", "-"], input=batch)
        run_rounds(d, sources[n:], kinds)  # warm the page cache
        results = run_rounds(d, sources[:n], kinds)
        grants = len(d.list_json())
    ms = {k: (percentile(v, 0.5) * 1e3, percentile(v, 0.9) * 1e3) for k, v in results.items()}
    print(f"CGI through nginx + fcgiwrap, {n} requests per kind, one at a time, {args.backend}")
    print(f"each round: {', '.join(kinds)} (shuffled), open-renew after open-new")
    print(f"host speed: {cpu_reference():.1f} ms for the reference loop (lower is faster)")
    print(f"{'kind':14} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for kind, (p50, p90) in ms.items():
        print(f"{kind:14} {p50:8.2f} {p90:8.2f} {statistics.mean(results[kind]) * 1e3:8.2f}")
    expected = (n + 10) * (1 + ("v2-open-new" in kinds))
    print(f"grants after the run: {grants} (expected {expected})")
    print("budget (p50): at most 1.3 x print-only + 2 ms")
    if "print-only" in ms:
        budget = 1.3 * ms["print-only"][0] + 2
        budgeted = ("getinfo", "open-new", "open-renew", "v2-getinfo", "v2-open-new")
        for kind in (k for k in budgeted if k in ms):
            verdict = "met" if ms[kind][0] <= budget else "NOT MET"
            print(f"  {kind:22}{ms[kind][0]:6.2f} ms of {budget:.2f} ms  {verdict}")
    print("ratios (p50):")
    if {"junk", "print-only"} <= ms.keys():
        print(f"  junk / print-only       {ms['junk'][0] / ms['print-only'][0]:.2f}")
    if {"print-site", "print-only"} <= ms.keys():
        saved = ms["print-site"][0] - ms["print-only"][0]
        print(f"  print-site - print-only {saved:+.2f} ms  (what starting with -IS saves)")
    if "imports-only" in ms:
        ratio = ms["getinfo"][0] / ms["imports-only"][0]
        print(f"  getinfo / imports-only  {ratio:.2f}")
    for kind, budget in (("open-new", ""), ("open-renew", "")):
        low, high = median_difference_interval(results[kind], results["getinfo"])
        label = f"{kind} - getinfo"
        print(
            f"  {label:24}{ms[kind][0] - ms['getinfo'][0]:+.2f} ms{budget}"
            f"  95% interval {low * 1e3:+.2f} .. {high * 1e3:+.2f} ms"
        )
    print("paired (median over rounds of the difference within a round, which cancels drift):")
    for kind in ("open-new", "open-renew"):
        paired = [a - b for a, b in zip(results[kind], results["getinfo"], strict=True)]
        label = f"{kind} - getinfo"
        print(f"  {label:24}{statistics.median(paired) * 1e3:+.2f} ms")
    return 0 if grants == expected else 1


if __name__ == "__main__":
    sys.exit(main())
