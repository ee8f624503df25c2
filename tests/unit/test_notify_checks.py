"""`webknockctl check-config` reports bad [notify] values, credentials and audit log modes."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import install_correctly
from webknock.config import ServerConfig, SpoolPaths, load
from webknock.ctl import cli as ctl
from webknock.protocol.v1 import Keys
from webknock.server.checks import check_installation
from webknock.spool.mount import unmount_spool

WEB = pwd.getpwnam("www-data")


@pytest.fixture
def base(vector_keys: Keys) -> Iterator[Path]:
    """A correct installation with an audit log directory; [notify] is added per test."""
    base = Path(tempfile.mkdtemp(prefix="webknock-notify-check-"))
    try:
        (base / "log").mkdir(mode=0o750)
        install_correctly(base, vector_keys, audit_log=str(base / "log" / "i.jsonl"))
        yield base
    finally:  # also when the installation itself failed
        unmount_spool(SpoolPaths(base / "spool"))
        shutil.rmtree(base)


def with_notify(base: Path, text: str) -> ServerConfig:
    config = base / "webknock.ini"
    config.write_text(config.read_text().split("[notify]")[0] + "[notify]\n" + text)
    return load(config)


def credentials(base: Path, text: str, mode: int) -> Path:
    path = base / "smtp.credentials"
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_good_notify_section_is_clean(base: Path) -> None:
    creds = credentials(base, "[smtp]\nuser = u\npassword = p\n", 0o600)
    cfg = with_notify(
        base,
        f"email_to = root@example.org\nsmtp_security = starttls\nsmtp_credentials = {creds}\n"
        "webhook_url = https://hooks.example.org/webknock\n",
    )
    assert check_installation(cfg) == []


def test_bad_value_is_an_error_and_exit_1(base: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = with_notify(base, "email_to = root@example.org\nbatch_window = soon\n")
    assert check_installation(cfg) == [
        (
            "error",
            f"{cfg.source}: [notify] batch_window: could not convert string to float: 'soon' "
            "(got 'soon')",
        )
    ]
    assert ctl.main(["--config", str(cfg.source), "check-config"]) == 1
    assert f"error: {cfg.source}: [notify] batch_window:" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("text", "mode", "level", "what"),
    [
        ("[smtp]\nuser = u\npassword = p\n", 0o640, "warning", "readable by more users"),
        ("[smtp]\nuser = u\npassword = p\n", 0o666, "error", "writable by others than root"),
        ("[smtp]\nuser = u\n", 0o600, "error", "need [smtp] user and password"),
    ],
)
def test_credentials_file_mode_and_content(
    base: Path, text: str, mode: int, level: str, what: str
) -> None:
    creds = credentials(base, text, mode)
    cfg = with_notify(
        base,
        f"email_to = root@example.org\nsmtp_security = tls\nsmtp_credentials = {creds}\n",
    )
    ((got_level, message),) = check_installation(cfg)
    assert got_level == level and what in message and str(creds) in message


def test_missing_sendmail_is_an_error(base: Path) -> None:
    cfg = with_notify(
        base,
        f"email_to = root@example.org\nmail_transport = sendmail\nsendmail = {base}/nothing\n",
    )
    ((level, message),) = check_installation(cfg)
    assert level == "error" and f"[notify] sendmail: {base}/nothing is not an executable" in message


def test_audit_log_writable_by_others_is_an_error(base: Path) -> None:
    cfg = load(base / "webknock.ini")
    assert cfg.audit_log is not None
    cfg.audit_log.write_text("")
    os.chmod(cfg.audit_log, 0o666)
    ((level, message),) = check_installation(cfg)
    assert level == "error" and f"audit log {cfg.audit_log} has mode 0666" in message
