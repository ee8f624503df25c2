"""What the installer asks of the machine, injectable for unit tests.

:class:`Runner` runs commands (apt-get, pip, systemctl, webknockctl, the daemon); the
real one is :class:`SystemRunner`, tests pass a recording one, as the firewall backends
take their command runner. :class:`Host` holds the runner, the console, the source tree
and the facts of this machine (uid, environment, systemd, a terminal on stdin).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TextIO

from webknock.install.console import Console


class Runner(Protocol):
    """Runs one command to its end, or starts one in the background."""

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        capture: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv`; never raises on a non-zero exit. Without `capture` its output goes
        to the installer's own stdout/stderr."""
        ...

    def start(self, argv: Sequence[str], *, log: Path) -> Callable[[], bool]:
        """Start `argv` in a session of its own, stdin from /dev/null, stdout and stderr
        appended to `log`; returns a function that tells whether it still runs."""
        ...


class SystemRunner:
    """The real commands."""

    def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        capture: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(
                list(argv),
                input=input,
                capture_output=capture,
                text=True,
                check=False,
                env=dict(env) if env is not None else None,
                stdin=None if input is not None else subprocess.DEVNULL,
            )
        except OSError as exc:
            return subprocess.CompletedProcess(list(argv), 127, "", f"{argv[0]}: {exc.strerror}")

    def start(self, argv: Sequence[str], *, log: Path) -> Callable[[], bool]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return lambda: proc.poll() is None


def _fqdn() -> str:
    proc = subprocess.run(
        ["hostname", "-f"], capture_output=True, text=True, check=False, stdin=subprocess.DEVNULL
    )
    name = proc.stdout.strip() if proc.returncode == 0 else ""
    return name or socket.gethostname()


@dataclass
class Host:
    """The machine the installer runs on, and where its output goes."""

    src: Path
    runner: Runner = field(default_factory=SystemRunner)
    console: Console = field(default_factory=Console)
    system_python: str = "/usr/bin/python3"
    uid: int = field(default_factory=os.geteuid)
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    #: systemd is PID 1 (/run/systemd/system exists); the installer never asks it under --root
    systemd: bool = field(default_factory=lambda: os.path.isdir("/run/systemd/system"))
    stdin: TextIO = field(default_factory=lambda: sys.stdin)
    fqdn: Callable[[], str] = _fqdn
    sleep: Callable[[float], None] = time.sleep
    which: Callable[[str], str | None] = shutil.which

    @property
    def terminal(self) -> bool:
        """A person can answer: stdin is a terminal."""
        try:
            return self.stdin.isatty()
        except (AttributeError, ValueError):
            return False
