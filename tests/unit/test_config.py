"""Server config: lookup order, defaults, and one precise error per bad setting."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from tests.conftest import v1_keys_file, write_instance
from webknock.config import ConfigError, config_path, load
from webknock.keys import KeysError, load_keys
from webknock.protocol.v1 import Keys


def test_loads_with_defaults(instance_config: Path) -> None:
    cfg = load(instance_config)
    assert cfg.instance == "webknock" and cfg.chain == "WEBKNOCK"
    assert cfg.tcp_ports == {22, 2222} and cfg.udp_ports == {51820}
    assert cfg.offered() == {("tcp", 22), ("tcp", 2222), ("udp", 51820)}
    assert cfg.max_time == 3600 and cfg.ts_window == 15 and not cfg.protect
    assert cfg.spool.requests == cfg.spool_dir / "requests"


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WEBKNOCK_CONFIG", raising=False)
    assert config_path(None) == Path("/etc/webknock/webknock.ini")
    monkeypatch.setenv("WEBKNOCK_CONFIG", "/srv/a.ini")
    assert config_path(None) == Path("/srv/a.ini")
    assert config_path("/x/b.ini") == Path("/x/b.ini")


def test_instance_from_file_name_sets_chain(tmp_path: Path, vector_keys: Keys) -> None:
    path = write_instance(tmp_path, vector_keys)
    office = path.with_name("office.ini")
    path.rename(office)
    cfg = load(office)
    assert cfg.instance == "office" and cfg.chain == "WK-office"


def test_trusted_proxies_and_section(tmp_path: Path, vector_keys: Keys) -> None:
    path = write_instance(tmp_path, vector_keys, trusted_proxies="192.0.2.0/24, 2001:db8::1")
    path.write_text(path.read_text() + "\n[notify]\nemail_to = a@example.org\n")
    cfg = load(path)
    assert cfg.trusted_proxies == (
        ipaddress.ip_network("192.0.2.0/24"),
        ipaddress.ip_network("2001:db8::1/128"),
    )
    assert cfg.section("notify") == {"email_to": "a@example.org"}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"max_time": "abc"}, r"\[server\] max_time: must be a whole number of seconds, 1-604800"),
        ({"max_time": "0"}, r"\[server\] max_time: must be a whole number of seconds, 1-604800"),
        ({"max_time": "999999999"}, r"max_time: must be a whole number of seconds, 1-604800"),
        ({"ts_window": "1.5"}, r"\[server\] ts_window: must be a whole number of seconds, 1-3600"),
        ({"max_time": ""}, r"\[server\] max_time: missing"),
        ({"tcp_ports": "22, 70000"}, r"\[server\] tcp_ports: port '70000'"),
        ({"tcp_ports": "ssh"}, r"\[server\] tcp_ports: port 'ssh'"),
        ({"tcp_ports": "", "udp_ports": ""}, r"\[server\] tcp_ports: no ports offered"),
        ({"backend": "pf"}, r"\[server\] backend: must be one of auto, iptables, nftables"),
        ({"keys_file": "relative/keys"}, r"\[server\] keys_file: must be an absolute path"),
        ({"protect": "maybe"}, r"\[server\] protect: must be yes or no"),
        ({"chain": "bad chain"}, r"\[server\] chain: must be an iptables chain name"),
        ({"trusted_proxies": "192.0.2.0/33"}, r"trusted_proxies: '192.0.2.0/33' is not a network"),
        ({"spool_dri": "/x"}, r"\[server\] spool_dri: unknown setting"),
        ({"result_timeout": "-1"}, r"result_timeout: must be a number of seconds above 0"),
        ({"result_timeout": "x"}, r"result_timeout: must be a number of seconds above 0"),
        ({"forward": "docker"}, r"\[server\] forward: must be one of auto, yes, no"),
        ({"forward": "yes"}, r"\[server\] forward: yes needs protect = yes"),
        (
            {"forward": "yes", "protect": "yes", "backend": "iptables", "ipset": "yes"},
            r"\[server\] forward: yes needs the linear iptables chain, and ipset = yes forbids",
        ),
        ({"url": "ftp://knock.example.org/x"}, r"\[server\] url: 'ftp://knock.example.org/x' must"),
    ],
)
def test_errors_name_file_section_key(
    tmp_path: Path, vector_keys: Keys, override: dict[str, str], message: str
) -> None:
    path = write_instance(tmp_path, vector_keys, **override)
    with pytest.raises(ConfigError, match=message) as info:
        load(path)
    assert str(info.value).startswith(str(path))
    assert "\n" not in str(info.value)


def test_forward_defaults_to_auto_and_reads_each_mode(tmp_path: Path, vector_keys: Keys) -> None:
    assert load(write_instance(tmp_path, vector_keys)).forward == "auto"
    for mode in ("auto", "yes", "no"):
        path = write_instance(tmp_path, vector_keys, forward=mode, protect="yes")
        assert load(path).forward == mode
    assert load(write_instance(tmp_path, vector_keys, forward="no")).forward == "no"


def test_missing_file_and_section(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "nope.ini")
    bad = tmp_path / "bad.ini"
    bad.write_text("[client]\nurl = x\n")
    with pytest.raises(ConfigError, match=r"missing section \[server\]"):
        load(bad)
    bad.write_text("not an ini file\n")
    with pytest.raises(ConfigError, match="not a valid INI file"):
        load(bad)


def test_keys_file_round_trip_and_mode(instance_config: Path, vector_keys: Keys) -> None:
    cfg = load(instance_config)
    assert load_keys(v1_keys_file(cfg)) == vector_keys
    os.chmod(v1_keys_file(cfg), 0o644)
    with pytest.raises(KeysError, match="readable by everyone"):
        load_keys(v1_keys_file(cfg))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[v1]\nkey1 = 00\n", "missing iv1|must be 64"),
        ("[other]\n", r"missing section \[v1\]"),
        ("garbage", "not a valid INI"),
    ],
)
def test_keys_file_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "k.ini"
    path.write_text(text)
    os.chmod(path, 0o600)
    with pytest.raises(KeysError, match=message):
        load_keys(path)
