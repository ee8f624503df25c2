"""The iptables-restore file format: rules as data, the lines and file made of them, and
what an ``iptables-save`` listing declares. Nothing here runs a program."""

from __future__ import annotations

import re
from collections.abc import Iterable

from webknock.server.firewall.base import FirewallError

Rule = tuple[str, ...]
_TOKEN = re.compile(r"[A-Za-z0-9_.:/,-]+")


def restore_line(op: str, chain: str, rule: Rule) -> str:
    """One line of an iptables-restore file from data; refuses anything not a plain token."""
    for token in (chain, *rule):
        if not _TOKEN.fullmatch(token):
            raise FirewallError(f"refusing unsafe token {token!r} in a rule")
    return " ".join((op, chain, *rule))


def restore_file(lines: Iterable[str]) -> str:
    """Wrap lines into a filter-table restore file."""
    return "*filter\n" + "".join(f"{line}\n" for line in lines) + "COMMIT\n"


def declared(saved: list[str]) -> set[str]:
    """The chains an ``*-save`` listing declares."""
    return {ln.split()[0][1:] for ln in saved if ln.startswith(":")}


def jumps(saved: list[str], source: str, target: str) -> int:
    """How often chain `source` jumps to `target` in an ``*-save`` listing."""
    return sum(ln.split() == ["-A", source, "-j", target] for ln in saved)


def body(saved: list[str], chain: str) -> list[str]:
    """The rule lines of `chain` in an ``*-save`` listing."""
    return [ln for ln in saved if ln.startswith(f"-A {chain} ")]
