"""``[server] forward``: the effective setting from the mode, protect and the evidence of a
container runtime (a container bridge, Docker's DOCKER-USER chain), injected here; the
backend make_firewall builds from it, and check-config's warning."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from tests.fakes import RecordingRunner
from webknock import config
from webknock.server.firewall import forward_choice, make_firewall
from webknock.server.firewall.base import FirewallError
from webknock.server.firewall.forward import ForwardChoice, container_bridge, decide
from webknock.server.firewall.ipset import IpsetFirewall
from webknock.server.firewall.iptables import IptablesFirewall

DOCKER = "bridge docker0 exists"
SAVE = "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n{more}COMMIT\n"


@pytest.mark.parametrize(
    ("mode", "protect", "evidence", "ipset_only", "on", "why", "warns"),
    [
        ("auto", True, DOCKER, False, True, f"forward = auto: {DOCKER}", False),
        ("auto", True, None, False, False, "forward = auto: no container runtime found", False),
        ("auto", False, DOCKER, False, False, "protect = no: nothing of ours closes a port", False),
        ("yes", True, None, False, True, "forward = yes", False),
        ("no", True, None, False, False, "forward = no", False),
        ("no", True, DOCKER, False, False, "forward = no", True),
        ("no", False, DOCKER, False, False, "protect = no: nothing of ours closes a port", False),
        ("auto", True, DOCKER, True, False, f"forward = auto: {DOCKER}, but ipset = yes", True),
        ("auto", True, None, True, False, "forward = auto: no container runtime found", False),
    ],
)
def test_decide(
    mode: str,
    protect: bool,
    evidence: str | None,
    ipset_only: bool,
    on: bool,
    why: str,
    warns: bool,
) -> None:
    choice = decide(mode, protect=protect, evidence=evidence, ipset_only=ipset_only)
    assert (choice.on, choice.why, choice.warning is not None) == (on, why, warns)
    if choice.warning:
        assert DOCKER in choice.warning and "not guarded" in choice.warning


def test_forward_yes_with_ipset_yes_is_refused() -> None:
    with pytest.raises(FirewallError, match="forward = yes needs the linear iptables chain"):
        decide("yes", protect=True, evidence=None, ipset_only=True)


def test_container_bridge_finds_docker_podman_and_br_bridges(tmp_path: Path) -> None:
    net = tmp_path / "net"
    assert container_bridge(net) is None, "no such directory: no evidence"
    (net / "eth0").mkdir(parents=True)
    (net / "br-lan" / "bridge").mkdir(parents=True)  # a router's bridge, not Docker's
    (net / "br-0123456789ab").mkdir()  # not a bridge: no bridge/ directory
    assert container_bridge(net) is None
    (net / "br-4f2a9c0e1d2b").mkdir()
    (net / "br-4f2a9c0e1d2b" / "bridge").mkdir()
    assert container_bridge(net) == "bridge br-4f2a9c0e1d2b exists"
    for name in ("podman0", "cni-podman0", "docker0"):
        (net / name).mkdir()
    assert container_bridge(net) == "bridge br-4f2a9c0e1d2b exists", "the first by name"
    os.rename(net / "br-4f2a9c0e1d2b", net / "zz")
    assert container_bridge(net) == "bridge cni-podman0 exists"


@pytest.fixture
def usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every iptables variant usable, whatever this host has."""
    for cls in (IptablesFirewall, IpsetFirewall):
        monkeypatch.setattr(cls, "unusable", classmethod(lambda c, r=None: None))


def cfg_of(instance_config: Path, **kw: object) -> config.ServerConfig:
    return dataclasses.replace(config.load(instance_config), **kw)  # type: ignore[arg-type]


