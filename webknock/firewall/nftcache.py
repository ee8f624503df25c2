"""Keep libnftables's cache current while webknockd is idle, off the knock's path.

Before each transaction libnftables makes sure its cache (tables, chains, sets, objects)
matches the kernel's ruleset generation. Every transaction of ours moves that generation
on, and libnftables 1.0.6 does not follow its own commits, so the next knock's
transaction would begin with five netlink dumps: about 0.4 of webknockd's 1.7 ms per
knock on a cold host.

So once a batch is answered, a background thread refreshes the cache of the context the
next batch will use: a dry run (``nft --check``) of an ``add`` and ``delete`` of an
element that is never granted (the unspecified address), which makes libnftables fetch
what an ``add element`` needs and commits nothing: the generation stays, and the next
transaction only asks for it. The kernel's abort of the dry-run batch waits for an RCU
grace period (5-30 ms, asleep, ~0.5 ms of CPU), so while the thread holds the context a
batch goes through a spare one, which fetches its cache as before: the daemon never
waits for the refresh. If the dry run were ignored, the pair would leave nothing behind.
A context in dry-run mode is never used for a batch (:class:`FirewallError` instead).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol

from webknock.firewall.base import FirewallError

log = logging.getLogger(__name__)


class DryRunLib(Protocol):
    """The part of ``nftables.Nftables`` a refresh needs."""

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]: ...

    def get_dry_run(self) -> bool: ...

    def set_dry_run(self, onoff: bool) -> bool: ...


class DryRunLeft(FirewallError):
    """A context was found in dry-run mode outside a refresh (never applied silently)."""


class WarmBinding:
    """A libnftables context whose cache a background thread refreshes after each change
    (:meth:`refresh_soon`), and a spare context for the moments the refresh holds it."""

    def __init__(
        self, primary: DryRunLib, spare: Callable[[], DryRunLib], probe: dict[str, Any]
    ) -> None:
        self._primary = primary
        self._make_spare = spare
        self._spare: DryRunLib | None = None
        self._probe = probe  # the dry-run command: what an `add element` needs, fetched
        self._held = threading.Lock()  # the primary context is in use
        self._wanted = threading.Event()
        self._stale = True
        self._thread: threading.Thread | None = None

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        """Run a command on the primary context, or on the spare one while it refreshes."""
        if not self._held.acquire(blocking=False):
            self._stale = True
            return self._checked(self._spare_lib(), json_root)
        try:
            self._stale = True  # any command may leave the cache behind the kernel
            return self._checked(self._primary, json_root)
        finally:
            self._held.release()

    @staticmethod
    def _checked(lib: DryRunLib, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        if lib.get_dry_run():
            raise DryRunLeft("libnftables context left in dry-run mode: nothing applied")
        return lib.json_cmd(json_root)

    def _spare_lib(self) -> DryRunLib:
        if self._spare is None:
            self._spare = self._make_spare()
        return self._spare

    def refresh_soon(self) -> None:
        """Refresh the primary context's cache in the background if a command may have
        left it behind; returns at once."""
        if not self._stale:
            return
        if self._thread is None:
            thread = threading.Thread(target=self._serve, name="nft-cache", daemon=True)
            try:
                thread.start()
            except RuntimeError as exc:  # no thread to be had: go on without the refresh
                log.debug("no thread for the libnftables cache refresh: %s", exc)
                return
            self._thread = thread
        self._wanted.set()

    def refresh(self) -> bool:
        """Refresh now, in this thread; True if the dry run succeeded."""
        with self._held:
            self._stale = False
            self._primary.set_dry_run(True)
            try:
                rc, _, err = self._primary.json_cmd(self._probe)
            finally:
                self._primary.set_dry_run(False)
        if rc != 0:  # e.g. our table was flushed: the next batch restores and fetches anyway
            log.debug("libnftables cache refresh failed: %s", " ".join(str(err).split())[:200])
        return rc == 0

    def _serve(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            try:
                self.refresh()
            except Exception:  # an optimisation only: never the end of the daemon
                log.exception("libnftables cache refresh failed")
