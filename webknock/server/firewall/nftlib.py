"""The nftables transport: one JSON transaction through libnftables in-process (Debian's
python3-nftables) or, without the binding, the same JSON fed to ``nft -j -f -`` through
the injected runner. A failed transaction raises FirewallError and changes nothing."""

from __future__ import annotations

import json
from typing import Any, Final, Protocol

from webknock.server.firewall.base import FirewallError, Runner

NFT: Final = "nft"

Cmd = dict[str, Any]


class NftLib(Protocol):
    """The part of ``nftables.Nftables`` we use."""

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]: ...


class _Auto:
    """Marker: load the python3-nftables binding if it is installed."""


AUTO: Final = _Auto()


def load_binding() -> NftLib | None:
    """A libnftables context, or None when python3-nftables is missing."""
    try:
        import nftables  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    lib: NftLib = nft
    return lib


def transact(lib: NftLib | None, runner: Runner, cmds: list[Cmd]) -> dict[str, Any]:
    """Run commands as one transaction; return the JSON output ({} when none)."""
    root = {"nftables": cmds}
    if lib is not None:
        rc, out, err = lib.json_cmd(root)
        if rc != 0:
            raise FirewallError("libnftables: " + (" ".join(str(err).split())[:400] or f"rc {rc}"))
    else:
        text = runner([NFT, "-j", "-f", "-"], json.dumps(root))
        try:
            out = json.loads(text) if text.strip() else {}
        except ValueError as exc:
            raise FirewallError(f"nft -j printed no JSON: {exc}") from None
    return out if isinstance(out, dict) else {}


def missing(exc: FirewallError) -> bool:
    """Whether a failed listing failed because the object does not exist."""
    return "No such file or directory" in str(exc)
