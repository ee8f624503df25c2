"""What the modules of webknockctl share: its exit codes, the refusal of a command, and the
engine its commands use."""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from webknock.config import ServerConfig
    from webknock.server.engine import GrantEngine

#: 0 ok, 1 failed, 2 bad config or usage, 3 needs attention (status, check-config warnings).
EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_ATTENTION = 0, 1, 2, 3


class Refused(Exception):
    """A command cannot go on: the message for stderr and the exit status."""

    def __init__(self, message: str, status: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.status = status


def engine_for(cfg: ServerConfig) -> GrantEngine:
    """The same engine the daemon uses (state, firewall, event sinks), its firewall as
    webknockd set it up."""
    from webknock.server.daemon import build

    return build(cfg, daemon=False)[0]
