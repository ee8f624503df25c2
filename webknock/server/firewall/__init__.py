"""Firewall backends behind one interface, chosen by ``backend = auto|iptables|nftables``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from webknock.config import ServerConfig
from webknock.server.firewall.base import (
    Firewall,
    FirewallError,
    FirewallSettings,
    Runner,
    run_command,
)
from webknock.server.firewall.forward import ForwardChoice, container_bridge, decide

log = logging.getLogger(__name__)

__all__ = [
    "Firewall",
    "FirewallError",
    "FirewallSettings",
    "build_backend",
    "forward_choice",
    "make_firewall",
    "settings_of",
    "teardown_all",
]


def settings_of(cfg: ServerConfig, forward: bool = False) -> FirewallSettings:
    """The backend's settings of `cfg`, with the effective `forward` (see forward_choice)."""
    return FirewallSettings(
        instance=cfg.instance,
        chain=cfg.chain,
        tcp_ports=cfg.tcp_ports,
        udp_ports=cfg.udp_ports,
        protect=cfg.protect,
        ipset=cfg.ipset,
        forward=forward,
    )


def backend_classes() -> dict[str, type[Firewall]]:
    """Registry of backends, in the order ``auto`` tries them."""
    from webknock.server.firewall.iptables import IptablesFirewall
    from webknock.server.firewall.nftables import NftablesFirewall

    return {"nftables": NftablesFirewall, "iptables": IptablesFirewall}


def build_backend(
    cls: type[Firewall], settings: FirewallSettings, runner: Runner = run_command
) -> Firewall:
    """The backend object for `settings`. iptables has two variants, chosen here by the
    registry so that neither module imports the other: ``ipset = yes`` the ipset variant
    (or an error), ``auto`` ipset when the ipset tool works, else the linear chain, ``no``
    the linear chain. With forward on, ``auto`` is the linear chain too: ipset sets cannot
    match a DNAT'ed connection's original port."""
    from webknock.server.firewall.iptables import IptablesFirewall

    if cls is not IptablesFirewall or settings.ipset == "no":
        return cls.build(settings, runner)
    if settings.forward:
        if settings.ipset == "yes":  # forward.decide refuses this first
            raise FirewallError("forward needs the linear iptables chain, not ipset = yes")
        log.info("forward on: the linear iptables chain (ipset cannot match DNAT'ed ports)")
        return cls.build(settings, runner)
    from webknock.server.firewall.ipset import IpsetFirewall

    why = IpsetFirewall.unusable(runner)
    if why is None:
        return IpsetFirewall(settings, runner)
    if settings.ipset == "yes":
        raise FirewallError(f"ipset = yes but ipset is unusable: {why}")
    log.info("ipset unusable (%s): using the linear iptables chain", why)
    return cls.build(settings, runner)


def forward_choice(
    cfg: ServerConfig,
    cls: type[Firewall],
    runner: Runner = run_command,
    bridges: Callable[[], str | None] = container_bridge,
) -> ForwardChoice:
    """The effective ``forward`` of `cfg` for backend `cls` (probes only with protect on):
    `bridges` and the backend's :meth:`~Firewall.container_chain` are the evidence."""
    from webknock.server.firewall.iptables import IptablesFirewall

    evidence = None
    if cfg.protect and cfg.forward != "yes":
        evidence = cls.container_chain(runner) or bridges()
    ipset_only = issubclass(cls, IptablesFirewall) and cfg.ipset == "yes"
    return decide(cfg.forward, protect=cfg.protect, evidence=evidence, ipset_only=ipset_only)


def _build(
    cfg: ServerConfig,
    cls: type[Firewall],
    runner: Runner,
    bridges: Callable[[], str | None],
    follow_kernel: bool,
) -> Firewall:
    """Backend `cls` for `cfg` with its effective forward setting, logged once. With
    `follow_kernel`, ``forward = auto`` is what webknockd set up, when it did."""
    choice = forward_choice(cfg, cls, runner, bridges)
    firewall = build_backend(cls, settings_of(cfg, choice.on), runner)
    if follow_kernel and cfg.protect and cfg.forward == "auto":
        held = firewall.forward_held()
        if held is not None and held != choice.on:
            how = "with" if held else "without"
            choice = ForwardChoice(held, f"forward = auto: as webknockd set it up ({how} it)")
            firewall = build_backend(cls, settings_of(cfg, held), runner)
    level = logging.INFO if cfg.protect else logging.DEBUG  # without protect it cannot matter
    log.log(level, "forward %s (%s)", "on" if choice.on else "off", choice.why)
    if choice.warning:
        log.warning("%s", choice.warning)
    return firewall


def make_firewall(
    cfg: ServerConfig,
    runner: Runner = run_command,
    bridges: Callable[[], str | None] = container_bridge,
    *,
    follow_kernel: bool = False,
) -> Firewall:
    """Build the configured backend; ``auto`` probes and logs its choice once, and so does
    ``forward`` (`bridges` finds a container bridge: see :mod:`.forward`). webknockd
    decides ``forward = auto`` when it starts; every other process (`follow_kernel`:
    webknockctl, the reaper) takes what webknockd set up, so that none undoes the other."""
    registry = backend_classes()
    if cfg.backend != "auto":
        cls = registry.get(cfg.backend)
        if cls is None:
            raise FirewallError(f"backend {cfg.backend!r} is not available in this build")
        why = cls.unusable(runner)
        if why:
            raise FirewallError(f"backend {cfg.backend} unusable: {why}")
        return _build(cfg, cls, runner, bridges, follow_kernel)
    reasons = []
    for name, cls in registry.items():
        why = cls.unusable(runner)
        if why is None:
            fw = _build(cfg, cls, runner, bridges, follow_kernel)
            log.info("backend auto: chose %s", fw.describe())
            return fw
        reasons.append(f"{name}: {why}")
    raise FirewallError("no usable firewall backend (" + "; ".join(reasons) + ")")


def teardown_all(cfg: ServerConfig, runner: Runner = run_command) -> list[str]:
    """Remove this instance's objects from every usable backend (the configured one and any
    left from an earlier ``backend``/``ipset``/``forward`` setting: a backend's teardown
    removes its forward-path objects whatever the setting); return what was torn down."""
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
