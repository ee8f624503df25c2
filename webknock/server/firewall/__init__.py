"""Firewall backends behind one interface, chosen by ``backend = auto|iptables|nftables``."""

from __future__ import annotations

import logging
from dataclasses import replace

from webknock.config import ServerConfig
from webknock.server.firewall.base import (
    Firewall,
    FirewallError,
    FirewallSettings,
    Runner,
    run_command,
)

log = logging.getLogger(__name__)

__all__ = [
    "Firewall",
    "FirewallError",
    "FirewallSettings",
    "build_backend",
    "make_firewall",
    "settings_of",
    "teardown_all",
]


def settings_of(cfg: ServerConfig) -> FirewallSettings:
    return FirewallSettings(
        instance=cfg.instance,
        chain=cfg.chain,
        tcp_ports=cfg.tcp_ports,
        udp_ports=cfg.udp_ports,
        protect=cfg.protect,
        ipset=cfg.ipset,
    )


def backend_classes() -> dict[str, type[Firewall]]:
    """Registry of backends, in the order ``auto`` tries them."""
    from webknock.server.firewall.iptables import IptablesFirewall

    registry: dict[str, type[Firewall]] = {}
    try:
        from webknock.server.firewall.nftables import NftablesFirewall

        registry["nftables"] = NftablesFirewall
    except ImportError:  # pragma: no cover - backend module not present
        pass
    registry["iptables"] = IptablesFirewall
    return registry


def build_backend(
    cls: type[Firewall], settings: FirewallSettings, runner: Runner = run_command
) -> Firewall:
    """The backend object for `settings`. iptables has two variants, chosen here by the
    registry so that neither module imports the other: ``ipset = yes`` the ipset variant
    (or an error), ``auto`` ipset when the ipset tool works, else the linear chain, ``no``
    the linear chain."""
    from webknock.server.firewall.iptables import IptablesFirewall

    if cls is not IptablesFirewall or settings.ipset == "no":
        return cls.build(settings, runner)
    from webknock.server.firewall.ipset import IpsetFirewall

    why = IpsetFirewall.unusable(runner)
    if why is None:
        return IpsetFirewall(settings, runner)
    if settings.ipset == "yes":
        raise FirewallError(f"ipset = yes but ipset is unusable: {why}")
    log.info("ipset unusable (%s): using the linear iptables chain", why)
    return cls.build(settings, runner)


def make_firewall(cfg: ServerConfig, runner: Runner = run_command) -> Firewall:
    """Build the configured backend; ``auto`` probes and logs its choice once."""
    registry = backend_classes()
    settings = settings_of(cfg)
    if cfg.backend != "auto":
        cls = registry.get(cfg.backend)
        if cls is None:
            raise FirewallError(f"backend {cfg.backend!r} is not available in this build")
        why = cls.unusable(runner)
        if why:
            raise FirewallError(f"backend {cfg.backend} unusable: {why}")
        return build_backend(cls, settings, runner)
    reasons = []
    for name, cls in registry.items():
        why = cls.unusable(runner)
        if why is None:
            fw = build_backend(cls, settings, runner)
            log.info("backend auto: chose %s", fw.describe())
            return fw
        reasons.append(f"{name}: {why}")
    raise FirewallError("no usable firewall backend (" + "; ".join(reasons) + ")")


def teardown_all(cfg: ServerConfig, runner: Runner = run_command) -> list[str]:
    """Remove this instance's objects from every usable backend (the configured one and any
    left from an earlier ``backend``/``ipset`` setting); return what was torn down."""
    settings = settings_of(cfg)
    done: list[str] = []
    errors: list[str] = []
    for name, cls in backend_classes().items():
        if cls.unusable(runner) is not None:
            continue
        wide = replace(settings, ipset="auto")  # the ipset variant also removes the linear chain
        fw = build_backend(cls, wide, runner)
        try:
            fw.teardown()
        except FirewallError as exc:
            errors.append(f"{name}: {exc}")
            continue
        done.append(fw.describe())
    if errors:
        raise FirewallError("teardown failed: " + "; ".join(errors))
    return done
