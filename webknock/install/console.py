"""What the installer tells the admin, and the errors that end a run with an exit code.

The installer's output is its product (what was kept, what to paste where), so it goes to
the streams of a :class:`Console`, never through logging. Exit codes: 0 done, 1 failed
(:class:`InstallError`), 2 usage error (:class:`UsageError`, :class:`ProfileRefused`),
130 interrupted.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

PROG = "install.sh"
EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130

BLOB_HELP = (
    "pass the profile `webknockctl client add` printed (v2) or the blob "
    "`install.sh server --v1` printed (v1) with --from FILE, on stdin with --from - "
    "(e.g. --from - < FILE), or paste it on a terminal"
)


class InstallError(Exception):
    """The run failed; the message says what to fix (exit 1)."""


class UsageError(Exception):
    """A wrong option or value (exit 2)."""


class ProfileRefused(Exception):
    """A missing or wrong client profile (exit 2); `how` adds how to pass one."""

    def __init__(self, message: str, *, how: bool = True) -> None:
        super().__init__(message)
        self.how = how


@dataclass
class Console:
    """The installer's stdout (progress, results) and stderr (warnings, errors)."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)

    def say(self, text: str = "") -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def step(self, text: str) -> None:
        self.say(f"==> {text}")

    def indented(self, text: str, *, err: bool = False, by: str = "    ") -> None:
        """Every line of `text`, indented (on stderr with `err`)."""
        stream = self.err if err else self.out
        for line in text.splitlines():
            stream.write(f"{by}{line}\n")
        stream.flush()

    def warn(self, text: str) -> None:
        self.err.write(f"{PROG}: warning: {text}\n")
        self.err.flush()

    def error(self, text: str) -> None:
        self.err.write(f"{PROG}: error: {text}\n")
        self.err.flush()

    def usage_error(self, text: str) -> None:
        self.err.write(f"{PROG}: {text} (see {PROG} --help)\n")
        self.err.flush()

    def refused(self, exc: ProfileRefused) -> None:
        self.error(str(exc))
        if exc.how:
            self.err.write(f"{PROG}: {BLOB_HELP}\n")
            self.err.flush()
