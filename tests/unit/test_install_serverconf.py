"""serverconf.with_settings: settings beyond NewConfig added to the installer's config text."""

from __future__ import annotations

from pathlib import Path

import pytest

from webknock.config import load
from webknock.install.console import InstallError
from webknock.install.paths import ServerLayout
from webknock.install.serverconf import NewConfig, config_text, with_settings


def _text(tmp_path: Path) -> str:
    inst = ServerLayout(str(tmp_path)).instance("lab")
    new = NewConfig("22, 2222", "", "600", "https://knock.test/w", "iptables", "root", "no", None)
    return config_text(inst, new)


def test_settings_replace_in_place_append_and_remove(tmp_path: Path) -> None:
    text = _text(tmp_path)
    changed = with_settings(
        text, {"max_time": "900", "ipset": "no", "result_timeout": "5", "audit_log": ""}
    )
    lines = changed.splitlines()
    assert lines.index("max_time = 900") == text.splitlines().index("max_time = 600")
    assert lines[-2:] == ["ipset = no", "result_timeout = 5"]
    assert not any(ln.startswith("audit_log") for ln in lines)
    assert "# every grant, renewal, expiry and revoke (webknockctl log reads it)" in lines
    config = tmp_path / "lab.ini"
    config.write_text(changed)
    cfg = load(config)
    assert (cfg.max_time, cfg.ipset, cfg.result_timeout, cfg.audit_log) == (900, "no", 5, None)
    assert cfg.tcp_ports == frozenset({22, 2222}) and cfg.instance == "lab"


def test_settings_stay_in_the_server_section(tmp_path: Path) -> None:
    text = _text(tmp_path) + "[notify]\nbackend = none\n"
    changed = with_settings(text, {"backend": "nftables", "forward": "no"})
    server, notify = changed.split("[notify]\n")
    assert "backend = nftables\n" in server and server.endswith("forward = no\n")
    assert notify == "backend = none\n"


def test_text_without_a_server_section_is_refused() -> None:
    with pytest.raises(InstallError, match=r"no \[server\] line"):
        with_settings("[client]\nurl = x\n", {"ipset": "no"})


def test_a_profile_section_between_markers(tmp_path: Path) -> None:
    blob = "-----BEGIN-----\n[client]\nurl = u\nports = tcp/22\n[v1]\nk = 1\n-----END-----\n"
    changed = with_settings(blob, {"ports": "tcp/2222", "timeout": "10"}, section="client")
    assert changed == (
        "-----BEGIN-----\n[client]\nurl = u\nports = tcp/2222\ntimeout = 10\n"
        "[v1]\nk = 1\n-----END-----\n"
    )


def test_no_url_writes_no_url_line(tmp_path: Path) -> None:
    inst = ServerLayout(str(tmp_path)).instance("lab")
    new = NewConfig("22", "", "600", "", "iptables", "root", "no", None)
    config = tmp_path / "lab.ini"
    config.write_text(config_text(inst, new))
    assert "url =" not in config.read_text() and load(config).url == ""
