"""The spool between CGI and webknockd: the CGI's frame (spool.encode_request) and how root
reads it back (spool_reader), file and frame checked as untrusted input, every way a
request file can be bad refused with a reason."""

from __future__ import annotations

import errno
import os
import pwd
import re
from pathlib import Path
from typing import Any

import pytest

import webknock.spool as spool_layout
from webknock.config import SpoolPaths
from webknock.protocol import transport
from webknock.spool import HEADER_LIMITS, MAGIC
from webknock.spool import request as spool
from webknock.spool.mount import RETIRED, layout, prepare_spool
from webknock.spool.reader import (
    SpooledRequest,
    SpoolError,
    parse_request,
    read_request,
    request_name_id,
)
from webknock.spool.request import encode_request, header_value, write_request

RID = "0123456789abcdef0123456789abcdef"
WEB = pwd.getpwnam("www-data")
ALLOWED = frozenset({0, WEB.pw_uid})
V1_PACKET = bytes(range(256)) * 4  # 1024 bytes: two blocks, newlines inside
V2_PACKET = transport.V2_REQUEST_MAGIC + bytes(range(200))


def good(**changes: Any) -> bytes:
    """A valid frame, with some of encode_request's arguments changed."""
    args: dict[str, Any] = {
        "field": "v1",
        "remote": "192.0.2.10",
        "forwarded": "",
        "agent": "x",
        "packet": V1_PACKET,
    }
    args.update(changes)
    return encode_request(**args)


def parse(data: bytes) -> SpooledRequest:
    return parse_request(RID, data)


# -- the frame --------------------------------------------------------------------------------


def test_the_frame_is_magic_headers_empty_line_packet() -> None:
    data = encode_request("v2", "2001:db8::10", "203.0.113.5, 2001:db8::77", "ua/1", V2_PACKET)
    assert data == (
        b"webknock-spool 2\n"
        b"field=v2\n"
        b"remote=2001:db8::10\n"
        b"forwarded=203.0.113.5, 2001:db8::77\n"
        b"agent=ua/1\n"
        b"\n" + V2_PACKET
    )
    assert data.startswith(MAGIC) and spool_layout.HEADERS == (
        "field",
        "remote",
        "forwarded",
        "agent",
    )


@pytest.mark.parametrize("protocol", ["v1", "v2"])
def test_encode_parse_round_trip(protocol: str) -> None:
    packet = V1_PACKET if protocol == "v1" else V2_PACKET
    req = parse_request(RID, good(field=protocol, packet=packet, forwarded="a, b"), 12.5)
    assert req == SpooledRequest(RID, protocol, "192.0.2.10", "a, b", "x", packet, 12.5)


@pytest.mark.parametrize(
    ("text", "limit", "value"),
    [
        ("plain text/1.0 (x; y)", 200, b"plain text/1.0 (x; y)"),
        ("a\nb\rc\x00d\x1be\x7ff", 200, b"a?b?c?d?e?f"),
        ("caf\u00e9 \u2028 \udcff", 200, b"caf? ? ?"),  # the last: a non-UTF-8 byte of environ
        ("x" * 300, 200, b"x" * 200),
        ("\u00e9" * 300, 64, b"?" * 64),  # cut in characters, each one byte
        ("", 8, b""),
    ],
)
def test_header_values_are_printable_ascii_and_cut(text: str, limit: int, value: bytes) -> None:
    assert header_value(text, limit) == value


def test_encode_cuts_each_header_to_its_limit_and_the_reader_takes_it() -> None:
    long = {name: "9" * 5000 for name in ("remote", "forwarded", "agent")}
    req = parse(good(**long))
    assert len(req.remote) == HEADER_LIMITS["remote"] == 64
    assert len(req.forwarded) == HEADER_LIMITS["forwarded"] == 1024
    assert len(req.agent) == HEADER_LIMITS["agent"] == 200


def test_the_largest_frame_fits_the_size_limit() -> None:
    long = {name: "9" * 5000 for name in ("remote", "forwarded", "agent")}
    for packet in (bytes(transport.MAX_PACKET), V2_PACKET[:4] + bytes(transport.MAX_V2_BODY + 72)):
        field = "v1" if len(packet) == transport.MAX_PACKET else "v2"
        assert len(good(field=field, packet=packet, **long)) <= spool_layout.MAX_REQUEST_BYTES
        assert parse(good(field=field, packet=packet, **long)).packet == packet


