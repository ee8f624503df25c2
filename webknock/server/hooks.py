"""Hooks: an admin's executable run on grant events, off the apply path.

``[hooks] on_open``, ``on_renew`` and ``on_close`` (an expiry or a revoke) name an
executable (absolute path, a regular file owned by root and writable by nobody else, in
a directory of the same kind). It runs without a shell, with the event in environment
variables (``WEBKNOCK_EVENT``, ``WEBKNOCK_INSTANCE``, ``WEBKNOCK_IP``, ``WEBKNOCK_PROTO``,
``WEBKNOCK_PORT``, ``WEBKNOCK_CLIENT``, ``WEBKNOCK_EXPIRES``, ``WEBKNOCK_SOURCE``, and a
minimal ``PATH``) and as the audit trail's JSON object on stdin.

The sink only queues the event: ``max_running`` worker threads run the hooks, each for at
most ``timeout`` seconds (then its whole process group is killed). A full queue drops the
event with a log line; a failing hook is logged. Neither ever delays or undoes a grant.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import queue
import signal
import stat
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from webknock.config import ConfigError, ServerConfig, _abs_path, _Section
from webknock.filemodes import Problem, mode_problems
from webknock.server.events import Event

log = logging.getLogger("webknock.server.hooks")

SECTION = "hooks"
#: Which hook runs for which event kinds.
HOOK_KINDS = {"on_open": ("open",), "on_renew": ("renew",), "on_close": ("expire", "revoke")}
KNOWN = frozenset({*HOOK_KINDS, "timeout", "max_running"})
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_QUEUE = 1000
#: On exit, queued and running hooks get this long (below the 15 s systemd stop timeout).
CLOSE_GRACE = 8.0
#: This much of a failing hook's output goes into the log.
OUTPUT_LOGGED = 500


@dataclass(frozen=True)
class HookSettings:
    """Validated ``[hooks]``: the executable per event kind."""

    commands: dict[str, Path] = field(default_factory=dict)  # event kind -> executable
    timeout: float = 10.0
    max_running: int = 4


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise ValueError("must be a number of seconds above 0, at most 3600, e.g. 10 or 2.5")
    return value


def _max_running(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise ValueError("must be a whole number, 1-64")
    return int(text)


def executable_problems(path: Path, what: str) -> list[Problem]:
    """Why root must not run `path`: not a regular executable file, or one (or its
    directory) that someone other than root could change. Errors only."""
    problems = [
        p
        for p in mode_problems(path, uid=0, gid=None, mode=0o755, what=what)
        + mode_problems(path.parent, uid=0, gid=None, mode=0o755, what=f"{what}'s directory")
        if p[0] == "error"
    ]
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return [("error", f"{what} {path} does not exist"), *problems]
    except OSError:
        return problems  # mode_problems said why
    if stat.S_ISREG(st.st_mode) and not st.st_mode & 0o111:
        problems.append(("error", f"{what} {path} is not executable; run: chmod 0755 {path}"))
    elif not stat.S_ISREG(st.st_mode) and not stat.S_ISLNK(st.st_mode):
        problems.append(("error", f"{what} {path} is not a regular file"))
    return problems


def load_hooks(cfg: ServerConfig) -> HookSettings:
    """Parse ``[hooks]``; raises ConfigError naming file, section and key (also for a hook
    that is missing, not executable, or changeable by someone other than root)."""
    sec = _Section(cfg.source, SECTION, cfg.section(SECTION))
    unknown = sorted(set(sec.values) - KNOWN)
    if unknown:
        raise sec.error(unknown[0], "unknown setting (typo?)")
    commands: dict[str, Path] = {}
    for key, kinds in HOOK_KINDS.items():
        path = sec.optional(key, _abs_path)
        if path is None:
            continue
        problems = executable_problems(path, "hook")
        if problems:
            raise sec.error(key, problems[0][1])
        commands.update(dict.fromkeys(kinds, path))
    return HookSettings(
        commands,
        sec.get("timeout", _timeout, 10.0),
        sec.get("max_running", _max_running, 4),
    )


def hook_problems(cfg: ServerConfig) -> list[Problem]:
    """``webknockctl check-config``: every problem of ``[hooks]``, not only the first."""
    sec = _Section(cfg.source, SECTION, cfg.section(SECTION))
    problems: list[Problem] = []
    for key in sorted(set(sec.values) - KNOWN):
        problems.append(("error", str(sec.error(key, "unknown setting (typo?)"))))
    for key in HOOK_KINDS:
        try:
            path = sec.optional(key, _abs_path)
        except ConfigError as exc:
            problems.append(("error", str(exc)))
            continue
        if path is not None:
            problems += [
                (level, f"{cfg.source}: [{SECTION}] {key}: {msg}")
                for level, msg in executable_problems(path, "hook")
            ]
    for key, conv in (("timeout", _timeout), ("max_running", _max_running)):
        try:
            sec.optional(key, conv)
        except ConfigError as exc:
            problems.append(("error", str(exc)))
    return problems


def hook_env(event: Event) -> dict[str, str]:
    """The environment of a hook: the event's fields and a minimal PATH, nothing else."""
    return {
        "PATH": HOOK_PATH,
        "WEBKNOCK_EVENT": event.kind,
        "WEBKNOCK_INSTANCE": event.instance,
        "WEBKNOCK_IP": event.ip,
        "WEBKNOCK_PROTO": event.proto,
        "WEBKNOCK_PORT": str(event.port) if event.proto else "",
        "WEBKNOCK_CLIENT": event.client or "",
        "WEBKNOCK_EXPIRES": str(int(event.expires)) if event.expires is not None else "",
        "WEBKNOCK_SOURCE": event.source,
    }


