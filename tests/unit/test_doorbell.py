"""The CGI's doorbell: a FIFO through which the daemon (root) hands the CGI its answer, an
HTTP status, a note and a body. Root must never block on it, follow a link through it,
or write into anything but the web user's own FIFO (or root's); the CGI never takes a
bad or missing answer for a success, nor passes on a note that could break its header."""

from __future__ import annotations

import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import webknock.spool as spool_layout
from tests.cgi_side import WEB, frame, reply, submit
from tests.conftest import REPO, write_instance
from tests.fakes import memory_daemon
from webknock.config import ServerConfig, load
from webknock.install.service import unit_caps
from webknock.protocol.v1 import Keys
from webknock.server.loop import Daemon
from webknock.spool import doorbell
from webknock.spool import request as spool

ME = frozenset({os.getuid()})
THEIRS = frozenset({WEB.pw_uid})


def readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


@pytest.fixture
def bells(tmp_path: Path) -> Path:
    directory = tmp_path / "waits"
    directory.mkdir()
    return directory


BODY = bytes(range(256)) * 2  # a sealed reply is binary: newlines and all
ANSWER = doorbell.encode_answer(200, "", BODY)


# -- the answer's format ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "note", "body"),
    [
        *[(s, "", b"") for s in sorted(doorbell.STATUSES)],
        (200, "", BODY),
        (200, "", b"\n\n200 \n"),
        (200, "renew soon", b"x"),
        (
            403,
            "clock skew: request time is -100s off the server's 1764000000 (allowed +/-15s)",
            b"",
        ),
        (405, "n" * doorbell.MAX_NOTE, b""),
        (200, "", b"b" * (doorbell.MAX_ANSWER_BYTES - len(b"200 \n"))),
    ],
)
def test_encode_parse_round_trip(status: int, note: str, body: bytes) -> None:
    payload = doorbell.encode_answer(status, note, body)
    assert payload == f"{status} {note}\n".encode() + body
    assert doorbell.parse_answer(payload) == (status, note, body)


@pytest.mark.parametrize(
    ("note", "sent"),
    [
        ("line one\r\nX-Evil: 1", "line one??X-Evil: 1"),
        ("tab\there", "tab?here"),
        ("caf\u00e9 \u00b1 \x7f \x00", "caf? ? ? ?"),
        ("x" * 1000, "x" * doorbell.MAX_NOTE),
    ],
)
def test_a_note_is_cleaned_and_cut_before_it_goes(note: str, sent: str) -> None:
    payload = doorbell.encode_answer(403, note)
    assert doorbell.parse_answer(payload) == (403, sent, b"")


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (302, b""),  # not a status the CGI may say
        (999, b""),
        (0, b""),
        (200, b"x" * doorbell.MAX_ANSWER_BYTES),  # does not fit one write(2)
    ],
)
def test_encode_refuses_what_cannot_be_answered(status: int, body: bytes) -> None:
    with pytest.raises(ValueError, match=r"cannot be answered|does not fit"):
        doorbell.encode_answer(status, "", body)


@pytest.mark.parametrize(
    "data",
    [
        b"",  # the bell opened and closed with nothing written
        b"200",  # no end of the status line
        b"200 ",
        b"2000 \n",
        b"20 \n",
        b"+20 \n",
        b" 200 \n",
        b"2OO \n",
        b"\xb200 \n",
        b"302 \n",  # a status the CGI does not say
        b"100 \n",
        b"999 \n",
        b"403 " + b"x" * (doorbell.MAX_NOTE + 1) + b"\n",
        b"403 caf\xc3\xa9\n",  # not ASCII
        b"403 \xff\n",
        b"403 a\rX-Evil: 1\n",  # would break the header
        b"403 a\tb\n",
        b"403 \x00\n",
        b"403 \x7f\n",
        b"403 \n" + b"body",  # a body is a 200's alone
        b"500 \n\n",
        b'{"v": 1, "ok": true}',  # the answer of an earlier version
        b"[" * 4000,
    ],
)
def test_parse_refuses_every_malformed_answer(data: bytes) -> None:
    assert doorbell.parse_answer(data) == doorbell.UNREADABLE
    assert doorbell.UNREADABLE[0] == 500, "an unreadable answer is never a success"


# -- the FIFO ---------------------------------------------------------------------------------


def test_install_wait_deliver_remove(bells: Path) -> None:
    path = str(bells / "a")
    fd = spool.install_bell(path)
    assert os.stat(path).st_mode & 0o7777 == spool_layout.BELL_MODE, "whatever the umask"
    assert doorbell.wait_bell(fd, 0.01) is None, "no answer yet: the wait times out"
    assert doorbell.deliver(path, ME, ANSWER)
    assert doorbell.wait_bell(fd, 5) == (200, "", BODY)
    spool.remove_bell(path, fd)
    assert os.listdir(bells) == []
    assert not doorbell.deliver(path, ME, ANSWER), "no bell any more"


def test_root_without_dac_override_can_answer(bells: Path) -> None:
    """webknockd runs with the unit's capabilities: no CAP_DAC_OVERRIDE. The bell's mode
    must let it write all the same (and only it: others cannot reach waits/)."""
    path = str(bells / "b")
    fd = spool.install_bell(path)
    os.chown(path, WEB.pw_uid, WEB.pw_gid)
    os.chmod(bells, 0o1730)
    code = (
        "import sys; from webknock.spool import doorbell; "
        f"sys.exit(0 if doorbell.deliver({path!r}, frozenset({{{WEB.pw_uid}}}), {ANSWER!r}) else 1)"
    )
    caps = unit_caps(REPO)
    subprocess.run(
        ["setpriv", "--no-new-privs", f"--bounding-set={caps}", sys.executable, "-c", code],
        check=True,
        cwd=REPO,
    )
    assert doorbell.wait_bell(fd, 5) == (200, "", BODY)
    spool.remove_bell(path, fd)


