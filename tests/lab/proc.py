"""Commands and child processes of the lab: run one, wait for a condition, stop a child."""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any


def stop_process(proc: subprocess.Popen[Any], grace: float = 5) -> None:
    """Terminate a child, kill it if it lingers, reap it and close the pipes to it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
    proc.wait(5)
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):  # stdin: unsent data to a dead child
                pipe.close()


def wait_for(predicate: Callable[[], object], seconds: float, step: float = 0.05) -> float | None:
    """Seconds until `predicate()` held, or None if it did not within `seconds`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if predicate():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def wait_until(predicate: Callable[[], object], seconds: float, step: float = 0.2) -> bool:
    """Whether `predicate()` held within `seconds`."""
    return wait_for(predicate, seconds, step) is not None


class LabError(RuntimeError):
    """The lab could not be built or a lab process misbehaved."""


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; raise LabError with its stderr on failure."""
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        env=env,
        check=False,
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()[:2000]}")
    return proc


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError("the lab needs root (network namespaces, firewalls)")
