"""Shared helpers of the bench scripts: backends, the lab, inner runs inside a namespace.

Every bench builds its own throwaway lab (tests/lab: server and client namespaces, a site
deployed as the installer would) and runs the measuring part *inside* the server or
client namespace by re-running its own module there (``ip netns exec NS python -m
bench.X --inner ...``), which prints one JSON object. Root only; counts and wall time
are bounded.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.lab import (  # noqa: E402 - after the path set-up above
    Lab,
    Netns,
    Site,
    close_server_firewall,
    run,
    shared_venv,
)

#: Source addresses of the filler grants and of burst clients (RFC 2544 benchmark range).
BENCH_NET = ipaddress.IPv4Network("198.18.0.0/15")


@dataclass(frozen=True)
class Backend:
    """One firewall variant: the config settings that select it."""

    label: str
    backend: str
    ipset: str
    protect: bool

    def site(self, **extra: str) -> Site:
        return Site(
            backend=self.backend,
            protect=self.protect,
            extra={"ipset": self.ipset, **extra},
        )


BACKENDS = {
    "nftables": Backend("nftables", "nftables", "no", True),
    "ipset": Backend("iptables+ipset", "iptables", "yes", False),
    "linear": Backend("iptables linear", "iptables", "no", False),
}


def pick(names: Sequence[str]) -> list[Backend]:
    unknown = [n for n in names if n not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend {unknown[0]!r}: choose from {', '.join(BACKENDS)}")
    return [BACKENDS[n] for n in names]


def filler(count: int, start: int = 0) -> list[ipaddress.IPv4Address]:
    """`count` distinct addresses from the benchmark range."""
    if start + count > BENCH_NET.num_addresses - 2:
        raise SystemExit(f"at most {BENCH_NET.num_addresses - 2} filler addresses")
    return [BENCH_NET.network_address + 1 + start + i for i in range(count)]


def cpu_reference() -> float:
    """Milliseconds one core takes for a fixed pure-Python loop (best of 5): how fast this
    host is right now. A VM's speed can change by 2x within minutes; print this beside the
    figures so that runs of different moments can be compared."""
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        total = 0
        for i in range(300_000):
            total += i
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


#: A file system whose creates cost more than this is still busy with earlier work.
SETTLED_CREATE_S = 0.0001


def settle(directory: Path, wall: float = 60.0) -> float:
    """Wait until creating a file in `directory` costs what it should; return that cost.

    After a large delete (the previous lab's tree), a file system mounted with online
    discard keeps creates in the same area slow (here ~0.6 ms instead of ~0.015 ms) for
    10-20 s while it discards the freed blocks. A bench measuring then measures the disk,
    not us; so we wait, bounded, and print what we waited for.
    """
    deadline = time.monotonic() + wall
    os.sync()
    while True:
        costs = []
        for i in range(21):
            path = directory / f".settle-{os.getpid()}-{i}"
            t0 = time.perf_counter()
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            costs.append(time.perf_counter() - t0)
            os.close(fd)
            os.unlink(path)
        cost = statistics.median(costs)
        if cost <= SETTLED_CREATE_S or time.monotonic() > deadline:
            print(f"file system of {directory}: a create costs {cost * 1e3:.3f} ms", flush=True)
            return cost
        time.sleep(1.0)


@contextlib.contextmanager
def server(backend: Backend, **site_extra: str) -> Iterator[tuple[Lab, Site]]:
    """A lab whose server has the host policy for `backend` and a deployed site."""
    lab = Lab("b")
    site: Site | None = None
    try:
        close_server_firewall(lab.server, backend.backend, backend.backend == "nftables")
        site = backend.site(**site_extra)
        settle(site.root)
        yield lab, site
    finally:
        if site is not None:
            site.close()
        lab.close()


def inner(ns: Netns, module: str, wall: float, **params: Any) -> dict[str, Any]:
    """Run ``bench/<module>.py --inner JSON`` in `ns`; return the JSON it prints last."""
    python = str(shared_venv() / "bin" / "python3")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    script = str(REPO / "bench" / f"{module}.py")
    proc = run(
        ns.cmd([python, script, "--inner", json.dumps(params)]),
        timeout=wall,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"bench/{module}.py inner run failed:\n{proc.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def fill_state_and_kernel(config: str, count: int, seconds: float, start: int = 0) -> float:
    """(Inside the server namespace.) Put `count` live tcp/22 grants into the state file and
    the kernel, as a restart would find them; return the seconds the kernel sync took."""
    from webknock.config import load
    from webknock.server.firewall import make_firewall
    from webknock.server.grants import Grant, GrantKey
    from webknock.server.state import StateStore

    cfg = load(config)
    now = time.time()
    grants = [
        Grant(GrantKey(ip, "tcp", 22), now, now, now + seconds) for ip in filler(count, start)
    ]
    store = StateStore(cfg.state_file)
    with store.transaction() as tx:
        tx.delete(g.key for g in tx.all())
        tx.upsert(grants)
    fw = make_firewall(cfg)
    fw.ensure()
    t0 = time.perf_counter()
    fw.sync([g.entry for g in grants], now=now)
    return time.perf_counter() - t0


def percentiles(samples: Sequence[float]) -> dict[str, float]:
    """p50 and p99 (nearest rank) and the mean, in milliseconds."""
    if not samples:
        return {"n": 0, "p50_ms": float("nan"), "p99_ms": float("nan"), "mean_ms": float("nan")}
    ordered = sorted(samples)
    rank = max(0, min(len(ordered) - 1, round(0.99 * len(ordered)) - 1))
    return {
        "n": len(ordered),
        "p50_ms": statistics.median(ordered) * 1000,
        "p99_ms": ordered[rank] * 1000,
        "mean_ms": statistics.fmean(ordered) * 1000,
    }


def table(rows: Sequence[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(r, widths, strict=True))
        )
        for r in rows
    )


def require_root() -> None:
    if os.geteuid() != 0:
        raise SystemExit("the benches need root (network namespaces, firewalls)")
