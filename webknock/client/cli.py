"""`webknock`: knock, keep, exec and info from a shell, cron or a systemd unit."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from webknock.client.commands import (
    cmd_exec,
    cmd_info,
    cmd_keep,
    cmd_keygen,
    cmd_knock,
    cmd_pubkey,
)
from webknock.client.errors import ClientError, clean
from webknock.client.fanout import fan_exec, fan_info, fan_keep, fan_knock
from webknock.client.options import build_parser
from webknock.client.targets import knockers_for, profile_from, targets_from

log = logging.getLogger("webknock.client")


class _SafeFormatter(logging.Formatter):
    """Whatever ends up in a message, no control character reaches the terminal."""

    def format(self, record: logging.LogRecord) -> str:
        return clean(super().format(record), None)


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO if args.command in ("keep", "exec") else logging.WARNING
    if args.verbose:
        level = logging.DEBUG if args.verbose > 1 else logging.INFO
    if args.quiet:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SafeFormatter("webknock: %(message)s"))
    ours = logging.getLogger("webknock")  # not the root logger: main() may run inside a host
    ours.handlers[:] = [handler]
    ours.setLevel(level)
    logging.getLogger("urllib3").setLevel(max(level, logging.WARNING))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args)
    try:
        if args.command == "keygen":
            return cmd_keygen(args)
        if args.command == "pubkey":
            return cmd_pubkey(args)
        targets = targets_from(args)
        if targets is not None:
            poll = max(0.2, getattr(args, "poll", 5.0))
            if args.command == "knock":
                return fan_knock(targets, args.json)[0]
            if args.command == "info":
                return fan_info(targets, args.json)
            if args.command == "keep":
                return fan_keep(targets, poll)
            return fan_exec(targets, poll, list(args.cmd))
        profile = profile_from(args)
        knockers = knockers_for(profile, use_cache=not args.no_cache)
        if args.command == "knock":
            return cmd_knock(knockers, args.json)[0]
        if args.command == "info":
            return cmd_info(knockers, args.json)
        if args.command == "keep":
            return cmd_keep(knockers, max(0.2, args.poll))
        return cmd_exec(knockers, max(0.2, args.poll), list(args.cmd))
    except ClientError as exc:
        log.error("%s", exc.message)
        return exc.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