def replace_line(data: bytes, old: bytes, new: bytes) -> bytes:
    assert old in data
    return data.replace(old, new, 1)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "not a request frame"),
        (b'{"v": 1, "ip": "192.0.2.10", "ports": [["tcp", 22]]}', "not a request frame"),
        (b"webknock-spool 1\n" + good()[len(MAGIC) :], "not a request frame"),
        (b"WEBKNOCK-SPOOL 2\n" + good()[len(MAGIC) :], "not a request frame"),
        (good().replace(b"\n", b"\r\n"), "not a request frame"),
        (MAGIC, "'field' missing"),
        (MAGIC + b"field=v1", "'field' missing"),
        (replace_line(good(), b"field=v1\n", b""), "'field' missing"),
        (replace_line(good(), b"remote=", b"Remote="), "'remote' missing or out of order"),
        (replace_line(good(), b"remote=192.0.2.10\n", b""), "'remote' missing"),
        (replace_line(good(), b"remote=192.0.2.10", b"remote 192.0.2.10"), "'remote' missing"),
        (replace_line(good(), b"field=v1\n", b"remote=192.0.2.10\nfield=v1\n"), "'field'"),
        (replace_line(good(), b"agent=x\n", b"agent=x\nagent=y\n"), "no empty line"),
        (replace_line(good(), b"agent=x\n\n", b"agent=x\n"), "no empty line"),
        (replace_line(good(), b"\n\n", b"\n \n"), "no empty line"),
        (replace_line(good(), b"field=v1", b"field=v1x"), "unknown protocol"),
        (replace_line(good(), b"field=v1", b"field=V1"), "unknown protocol"),
        (replace_line(good(), b"field=v1", b"field="), "unknown protocol"),
        (replace_line(good(), b"field=v1", b"field=data"), "unknown protocol"),
        (replace_line(good(), b"field=v1", b"field=v1v1v1v1v"), "'field' is too long"),
        (replace_line(good(), b"=192.0.2.10", b"=" + b"1" * 65), "'remote' is too long"),
        (replace_line(good(), b"forwarded=", b"forwarded=" + b"1" * 1025), "'forwarded' is too"),
        (replace_line(good(), b"agent=x", b"agent=" + b"x" * 201), "'agent' is too long"),
        (replace_line(good(), b"agent=x", b"agent=\x1b[31m"), "'agent' is too long or not"),
        (replace_line(good(), b"agent=x", b"agent=\tx"), "not printable ASCII"),
        (replace_line(good(), b"agent=x", b"agent=\x7f"), "not printable ASCII"),
        (replace_line(good(), b"agent=x", b"agent=caf\xc3\xa9"), "not printable ASCII"),
        (replace_line(good(), b"remote=192.0.2.10", b"remote=192.0.2.10\r"), "printable ASCII"),
        (good(packet=b""), "packet length 0"),
        (good(packet=V1_PACKET[:511]), "packet length 511"),
        (good(packet=V1_PACKET + b"\n"), "packet length 1025"),
        (good(packet=bytes(transport.MAX_PACKET + 512)), "packet length 2560"),
        (good(field="v1", packet=V2_PACKET), "packet length 204"),
        (good(field="v2", packet=V1_PACKET), "wrong magic"),
        (good(field="v2", packet=b"WK2R" + V2_PACKET[4:]), "wrong magic"),  # a reply
        (good(field="v2", packet=V2_PACKET[: transport.V2_HEAD]), "v2 packet of 76 bytes"),
        (good(field="v2", packet=V2_PACKET[:4] + bytes(2121)), "v2 packet of 2125 bytes"),
    ],
)
def test_frame_rejections(data: bytes, reason: str) -> None:
    with pytest.raises(SpoolError, match=re.escape(reason)) as info:
        parse(data)
    assert "\n" not in str(info.value), "a reason is one log line"


@pytest.mark.parametrize(
    ("name", "rid"),
    [
        (f"{RID}.req", RID),
        (f"{RID}.REQ", None),
        (f"{RID.upper()}.req", None),
        (f"{RID}0.req", None),
        (f"{RID[:-1]}.req", None),
        (f".{RID}.tmp", None),
        (f"{RID}", None),
        (f"{RID}.req.tmp", None),
        ("evil.req", None),
        (f"../{RID}.req", None),
        (".req", None),
    ],
)
def test_request_names(name: str, rid: str | None) -> None:
    assert request_name_id(name) == rid


# -- the file ---------------------------------------------------------------------------------


@pytest.fixture
def spooldir(tmp_path: Path) -> Path:
    return tmp_path


def read(path: Path) -> SpooledRequest:
    return read_request(path, allowed_uids=ALLOWED)


def test_write_request_is_atomic_with_mode(spooldir: Path) -> None:
    old = os.umask(0o077)
    try:
        path = Path(write_request(str(spooldir), RID, good()))
    finally:
        os.umask(old)
    assert path.name == f"{RID}.req"
    assert oct(path.stat().st_mode & 0o777) == oct(0o640), "whatever the umask"
    assert not list(spooldir.glob(".*"))
    req = read(path)
    assert (req.id, req.remote, req.packet) == (RID, "192.0.2.10", V1_PACKET)
    assert req.arrived == path.stat().st_ctime


