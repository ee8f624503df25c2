"""The commands of `webknock` for several servers at once (--profile a,b,c, or a profile
group): every server in a thread of its own, so a slow or unreachable one costs its own
timeout and delays no other; output in the profiles' order; the exit code is the highest of
any one server's (`worst`)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from webknock.client.commands import run_renewing, stop_on_signals
from webknock.client.errors import EXIT_OK, ClientError, worst
from webknock.client.keeper import Keeper, describe
from webknock.client.knocker import Knocker
from webknock.client.options import command_argv
from webknock.client.output import fan_tag, info_json, info_text, print_json, report_fan_failures
from webknock.client.targets import Target

log = logging.getLogger("webknock.client")


def _parallel(targets: list[Target], work: Callable[[Target], Any]) -> list[Any]:
    """`work` for every target at once, one thread per profile (a group has at most
    MAX_GROUP); results in the targets' order."""
    with ThreadPoolExecutor(max_workers=len(targets), thread_name_prefix="webknock") as pool:
        return list(pool.map(work, targets))


@dataclass
class Outcome:
    """What one profile of a fan-out got: per family a result, or a failure."""

    target: Target
    results: list[tuple[Knocker, Any]]
    failures: list[tuple[Knocker, ClientError]]

    @property
    def code(self) -> int:
        return worst(exc.code for _, exc in self.failures)

    @property
    def several(self) -> bool:
        return len(self.target.knockers) > 1

    def tag(self, knocker: Knocker) -> str:
        return fan_tag(self.target.name, knocker.family, self.several)

    def report_failures(self) -> list[dict[str, Any]]:
        """Print `NAME: error: ...` on stderr for each failure; their JSON form."""
        return report_fan_failures(self.target.name, self.failures, self.several)


def _each(targets: list[Target], call: Callable[[Knocker], Any]) -> list[Outcome]:
    def work(target: Target) -> Outcome:
        outcome = Outcome(target, [], [])
        for knocker in target.knockers:
            try:
                outcome.results.append((knocker, call(knocker)))
            except ClientError as exc:
                outcome.failures.append((knocker, exc))
        return outcome

    return _parallel(targets, work)


def fan_knock(targets: list[Target], as_json: bool) -> tuple[int, list[Outcome]]:
    """Knock at every server at once; print in the profiles' order."""
    outcomes = _each(targets, lambda knocker: knocker.knock())
    found = []
    for outcome in outcomes:
        if not as_json:
            for knocker, grant in outcome.results:
                print(outcome.tag(knocker) + describe(grant))
            sys.stdout.flush()
        errors = outcome.report_failures()
        found.append(
            {
                "profile": outcome.target.name,
                "ok": not errors,
                "code": outcome.code,
                "grants": [grant.as_json() for _, grant in outcome.results],
                "errors": errors,
            }
        )
    if as_json:
        print_json(found, flush=True)
    return worst(o.code for o in outcomes), outcomes


def fan_info(targets: list[Target], as_json: bool) -> int:
    outcomes = _each(targets, lambda knocker: knocker.info())
    found = []
    for outcome in outcomes:
        if not as_json:
            for knocker, info in outcome.results:
                print(outcome.tag(knocker) + info_text(knocker, info))
            sys.stdout.flush()
        errors = outcome.report_failures()
        found.append(
            {
                "profile": outcome.target.name,
                "ok": not errors,
                "code": outcome.code,
                "servers": [info_json(knocker, info) for knocker, info in outcome.results],
                "errors": errors,
            }
        )
    if as_json:
        print_json(found, flush=True)
    return worst(o.code for o in outcomes)


def fan_keep(targets: list[Target], poll: float) -> int:
    """One keeper per profile, each on its own schedule in its own thread; one that fails
    keeps retrying (with backoff) and delays no other. Until a signal, or until every
    keeper stopped on a configuration error (then: the highest of their codes)."""
    stop = threading.Event()
    codes: list[int] = []

    def keep(target: Target) -> None:
        keeper = Keeper(target.knockers, stop, poll=poll, label=target.name)
        try:
            keeper.run(quiet=True)
        except ClientError as exc:
            keeper.log.error("error: %s; renewals for this profile stopped", exc.message)
            codes.append(exc.code)

    threads = [
        threading.Thread(target=keep, args=(t,), name=f"webknock-keep-{t.name}", daemon=True)
        for t in targets
    ]
    with stop_on_signals(stop):
        for thread in threads:
            thread.start()
        while not stop.is_set() and any(thread.is_alive() for thread in threads):
            stop.wait(0.5)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    log.info("stopped")
    return worst(codes)


def fan_exec(targets: list[Target], poll: float, argv: list[str]) -> int:
    """Knock at every server; run CMD only when every one granted, renewing each (on its
    own schedule) while CMD runs; else the highest code, and CMD does not run."""
    argv = command_argv(argv)
    code, outcomes = fan_knock(targets, as_json=False)
    if code != EXIT_OK:
        return code
    stop = threading.Event()
    keepers = []
    for outcome in outcomes:
        keeper = Keeper(outcome.target.knockers, stop, poll=poll, label=outcome.target.name)
        for knocker, grant in outcome.results:
            keeper.adopt(grant, knocker, knocker.transport.local_address())
        keepers.append(keeper)
    return run_renewing(argv, keepers, stop)
