"""Logging for the root tools: one line per event, to stderr (journald) or syslog."""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys


def setup_logging(
    program: str, *, verbose: bool = False, use_syslog: bool = False, instance: str = ""
) -> None:
    """Configure the root logger once: journald-friendly stderr, or syslog (daemon facility)."""
    level = logging.DEBUG if verbose else logging.INFO
    tag = f"{program}[{instance}]" if instance else program
    handler: logging.Handler
    if use_syslog and os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            "/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON
        )
        handler.setFormatter(logging.Formatter(f"{tag}: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = (
            "%(levelname)s %(message)s"
            if os.environ.get("JOURNAL_STREAM")
            else (f"%(asctime)s {tag} %(levelname)s %(message)s")
        )
        handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("filelock").setLevel(logging.WARNING)
