#!/usr/bin/env python3
"""Cost of one CGI request through real nginx + fcgiwrap, against baselines of the same run.

Run as root from the repository (after `tests/run` made the venv), e.g.:

    /var/tmp/webknock-venv/bin/python3 bench/cgi.py --requests 200

It builds the test lab (server and client network namespaces, nginx + fcgiwrap from the
shipped snippet, webknockd, iptables), then times requests sent one at a time from the
client namespace, each on a fresh connection, for:

* print-only    a Python CGI that only prints a reply (the floor of any Python CGI);
* imports-only  a CGI that imports what ours imports for an openports, then prints;
* junk          our CGI, a POST whose `data` is not base64 of 512-byte blocks;
* getinfo       our CGI, a valid getinfo;
* open-new      our CGI, openports from an address without a grant (spool round trip);
* open-renew    our CGI, openports renewing that address's grant.

It prints p50/p90 per kind and the ratios the latency budget is about:
junk / print-only (≤ 1.3), getinfo / imports-only (≤ 1.2), open-new - getinfo (≤ 3 ms).
Numbers depend on the host; the ratios compare runs of the same moment.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.lab import SERVER6, deployment  # noqa: E402

REPLY = "Status: 200 OK\\r\\nContent-Type: text/plain\\r\\nContent-Length: 3\\r\\n\\r\\nok\\n"
PRINT_ONLY = f"""import sys
sys.stdout.write("{REPLY}")
"""

#: What our CGI imports on the openports path, as a plain script would import it.
IMPORTS_ONLY = f"""import sys
import webknock.cgi, webknock.config, webknock.throttle, webknock.keys, webknock.cgi_wait
import webknock.protocol.v1, webknock.protocol.messages, webknock.spool, webknock.inotify
sys.stdout.write("{REPLY}")
"""

#: Runs in the client namespace: sends the requests of one kind, prints seconds per request.
CLIENT = r"""
import http.client, json, sys, time
from webknock.protocol import messages, transport, v1

spec = json.loads(sys.stdin.read())
keys = v1.Keys.from_hex(spec["keys"])

def body(kind, src):
    now = int(time.time())
    if kind == "junk":
        return b"data=" + b"!" * 683
    if kind == "getinfo":
        data = messages.getinfo_request(now)  # with a nonce: not a replay within a second
    else:
        data = messages.openports_request(src, [("tcp", 22)], 600, now)
    return b"data=" + transport.encode_field(v1.encode(keys, data)).encode()

out = []
for src in spec["sources"]:
    data = body(spec["kind"], src)
    conn = http.client.HTTPConnection(spec["server"], 80, timeout=30, source_address=(src, 0))
    t0 = time.perf_counter()
    conn.request("POST", "/webknock", data, {"Content-Type": "application/x-www-form-urlencoded"})
    resp = conn.getresponse()
    resp.read()
    out.append([time.perf_counter() - t0, resp.status])
    conn.close()
