"""webknockd's decision path: what root does with one batch of claimed requests, in order.

1. read each request as untrusted input (:mod:`webknock.spool.reader`) and tell the client
   address (REMOTE_ADDR, or X-Forwarded-For from a ``trusted_proxies`` address);
2. verify the packet with keys only root holds (:mod:`webknock.server.verify`);
3. burn the replay marks of the batch in one transaction (:mod:`webknock.server.guard`);
4. decide: getinfo is answered, openports without an offered port refused;
5. apply the batch's grants in one firewall batch (:mod:`webknock.server.engine`);
6. answer each CGI through its doorbell and remove the request from ``claimed/``.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from webknock.addresses import Address, AddressError, client_address, prefix_of
from webknock.config import ServerConfig
from webknock.server.claim import Claimed
from webknock.server.engine import GrantEngine, Outcome
from webknock.server.grants import GrantRequest
from webknock.server.guard import Guard
from webknock.server.metrics import Metrics
from webknock.server.refusallog import RefusalLog
from webknock.server.state import StateError
from webknock.server.verify import Answer, Refusal, Verified, Verifier
from webknock.spool.doorbell import deliver, encode_answer
from webknock.spool.housekeeping import SpoolKeeper
from webknock.spool.reader import SpoolError, read_request, request_name_id

log = logging.getLogger("webknockd")


class Decider:
    """Verifies, decides, applies and answers batches of claimed requests for one instance."""

    def __init__(
        self,
        cfg: ServerConfig,
        engine: GrantEngine,
        verifier: Verifier,
        guard: Guard,
        *,
        metrics: Metrics,
        keeper: SpoolKeeper,
        refusals: RefusalLog,
        allowed_uids: frozenset[int],
        max_wait: float,
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.verifier = verifier
        self.guard = guard
        self.metrics = metrics
        self.keeper = keeper
        self.refusals = refusals
        self.allowed_uids = allowed_uids  # who may own a spool file: root and the web user
        self.max_wait = max_wait  # a request older than this is dropped: its CGI gave up
        self._claimed = str(cfg.spool.claimed)
        self._waits = str(cfg.spool.waits)

    def handle(self, entries: list[Claimed], now: float) -> None:
        """Verify, decide, apply and answer one batch; every entry leaves claimed/."""
        self.verifier.refresh()
        answers: dict[str, Answer] = {}
        # 1-2: read, tell the address, verify
        verified = [v for e in entries if (v := self._verify(e, now, answers)) is not None]
        # 3: burn the replay marks
        retries = frozenset(rid for e in entries if e.leftover and (rid := request_name_id(e.name)))
        fresh = self._burn_marks(verified, retries, now, answers)
        # 4: decide
        to_open: list[Verified] = []
        for v in fresh:
            answer = self._decide(v, now)
            if answer is None:
                to_open.append(v)
            else:
                answers[v.id] = answer
        # 5: apply
        self._apply(to_open, now, answers)
        # 6: answer
        for entry in entries:
            request_id = request_name_id(entry.name)
            if request_id in answers:
                self.answer(request_id, answers[request_id])
            self.keeper.remove(self._claimed, entry.name, entry.inode)

    def _verify(self, entry: Claimed, now: float, answers: dict[str, Answer]) -> Verified | None:
        """Read and verify one claimed request; a refusal goes into `answers`."""
        try:
            req = read_request(entry.path, allowed_uids=self.allowed_uids)
        except SpoolError as exc:
            self.reject(entry, str(exc))
            return None
        except Exception as exc:  # untrusted input must never stop the daemon
            log.exception("unexpected error reading spool file %r", entry.name[:80])
            self.reject(entry, f"unreadable: {type(exc).__name__}")
            return None
        if now - entry.arrived > self.max_wait:
            log.info(
                "request %s: %.0f s old, its CGI gave up; dropped", req.id, now - entry.arrived
            )
            return None
        try:
            peer = client_address(req.remote, req.forwarded, self.cfg.trusted_proxies)
        except AddressError as exc:
            self.refusals.refused("request %s: %s", req.id, exc.reason)
            answers[req.id] = Answer(exc.status)
            self.metrics.knock("refused", req.protocol)
            return None
        try:
            return self.verifier.verify(req, peer, now)
        except Refusal as refusal:
            answers[req.id] = self._refuse(req.id, peer, refusal, now, req.protocol)
            return None

    def _burn_marks(
        self,
        verified: list[Verified],
        retries: frozenset[str],
        now: float,
        answers: dict[str, Answer],
    ) -> list[Verified]:
        """Record the replay marks of `verified` in one transaction; return the requests
        whose mark is new. A replay is refused; a mark that cannot be recorded would allow
        a replay, so then nothing is accepted (503). `retries`: leftovers of a crash, whose
        own earlier attempt may have burnt their mark."""
        try:
            fresh = self.guard.commit([(v.mark, v.id) for v in verified], now, retries)
        except StateError as exc:
            log.error("state file error, %d request(s) refused: %s", len(verified), exc)
            for v in verified:
                answers[v.id] = Answer(503)
                self.metrics.knock("error", v.protocol)
            return []
        for v, new in zip(verified, fresh, strict=True):
            if not new:
                replay = v.replies.refused("REPLAY", "this request was seen before", now)
                refusal = Refusal(replay, "replayed", bad=True)
                answers[v.id] = self._refuse(v.id, v.peer, refusal, now, v.protocol, "replay")
        return [v for v, new in zip(verified, fresh, strict=True) if new]

    def _decide(self, v: Verified, now: float) -> Answer | None:
        """The answer to a request that needs no grant, or None: open its ports."""
        if v.api == "getinfo":
            answer = v.replies.info(v.peer, v.allowed, v.max_time, now)
            self.metrics.knock("info", v.protocol)
            return answer
        if not v.ports:
            answer = v.replies.refused("NOPORTS", "none of the requested ports is offered", now)
            self.metrics.knock("refused", v.protocol)
            return answer
        return None

    def _apply(self, grants: list[Verified], now: float, answers: dict[str, Answer]) -> None:
        """Open the batch's grants in one engine batch; each request's answer into `answers`."""
        outcomes = self._open(grants, now)
        for v in grants:
            o = outcomes[v.id]
            answers[v.id] = (
                v.replies.granted(v.peer, o.ports, o.expires, now)
                if o.ok
                else v.replies.refused(o.errorcode, o.error, now)
            )
            self.metrics.knock(metrics_outcome(o), v.protocol)

    def _open(self, grants: list[Verified], now: float) -> dict[str, Outcome]:
        """Apply the batch's grants: an outcome per request id."""
        requests = [
            GrantRequest(
                v.id, v.peer, v.ports, v.time, "knock", v.client, v.user_agent, v.prefixlen
            )
            for v in grants
        ]
        started = time.monotonic()
        try:
            return self.engine.open(requests, now)
        except StateError as exc:
            log.error("state file error: %s", exc)
            return {
                r.id: Outcome(False, error="server state unavailable", errorcode="STATE")
                for r in requests
            }
        finally:
            if requests:
                self.metrics.applied(time.monotonic() - started)

    def _refuse(
        self,
        request_id: str,
        peer: Address,
        refusal: Refusal,
        now: float,
        protocol: str,
        outcome: str = "",
    ) -> Answer:
        """The answer to a refused request. A bad packet is counted; one from a throttled
        prefix gets 429 and no log line of its own (a summary per prune). `outcome` for the
        metrics: by default error (5xx), bad_packet or refused."""
        if refusal.bad:
            throttled = self.guard.throttled(peer, now)
            self.guard.failed(peer, now)
            if throttled:
                prefix = prefix_of(peer)
                self.guard.suppressed[prefix] = self.guard.suppressed.get(prefix, 0) + 1
                self.metrics.knock("throttled", protocol)
                return Answer(429)
        if not outcome:
            bad = "bad_packet" if refusal.bad else "refused"
            outcome = "error" if refusal.answer.status >= 500 else bad
        self.metrics.knock(outcome, protocol)
        self.refusals.refused("refused %s from %s: %s", request_id[:8], peer, refusal.reason)
        return refusal.answer

    def answer(self, request_id: str, answer: Answer) -> None:
        """Hand the answer to the CGI waiting on the request's doorbell, if one still does."""
        payload = encode_answer(answer.status, answer.note, answer.body)
        if not deliver(os.path.join(self._waits, request_id), self.allowed_uids, payload):
            log.debug("request %s: no CGI waits for its answer", request_id)

    def reject(self, entry: Claimed, reason: str) -> None:
        """A malformed spool file: answer 400 (its CGI, if any, waits), set it aside, and
        count it for one log line per prune (a flood of them must not flood the log)."""
        log.debug("rejected spool file %r: %s", entry.name[:80], reason)
        self.refusals.malformed += 1
        request_id = request_name_id(entry.name)
        if request_id:
            self.answer(request_id, Answer(400))
        self.keeper.set_aside(Path(entry.path), entry.name)


def metrics_outcome(o: Outcome) -> str:
    """The metrics outcome of an openports the engine decided."""
    if o.ok:
        return "granted"
    return "error" if o.errorcode in ("FIREWALL", "STATE") else "refused"