def test_a_failed_write_leaves_nothing(spooldir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.write

    def full(fd: int, data: Any) -> int:
        if len(data) > 100:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        write_request(str(spooldir), RID, good())
    assert os.listdir(spooldir) == []


def test_submit_rings_first_and_leaves_nothing_when_it_fails(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path / "spool")
    prepare_spool(paths, WEB.pw_gid)
    with spool.submit(str(paths.root), good()) as submitted:
        rid = Path(submitted.request_path).name.removesuffix(".req")
        assert os.listdir(paths.waits) == [rid] and os.listdir(paths.requests) == [f"{rid}.req"]
        assert read(Path(submitted.request_path)).packet == V1_PACKET
    assert os.listdir(paths.waits) == [], "the bell goes with the CGI"
    os.unlink(paths.requests / f"{rid}.req")
    os.rmdir(paths.requests)  # the request cannot be written: no bell left either
    with pytest.raises(FileNotFoundError):
        spool.submit(str(paths.root), good())
    assert os.listdir(paths.waits) == []
    os.rmdir(paths.waits)  # no bell: no request
    paths.requests.mkdir()
    with pytest.raises(FileNotFoundError):
        spool.submit(str(paths.root), good())
    assert os.listdir(paths.requests) == []


def test_an_unclaimed_request_is_withdrawn_when_no_answer_comes(tmp_path: Path) -> None:
    paths = SpoolPaths(tmp_path / "spool")
    prepare_spool(paths, WEB.pw_gid)
    with spool.submit(str(paths.root), good()) as submitted:
        assert submitted.answer(0.01) is None
        assert os.listdir(paths.requests) == [], "never applied after the client heard 504"


def test_bad_name(spooldir: Path) -> None:
    path = spooldir / "evil.req"
    path.write_bytes(good())
    with pytest.raises(SpoolError, match="bad file name"):
        read(path)


def test_symlink_refused(spooldir: Path) -> None:
    target = spooldir / "target"
    target.write_bytes(good())
    link = spooldir / f"{RID}.req"
    link.symlink_to(target)
    with pytest.raises(SpoolError, match="cannot open"):
        read(link)


def test_hard_link_refused(spooldir: Path) -> None:
    target = spooldir / "target"
    target.write_bytes(good())
    link = spooldir / f"{RID}.req"
    os.link(target, link)
    with pytest.raises(SpoolError, match="2 hard links"):
        read(link)


def test_fifo_refused_without_blocking(spooldir: Path) -> None:
    fifo = spooldir / f"{RID}.req"
    os.mkfifo(fifo)
    with pytest.raises(SpoolError, match="not a regular file"):
        read(fifo)


def test_directory_refused(spooldir: Path) -> None:
    (spooldir / f"{RID}.req").mkdir()
    with pytest.raises(SpoolError, match="not a regular file"):
        read(spooldir / f"{RID}.req")


def test_foreign_owner_refused(spooldir: Path) -> None:
    path = spooldir / f"{RID}.req"
    path.write_bytes(good())
    os.chown(path, 65534, 65534)
    with pytest.raises(SpoolError, match="owned by uid 65534"):
        read(path)


def test_web_user_owner_accepted(spooldir: Path) -> None:
    path = spooldir / f"{RID}.req"
    path.write_bytes(good())
    os.chown(path, WEB.pw_uid, -1)
    assert read(path).packet == V1_PACKET


def test_huge_file_refused(spooldir: Path) -> None:
    path = spooldir / f"{RID}.req"
    path.write_bytes(good() + b" " * 100_000)
    with pytest.raises(SpoolError, match="exceeds"):
        read(path)


def test_read_request_checks_the_frame_too(spooldir: Path) -> None:
    path = spooldir / f"{RID}.req"
    path.write_bytes(good(field="v2"))
    with pytest.raises(SpoolError, match="wrong magic"):
        read(path)


def test_uninstall_knows_every_spool_directory(tmp_path: Path) -> None:
    """install.sh uninstall removes every directory of the spool layout."""
    paths = SpoolPaths(tmp_path)
    made = {p.name for p, *_ in layout(paths, 0) if p != paths.root}
    assert made == {
        spool_layout.REQUESTS_DIR,
        spool_layout.CLAIMED_DIR,
        spool_layout.REJECTED_DIR,
        spool_layout.WAITS_DIR,
    }
    from tests.unit.fixtures.install.fakehost import fake_host
    from webknock.install.uninstall import remove_spool

    prepare_spool(paths, 0)
    for name in RETIRED:
        (tmp_path / name).mkdir()
    remove_spool(fake_host(), tmp_path)
    assert not tmp_path.exists(), "every directory webknockd made (and earlier versions) went"