class HookRunner:
    """The event sink: queues events that have a hook; worker threads run them."""

    def __init__(self, settings: HookSettings, max_queue: int = MAX_QUEUE) -> None:
        self.settings = settings
        self.queue: queue.Queue[Event] = queue.Queue(max_queue)
        self.closing = threading.Event()
        self.lock = threading.Lock()
        self.threads: list[threading.Thread] = []
        self.running: set[subprocess.Popen[bytes]] = set()
        self.done = 0  # hooks that exited 0
        self.failed = 0  # hooks that failed, timed out or could not start
        self.dropped = 0  # events refused by a full queue

    def __call__(self, event: Event) -> None:
        """The sink: never blocks, never raises."""
        if event.kind not in self.settings.commands or self.closing.is_set():
            return
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            log.error("hooks: queue full, no hook for %s", event.describe())
            return
        self._start()

    def _start(self) -> None:
        with self.lock:
            if self.threads:
                return
            for n in range(self.settings.max_running):
                thread = threading.Thread(target=self._work, name=f"webknock-hook-{n}", daemon=True)
                thread.start()
                self.threads.append(thread)
            atexit.register(self.close)

    def _work(self) -> None:
        while True:
            try:
                event = self.queue.get(timeout=0.2)
            except queue.Empty:
                if self.closing.is_set():
                    return
                continue
            try:
                self.run(event)
            except Exception:  # a worker must survive anything
                self.failed += 1
                log.exception("hook for %s failed", event.describe())

    def run(self, event: Event) -> None:
        """Run the hook of one event and wait for it (at most `timeout` seconds)."""
        from webknock.server.audit import record

        path = self.settings.commands[event.kind]
        data = json.dumps(record(event), separators=(",", ":")).encode() + b"\n"
        what = f"hook {path} for {event.describe()}"
        try:
            proc = subprocess.Popen(
                [str(path)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=hook_env(event),
                cwd="/",
                start_new_session=True,  # its own process group: a timeout kills it all
            )
        except OSError as exc:
            self.failed += 1
            log.error("%s: cannot start: %s", what, exc)
            return
        with self.lock:
            self.running.add(proc)
        try:
            with proc:
                try:
                    out, _ = proc.communicate(data, timeout=self.settings.timeout)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
                    proc.wait()
                    self.failed += 1
                    log.error("%s: killed after %g s", what, self.settings.timeout)
                    return
        finally:
            with self.lock:
                self.running.discard(proc)
        if proc.returncode == 0:
            self.done += 1
            log.debug("%s: done", what)
            return
        self.failed += 1
        tail = out.decode(errors="replace").strip()[-OUTPUT_LOGGED:]
        log.error("%s: exit status %d%s", what, proc.returncode, f": {tail}" if tail else "")

    @staticmethod
    def _kill(proc: subprocess.Popen[bytes]) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def close(self, timeout: float = CLOSE_GRACE) -> None:
        """Run what is queued, for at most `timeout` seconds; then kill what still runs."""
        self.closing.set()
        atexit.unregister(self.close)
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self.lock:
            running = list(self.running)
        if running or self.queue.qsize():
            log.error(
                "hooks: at exit, %d still running (killed), %d not run",
                len(running),
                self.queue.qsize(),
            )
        for proc in running:
            self._kill(proc)


def hooks_sink(cfg: ServerConfig) -> HookRunner | None:
    """The sink running ``[hooks]``, or None when no hook is set. Raises ConfigError."""
    settings = load_hooks(cfg)
    if not settings.commands:
        return None
    for kind, path in sorted(settings.commands.items()):
        log.debug("%s events run %s", kind, path)
    return HookRunner(settings)
