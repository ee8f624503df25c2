"""Audit trail (placeholder until the audit issue lands): `webknockctl log`."""

from __future__ import annotations

import argparse
from typing import Any


def add_log_command(sub: Any) -> None:
    """Register `webknockctl log` on the subparsers object."""
    p: argparse.ArgumentParser = sub.add_parser("log", help="read the audit trail")
    p.set_defaults(func=lambda cfg, args: 0)
