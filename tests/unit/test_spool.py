"""Spool validation: every way a request file can be bad is refused with a reason."""

from __future__ import annotations

import ipaddress
import json
import os
import pwd
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO
from webknock.config import SpoolPaths
from webknock.spool import encode_request, write_request
from webknock.spool_reader import SpoolError, parse_request, read_request
from webknock.spooldirs import RETIRED, layout

OFFERED = frozenset({("tcp", 22), ("tcp", 2222), ("udp", 51820)})
RID = "0123456789abcdef0123456789abcdef"
WEB_UID = pwd.getpwnam("www-data").pw_uid
ALLOWED = frozenset({0, WEB_UID})


def good(**changes: Any) -> bytes:
    obj: dict[str, Any] = {
        "v": 1,
        "ip": "192.0.2.10",
        "ports": [["tcp", 22]],
        "time": 60,
        "received": 1.0,
        "ua": "x",
    }
    obj.update(changes)
    return json.dumps(obj).encode()


def parse(data: bytes) -> object:
    return parse_request(RID, data, offered=OFFERED, max_time=3600)


def test_encode_parse_round_trip() -> None:
    data = encode_request(
        ipaddress.ip_address("2001:db8::10"), [("tcp", 22), ("udp", 51820)], 60, 5.0, "ua"
    )
    req = parse_request(RID, data, offered=OFFERED, max_time=3600)
    assert str(req.ip) == "2001:db8::10" and req.ports == (("tcp", 22), ("udp", 51820))
    assert req.time == 60 and req.user_agent == "ua"


def test_mapped_v4_is_normalised() -> None:
    req = parse_request(RID, good(ip="::ffff:192.0.2.10"), offered=OFFERED, max_time=3600)
    assert req.ip == ipaddress.ip_address("192.0.2.10")


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "not JSON"),
        (b"[]", "not a version-1"),
        (good(v=2), "not a version-1"),
        (good(extra=1), "unexpected or missing"),
        (good(ip=5), "ip is not a string"),
        (good(ip="192.0.2.300"), "not an address"),
        (good(ip="0.0.0.0"), "unspecified"),
        (good(ip="::"), "unspecified"),
        (good(ip="224.0.0.1"), "multicast"),
        (good(ip="ff02::1"), "multicast"),
        (good(ip="255.255.255.255"), "broadcast"),
        (good(ports=[]), "1 to 256"),
        (good(ports="tcp/22"), "1 to 256"),
        (good(ports=[["tcp", 23]]), "not offered"),
        (good(ports=[["TCP", 22]]), "not offered"),
        (good(ports=[["tcp", "22"]]), "not \\[proto, number\\]"),
        (good(ports=[["tcp", True]]), "not \\[proto, number\\]"),
        (good(ports=[["tcp", 22, 1]]), "not \\[proto, number\\]"),
        (good(time=0), "time 0"),
        (good(time=3601), "time 3601"),
        (good(time=1.5), "time 1.5"),
        (good(received="now"), "received"),
        (good(ua=5), "ua is not"),
    ],
)
def test_content_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(SpoolError, match=reason):
        parse(data)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path


def read(path: Path) -> object:
    return read_request(path, allowed_uids=ALLOWED, offered=OFFERED, max_time=3600)


def test_write_request_is_atomic_with_mode(spool: Path) -> None:
    path = Path(write_request(spool, RID, good()))
    assert path.name == f"{RID}.req"
    assert oct(path.stat().st_mode & 0o777) == oct(0o640)
    assert not list(spool.glob(".*"))
    assert str(read(path).ip) == "192.0.2.10"  # type: ignore[attr-defined]


def test_bad_name(spool: Path) -> None:
    path = spool / "evil.req"
    path.write_bytes(good())
    with pytest.raises(SpoolError, match="bad file name"):
        read(path)


def test_symlink_refused(spool: Path) -> None:
    target = spool / "target"
    target.write_bytes(good())
    link = spool / f"{RID}.req"
    link.symlink_to(target)
    with pytest.raises(SpoolError, match="cannot open"):
        read(link)


def test_hard_link_refused(spool: Path) -> None:
    target = spool / "target"
    target.write_bytes(good())
    link = spool / f"{RID}.req"
    os.link(target, link)
    with pytest.raises(SpoolError, match="2 hard links"):
        read(link)


def test_fifo_refused_without_blocking(spool: Path) -> None:
    fifo = spool / f"{RID}.req"
    os.mkfifo(fifo)
    with pytest.raises(SpoolError, match="not a regular file"):
        read(fifo)


def test_directory_refused(spool: Path) -> None:
    (spool / f"{RID}.req").mkdir()
    with pytest.raises(SpoolError, match="not a regular file"):
        read(spool / f"{RID}.req")


def test_foreign_owner_refused(spool: Path) -> None:
    path = spool / f"{RID}.req"
    path.write_bytes(good())
    os.chown(path, 65534, 65534)
    with pytest.raises(SpoolError, match="owned by uid 65534"):
        read(path)


def test_web_user_owner_accepted(spool: Path) -> None:
    path = spool / f"{RID}.req"
    path.write_bytes(good())
    os.chown(path, WEB_UID, -1)
    assert read(path)


def test_huge_file_refused(spool: Path) -> None:
    path = spool / f"{RID}.req"
    path.write_bytes(b" " * 100_000)
    with pytest.raises(SpoolError, match="exceeds"):
        read(path)


def test_uninstall_knows_every_spool_directory(tmp_path: Path) -> None:
    """install.sh removes the spool layout by name: it must name every directory."""
    paths = SpoolPaths(tmp_path)
    made = {p.name for p, *_ in layout(paths, 0) if p != paths.root}
    loop = re.search(r"for sub in ([a-z ]+); do", (REPO / "install.sh").read_text())
    assert loop is not None and set(loop[1].split()) == made | set(RETIRED)