def test_the_bounding_set_of_that_test_is_the_units() -> None:
    assert unit_caps(REPO) == "-all,+net_admin,+net_raw,+chown,+dac_read_search"


@pytest.mark.parametrize(
    "written",
    [b"", b"yes", b'{"v": 1, "ok": "yes"}', b"\xff\xfe", b"[" * 4000, b"403 \nbody"],
)
def test_a_bad_answer_is_never_a_success(bells: Path, written: bytes) -> None:
    """Written by someone else than webknockd (the web user's processes can), or the bell
    closed without a word: the CGI reads it as UNREADABLE (500)."""
    path = str(bells / "c")
    fd = spool.install_bell(path)
    writer = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    os.write(writer, written)
    os.close(writer)
    assert doorbell.wait_bell(fd, 5) == doorbell.UNREADABLE
    spool.remove_bell(path, fd)


def test_an_answer_too_big_for_one_write_is_refused(bells: Path) -> None:
    path = str(bells / "d")
    fd = spool.install_bell(path)
    with pytest.raises(ValueError, match="does not fit"):
        doorbell.deliver(path, ME, b" " * (doorbell.MAX_ANSWER_BYTES + 1))
    assert not readable(fd), "not a byte of it written"
    spool.remove_bell(path, fd)


def test_nobody_listening_never_blocks(bells: Path) -> None:
    path = str(bells / "gone")
    os.mkfifo(path, 0o600)  # a CGI that died after making its bell
    started = time.monotonic()
    assert not doorbell.deliver(path, ME, ANSWER)  # ENXIO at once
    assert time.monotonic() - started < 0.5


def test_a_full_pipe_does_not_block_either(bells: Path) -> None:
    path = str(bells / "full")
    fd = spool.install_bell(path)
    for _ in range(1000):  # the pipe holds 64 KiB: full long before
        if not doorbell.deliver(path, ME, ANSWER):
            break
    else:
        pytest.fail("the pipe never filled")
    assert readable(fd)
    spool.remove_bell(path, fd)


def test_root_writes_only_into_the_web_users_own_fifo(bells: Path, tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep")
    os.symlink(target, bells / "link")
    assert not doorbell.deliver(str(bells / "link"), THEIRS, ANSWER)
    (bells / "file").write_bytes(b"keep")
    os.chown(bells / "file", WEB.pw_uid, WEB.pw_gid)
    assert not doorbell.deliver(str(bells / "file"), THEIRS, ANSWER)
    assert (bells / "file").read_bytes() == b"keep" and target.read_bytes() == b"keep"
    (bells / "dir").mkdir()
    assert not doorbell.deliver(str(bells / "dir"), THEIRS, ANSWER)
    roots = str(tmp_path / "initctl")  # some FIFO of root's, and a hard link to it
    fd = spool.install_bell(roots)
    os.link(roots, bells / "hardlink")
    assert not doorbell.deliver(str(bells / "hardlink"), frozenset({0}), ANSWER)
    assert os.read(fd, 16) == b"", "a FIFO of two names: not a byte written"
    mine = str(bells / "mine")
    fd_mine = spool.install_bell(mine)  # root's own, one name: a CGI running as root
    assert not doorbell.deliver(mine, THEIRS, ANSWER), "not the given owner's"
    assert os.read(fd_mine, 16) == b""
    spool.remove_bell(roots, fd)
    spool.remove_bell(mine, fd_mine)


# -- webknockd answering ----------------------------------------------------------------------


@pytest.fixture
def daemon(vector_keys: Keys) -> Iterator[tuple[Daemon, ServerConfig]]:
    base = Path(tempfile.mkdtemp(prefix="webknock-bell-", dir="/var/tmp"))
    os.chmod(base, 0o755)
    cfg = load(write_instance(base, vector_keys))
    d, _ = memory_daemon(cfg)
    yield d, cfg
    shutil.rmtree(base)


def test_daemon_answers_through_each_bell(
    daemon: tuple[Daemon, ServerConfig], vector_keys: Keys
) -> None:
    d, cfg = daemon
    granted = submit(cfg, vector_keys, ports=[("tcp", 22)])
    nothing = submit(cfg, vector_keys, ports=[("tcp", 23)])  # not offered
    wrong = submit(cfg, Keys.generate())  # does not verify
    broken = submit(cfg, payload=frame(b"\0" * 100))  # not a v1 packet: a frame refused
    waiting = (granted, nothing, wrong, broken)
    assert not any(readable(w.fd) for w in waiting)
    d.drain()
    assert reply(vector_keys, granted.result())["success"] is True
    assert reply(vector_keys, nothing.result()) == {
        "success": False,
        "error": "none of the requested ports is offered",
        "errorcode": "NOPORTS",
    }
    assert wrong.result() == (403, "", b"")
    assert broken.result() == (400, "", b"")


def test_prune_removes_bells_of_cgis_that_died(daemon: tuple[Daemon, ServerConfig]) -> None:
    d, cfg = daemon
    old = time.time() - d.keeper.bell_ttl - 5
    dead, alive = spool.new_request_id(), spool.new_request_id()
    for name in (dead, alive, "not-a-request-id"):
        os.mkfifo(cfg.spool.waits / name, 0o600)
    (cfg.spool.waits / "planted").mkdir()
    for name in (dead, "planted"):
        os.utime(cfg.spool.waits / name, (old, old))
    d.housekeeping()
    assert os.listdir(cfg.spool.waits) == [alive]
    assert d.keeper.bell_ttl > 2 * cfg.result_timeout, "never the bell of a CGI still waiting"