print(json.dumps(out))
"""

EXPECTED_STATUS = {
    "print-only": 200,
    "imports-only": 200,
    "junk": 403,
    "getinfo": 200,
    "open-new": 200,
    "open-renew": 200,
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run_kind(d: Any, kind: str, sources: list[str]) -> list[float]:
    spec = {"keys": d.site.keys.to_hex(), "server": SERVER6, "sources": sources}
    spec["kind"] = "junk" if kind in ("print-only", "imports-only", "junk") else kind
    spec["kind"] = "openports" if kind.startswith("open-") else spec["kind"]
    proc = d.lab.client.run(
        [str(d.site.python), "-c", CLIENT],
        input=json.dumps(spec),
        timeout=600,
        env={**d.site.env(), "PYTHONPATH": str(REPO)},
    )
    timings = json.loads(proc.stdout)
    bad = [s for _, s in timings if s != EXPECTED_STATUS[kind]]
    if bad:
        raise SystemExit(f"{kind}: unexpected statuses {sorted(set(bad))}\n{d.diagnostics()}")
    return [t for t, _ in timings]


def swap_cgi(d: Any, body: str | None, original: str) -> None:
    """Put a baseline script (or ours again) where nginx runs the CGI."""
    text = original if body is None else f"#!{d.site.python}\n{body}"
    tmp = d.site.cgi.with_suffix(".tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, d.site.cgi)


def server_deps() -> Path:
    """The server's pinned dependencies alone (as install.sh puts them in /opt/webknock),
    without the test tools and the client's `requests`: every .pth and package on the
    CGI's path costs each request, so the lab must not carry more than production."""
    target = Path("/var/tmp/webknock-bench-server-deps")
    pins = [
        line.split("#")[0].strip()
        for line in (REPO / "requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip() and not line.startswith("requests")
    ]
    stamp = target / ".pins"
    if not stamp.exists() or stamp.read_text() != "\n".join(pins):
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--disable-pip-version-check",
                "--upgrade",
                "--target",
                str(target),
                *pins,
            ],
            check=True,
        )
        stamp.write_text("\n".join(pins))
    os.chmod(target, 0o755)
    return target


def use_server_deps(d: Any, deps: Path) -> None:
    """Point the lab site's venv at the server-only dependencies."""
    pth = next((d.site.python.parent.parent / "lib").glob("python3*/site-packages"))
    (pth / "webknock-lab.pth").write_text(f"{d.site.root / 'lib'}\n{deps}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per kind (≤ 2000)")
    args = parser.parse_args()
    n = max(10, min(args.requests, 2000))
    if os.geteuid() != 0:
        raise SystemExit("bench/cgi.py: run as root (it builds network namespaces)")
    results: dict[str, list[float]] = {}
    deps = server_deps()
    with deployment("nginx") as d:
        use_server_deps(d, deps)
        d.site.stop_daemon()  # restart it on the same dependencies as the CGI
        d.site.start_daemon(d.lab.server)
        sources = [f"2001:db8::2:{i:x}" for i in range(1, n + 1)]
        batch = "".join(f"addr add {a}/64 dev {d.lab.client_if} nodad\n" for a in sources)
        d.lab.client.run(["ip", "-batch", "-"], input=batch)
        original = d.site.cgi.read_text()
        for kind, script in (("print-only", PRINT_ONLY), ("imports-only", IMPORTS_ONLY)):
            swap_cgi(d, script, original)
            run_kind(d, kind, sources[:10])  # warm the page cache
            results[kind] = run_kind(d, kind, sources)
        swap_cgi(d, None, original)
        run_kind(d, "junk", sources[:10])
        for kind in ("junk", "getinfo", "open-new", "open-renew"):
            results[kind] = run_kind(d, kind, sources)
        grants = len(d.list_json())
    ms = {k: (percentile(v, 0.5) * 1e3, percentile(v, 0.9) * 1e3) for k, v in results.items()}
    print(f"CGI through nginx + fcgiwrap, {n} requests per kind, one at a time")
    print(f"{'kind':14} {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}")
    for kind, (p50, p90) in ms.items():
        print(f"{kind:14} {p50:8.2f} {p90:8.2f} {statistics.mean(results[kind]) * 1e3:8.2f}")
    print(f"grants after the run: {grants} (expected {n})")
    print("ratios (p50):")
    print(f"  junk / print-only       {ms['junk'][0] / ms['print-only'][0]:.2f}  (budget 1.3)")
    print(f"  getinfo / imports-only  {ms['getinfo'][0] / ms['imports-only'][0]:.2f}  (budget 1.2)")
    print(f"  open-new - getinfo      {ms['open-new'][0] - ms['getinfo'][0]:+.2f} ms  (budget 3)")
    print(f"  open-renew - getinfo    {ms['open-renew'][0] - ms['getinfo'][0]:+.2f} ms")
    return 0 if grants == n else 1


if __name__ == "__main__":
    sys.exit(main())
