"""webknockd's figures: knocks by outcome, live grants, apply latency, spool backlog,
throttled prefixes.

The daemon counts into one :class:`Metrics` and writes it at most once a second (from its
tick): to ``[server] metrics_file`` in Prometheus' text format, for node_exporter's
textfile collector (mode 0644), and always to a root-only JSON snapshot beside the state
file (:func:`snapshot_path`) that ``webknockctl status --json`` shows under ``metrics``.
Both are written atomically; the counters start at 0 with each daemon.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from webknock.config import METRICS_SUFFIX, ServerConfig
from webknock.fsutil import write_atomic

#: Knock outcomes: a grant (or renewal); a getinfo answered; refused (no port offered,
#: limits, bad address, stale or bad request); a packet that did not verify; refused with
#: 429 (its prefix is throttled); a replay; a server error (state file, firewall, keys).
OUTCOMES = ("granted", "info", "refused", "bad_packet", "throttled", "replay", "error")
PROTOCOLS = ("v1", "v2")
#: Upper bounds (seconds) of the apply latency histogram's buckets.
BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)
WRITE_EVERY = 1.0


def snapshot_path(cfg: ServerConfig) -> Path:
    """The daemon's JSON snapshot of its figures (root only, beside the state file)."""
    return Path(f"{cfg.state_file}{METRICS_SUFFIX}")


def read_snapshot(cfg: ServerConfig) -> dict[str, Any] | None:
    """The last snapshot the daemon wrote, or None (it never wrote one, or it is unreadable)."""
    try:
        data = json.loads(snapshot_path(cfg).read_bytes())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _bound(le: float) -> str:
    return f"{le:g}"


class Metrics:
    """Counters, gauges and the apply histogram of one daemon."""

    def __init__(self, textfile: Path | None, snapshot: Path | None) -> None:
        self.textfile, self.snapshot = textfile, snapshot
        self.knocks = dict.fromkeys(((o, p) for o in OUTCOMES for p in PROTOCOLS), 0)
        self.apply_buckets = [0] * len(BUCKETS)  # not cumulative: the first bound it fits
        self.apply_count = 0
        self.apply_sum = 0.0
        self.grants_live = 0
        self.spool_backlog = 0
        self.throttled_prefixes = 0
        self.next_write = 0.0

    def knock(self, outcome: str, protocol: str) -> None:
        """Count one answered knock."""
        key = (outcome, protocol)
        self.knocks[key] = self.knocks.get(key, 0) + 1

    def applied(self, seconds: float) -> None:
        """Observe one batch's engine.open."""
        self.apply_count += 1
        self.apply_sum += seconds
        for i, le in enumerate(BUCKETS):
            if seconds <= le:
                self.apply_buckets[i] += 1
                break

    def _cumulative(self) -> list[int]:
        out, total = [], 0
        for n in self.apply_buckets:
            total += n
            out.append(total)
        return out

    def as_dict(self, now: float) -> dict[str, Any]:
        knocks: dict[str, dict[str, int]] = {}
        for (outcome, protocol), n in sorted(self.knocks.items()):
            knocks.setdefault(outcome, {})[protocol] = n
        return {
            "time": int(now),
            "knocks": knocks,
            "grants_live": self.grants_live,
            "spool_backlog": self.spool_backlog,
            "throttled_prefixes": self.throttled_prefixes,
            "apply_seconds": {
                "count": self.apply_count,
                "sum": round(self.apply_sum, 6),
                "buckets": {
                    _bound(le): n for le, n in zip(BUCKETS, self._cumulative(), strict=True)
                },
            },
        }

    def render(self) -> str:
        """The Prometheus text exposition format."""
        lines = [
            "# HELP webknock_up 1 while webknockd writes this file.",
            "# TYPE webknock_up gauge",
            "webknock_up 1",
            "# HELP webknock_knocks_total Knocks answered by webknockd, by outcome and protocol.",
            "# TYPE webknock_knocks_total counter",
        ]
        lines += [
            f'webknock_knocks_total{{outcome="{o}",protocol="{p}"}} {n}'
            for (o, p), n in sorted(self.knocks.items())
        ]
        lines += [
            "# HELP webknock_grants_live Live grants (address, protocol, port).",
            "# TYPE webknock_grants_live gauge",
            f"webknock_grants_live {self.grants_live}",
            "# HELP webknock_apply_seconds Time to apply one batch of knocks (firewall, state).",
            "# TYPE webknock_apply_seconds histogram",
        ]
        lines += [
            f'webknock_apply_seconds_bucket{{le="{_bound(le)}"}} {n}'
            for le, n in zip(BUCKETS, self._cumulative(), strict=True)
        ]
        lines += [
            f'webknock_apply_seconds_bucket{{le="+Inf"}} {self.apply_count}',
            f"webknock_apply_seconds_sum {self.apply_sum:.6f}",
            f"webknock_apply_seconds_count {self.apply_count}",
            "# HELP webknock_spool_backlog Requests in the spool not yet answered.",
            "# TYPE webknock_spool_backlog gauge",
            f"webknock_spool_backlog {self.spool_backlog}",
            "# HELP webknock_throttled_prefixes Address prefixes throttled for bad packets.",
            "# TYPE webknock_throttled_prefixes gauge",
            f"webknock_throttled_prefixes {self.throttled_prefixes}",
        ]
        return "\n".join(lines) + "\n"

    def due(self, now: float) -> bool:
        return now >= self.next_write

    def write(self, now: float) -> None:
        """Write the snapshot and the text file (raises OSError); next one after
        WRITE_EVERY seconds, even when this one failed."""
        self.next_write = now + WRITE_EVERY
        if self.snapshot is not None:
            data = json.dumps(self.as_dict(now), indent=1).encode()
            write_atomic(self.snapshot, data, 0o600, fsync=False)
        if self.textfile is not None:
            write_atomic(self.textfile, self.render().encode(), 0o644, fsync=False)