@pytest.mark.usefixtures("usable")
def test_make_firewall_turns_forward_on_by_a_bridge_or_docker_user(
    instance_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = cfg_of(instance_config, protect=True, ipset="no")
    plain = RecordingRunner({"iptables-save": SAVE.format(more="")})
    with caplog.at_level("INFO"):
        fw = make_firewall(cfg, plain, bridges=lambda: DOCKER)
    assert fw.settings.forward and f"forward on (forward = auto: {DOCKER})" in caplog.text
    assert "forward chain WEBKNOCK-FWD" in fw.describe()
    docker = RecordingRunner({"iptables-save": SAVE.format(more=":DOCKER-USER - [0:0]\n")})
    assert make_firewall(cfg, docker, bridges=lambda: None).settings.forward
    caplog.clear()
    with caplog.at_level("INFO"):
        assert not make_firewall(cfg, plain, bridges=lambda: None).settings.forward
    assert "forward off (forward = auto: no container runtime found)" in caplog.text
    off = cfg_of(instance_config, protect=False, ipset="no")
    assert not make_firewall(off, docker, bridges=lambda: DOCKER).settings.forward


@pytest.mark.usefixtures("usable")
def test_forward_on_picks_the_linear_chain_and_ipset_yes_keeps_it_off(
    instance_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runner = RecordingRunner({"iptables-save": SAVE.format(more="")})
    cfg = cfg_of(instance_config, protect=True, ipset="auto")
    assert type(make_firewall(cfg, runner, bridges=lambda: None)) is IpsetFirewall
    linear = make_firewall(cfg, runner, bridges=lambda: DOCKER)
    assert type(linear) is IptablesFirewall and linear.settings.forward
    strict = dataclasses.replace(cfg, ipset="yes")
    with caplog.at_level("WARNING"):
        kept = make_firewall(strict, runner, bridges=lambda: DOCKER)
    assert type(kept) is IpsetFirewall and not kept.settings.forward
    assert "ipset = yes: ports that containers publish are not guarded" in caplog.text
    with pytest.raises(FirewallError, match="forward = yes needs the linear iptables chain"):
        make_firewall(dataclasses.replace(strict, forward="yes"), runner)


def test_forward_choice_probes_only_when_it_can_matter(instance_config: Path) -> None:
    asked: list[str] = []

    def bridges() -> str | None:
        asked.append("bridges")
        return None

    runner = RecordingRunner({"iptables-save": SAVE.format(more="")})
    cfg = cfg_of(instance_config, protect=False)
    assert forward_choice(cfg, IptablesFirewall, runner, bridges) == ForwardChoice(
        False, "protect = no: nothing of ours closes a port"
    )
    yes = cfg_of(instance_config, protect=True, forward="yes")
    assert forward_choice(yes, IptablesFirewall, runner, bridges).on
    assert asked == [] and runner.calls == []
    auto = cfg_of(instance_config, protect=True)
    assert not forward_choice(auto, IptablesFirewall, runner, bridges).on
    assert asked == ["bridges"] and runner.calls == [(["iptables-save", "-t", "filter"], None)]


@pytest.mark.skipif(os.geteuid() != 0, reason="check-config builds the backend only as root")
def test_check_config_warns_of_published_ports_left_unguarded(
    instance_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from webknock.server import firewall
    from webknock.server.checks import check_installation

    docker = classmethod(lambda c, r=None: "iptables chain DOCKER-USER exists")
    monkeypatch.setattr(IptablesFirewall, "container_chain", docker)
    monkeypatch.setattr(
        firewall, "make_firewall", lambda cfg, **kw: IptablesFirewall(firewall.settings_of(cfg))
    )
    off = cfg_of(instance_config, protect=True, forward="no")
    warnings = [m for level, m in check_installation(off) if "forward" in m]
    assert warnings == [
        f"{instance_config}: [server] forward = no but iptables chain DOCKER-USER exists: "
        "ports that containers publish are not guarded by webknock (set forward = auto)"
    ]
    auto = cfg_of(instance_config, protect=True)
    assert [m for _, m in check_installation(auto) if "forward" in m] == []


@pytest.mark.usefixtures("usable")
def test_webknockctl_follows_the_forward_chain_webknockd_set_up(
    instance_config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """forward = auto is webknockd's decision at its start; a webknockctl command built
    after Docker appeared (or went) must not undo it, nor webknockd undo the command's."""
    cfg = cfg_of(instance_config, protect=True, ipset="no")
    ours = ":WEBKNOCK - [0:0]\n:WEBKNOCK-GRANTS - [0:0]\n"
    daemon_without = RecordingRunner({"iptables-save": SAVE.format(more=ours)})
    assert make_firewall(cfg, daemon_without, bridges=lambda: DOCKER).settings.forward
    with caplog.at_level("INFO"):
        ctl = make_firewall(cfg, daemon_without, bridges=lambda: DOCKER, follow_kernel=True)
    assert not ctl.settings.forward
    assert "forward off (forward = auto: as webknockd set it up (without it))" in caplog.text
    held = ours + ":WEBKNOCK-FWD - [0:0]\n:WEBKNOCK-FWD-G - [0:0]\n"
    daemon_with = RecordingRunner({"iptables-save": SAVE.format(more=held)})
    follows = make_firewall(cfg, daemon_with, bridges=lambda: None, follow_kernel=True)
    assert follows.settings.forward
    nothing_yet = RecordingRunner({"iptables-save": SAVE.format(more="")})
    first = make_firewall(cfg, nothing_yet, bridges=lambda: DOCKER, follow_kernel=True)
    assert first.settings.forward, "no webknockd yet: the command decides as webknockd will"
    fixed = cfg_of(instance_config, protect=True, ipset="no", forward="no")
    assert not make_firewall(
        fixed, daemon_with, bridges=lambda: None, follow_kernel=True
    ).settings.forward
