"""Container-published ports: whether to guard them (``[server] forward = auto|yes|no``).

Docker and Podman publish a port by DNAT in PREROUTING, so its packets take FORWARD, never
INPUT. With forward on, a backend adds a forward-path chain (see each backend's layout) that
drops new DNAT'ed connections whose *original* destination port is offered, unless the
source holds a grant. Forward is effective only with ``protect = yes``: without it nothing
of ours closes a port, on INPUT or FORWARD.

``auto`` turns it on when a container runtime is evident: the backend sees a
``DOCKER-USER`` chain, or the host has a container bridge (``docker0``, ``cni-podman0``,
``podman0``, or a Docker network's ``br-<12 hex digits>``). webknockd decides it when it
starts (restart it after installing Docker); webknockctl follows what webknockd set up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from webknock.server.firewall.base import FirewallError

NET_DIR = Path("/sys/class/net")
BRIDGES = ("docker0", "cni-podman0", "podman0")
#: The bridge of a user-defined Docker network: ``br-`` and the network id's first 12 hex
#: digits (not any ``br-*``: ``br-lan`` is a router's).
DOCKER_NETWORK = re.compile(r"br-[0-9a-f]{12}")
#: The chain Docker jumps to first from FORWARD and leaves to the admin.
DOCKER_USER = "DOCKER-USER"


def container_bridge(net_dir: Path = NET_DIR) -> str | None:
    """Evidence of a container bridge under `net_dir` (one line), or None."""
    try:
        names = sorted(p.name for p in net_dir.iterdir())
    except OSError:
        return None
    for name in names:
        if name in BRIDGES or (
            DOCKER_NETWORK.fullmatch(name) and (net_dir / name / "bridge").is_dir()
        ):
            return f"bridge {name} exists"
    return None


@dataclass(frozen=True)
class ForwardChoice:
    """The effective forward setting: on or off, why (one log line), and what an admin
    should change, if anything (check-config shows it as a warning)."""

    on: bool
    why: str
    warning: str | None = None


def decide(
    mode: str, *, protect: bool, evidence: str | None, ipset_only: bool = False
) -> ForwardChoice:
    """The effective setting of ``forward = mode``; `evidence` is a container runtime seen
    (or None), `ipset_only` that the backend is iptables with ``ipset = yes``, which cannot
    match a DNAT'ed connection's original port (its sets match the packet's own port).

    Raises FirewallError for ``forward = yes`` with `ipset_only`."""
    if not protect:
        return ForwardChoice(False, "protect = no: nothing of ours closes a port")
    if mode == "no":
        warning = None
        if evidence:
            warning = (
                f"forward = no but {evidence}: ports that containers publish are not "
                "guarded by webknock (set forward = auto)"
            )
        return ForwardChoice(False, "forward = no", warning)
    if mode == "yes":
        if ipset_only:
            raise FirewallError(
                "forward = yes needs the linear iptables chain: ipset sets cannot match a "
                "DNAT'ed connection's original port (set ipset = auto or no, or use nftables)"
            )
        return ForwardChoice(True, "forward = yes")
    if evidence is None:
        return ForwardChoice(False, "forward = auto: no container runtime found")
    if ipset_only:
        return ForwardChoice(
            False,
            f"forward = auto: {evidence}, but ipset = yes",
            f"{evidence} but ipset = yes: ports that containers publish are not guarded "
            "(ipset sets cannot match a DNAT'ed port; set ipset = auto to guard them)",
        )
    return ForwardChoice(True, f"forward = auto: {evidence}")
