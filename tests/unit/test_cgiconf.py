"""webknock.cgi.conf: the CGI's two settings (spool_dir, result_timeout) read without
configparser. Wherever webknock.config.load accepts a file, the CGI must read the same two
values from it, or refuse it (a 500 the admin sees in the log): never another spool or
timeout than webknockd's."""

from __future__ import annotations

from pathlib import Path

import pytest

from webknock.cgi import conf as cgiconf
from webknock.cgi.conf import CgiConfigError, read_cgi_settings
from webknock.config import ConfigError, load

#: The rest of a config webknock.config.load accepts.
REST = "tcp_ports = 22, 2222\nmax_time = 3600\nkeys_file = /etc/webknock/keys.ini\n"
REST += "state_file = /var/lib/webknock/grants.db\n"


def server(*lines: str) -> str:
    return "[server]\n" + REST + "".join(f"{line}\n" for line in lines)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "webknock.ini"
    path.write_bytes(text.encode("utf-8"))  # as is: no newline translation
    return path


def from_load(path: Path) -> tuple[str, float]:
    cfg = load(path)
    return str(cfg.spool_dir), cfg.result_timeout


AGREE = {
    "plain": server("spool_dir = /run/webknock/spool", "result_timeout = 2"),
    "default timeout": server("spool_dir = /run/webknock/spool"),
    "empty timeout": server("spool_dir = /s", "result_timeout ="),
    "blank timeout": server("spool_dir = /s", "result_timeout =   "),
    "no spaces": server("spool_dir=/s", "result_timeout=7"),
    "colon": server("spool_dir: /s", "result_timeout : 2.5"),
    "colon then equals": server("spool_dir: /s=1", "result_timeout = 3"),
    "equals then colon": server("spool_dir = /s:1", "result_timeout: 3"),
    "upper-case keys": server("SPOOL_DIR = /s", "Result_Timeout = 3"),
    "whole-line comments": server(
        "# spool_dir = /wrong", "; result_timeout = 9", "spool_dir = /s", "  # indented"
    ),
    "comment first in the section": "[server]\n# the server\n" + REST + "spool_dir = /s\n",
    "inline comments": server("spool_dir = /s # the spool", "result_timeout = 2 ; seconds"),
    "inline comment after a tab": server("spool_dir = /s\t# x", "result_timeout = 2\t;x"),
    "hash inside a value": server("spool_dir = /s#1", "result_timeout = 4"),
    "semicolon inside a value": server("spool_dir = /s;1"),
    "trailing blanks": server("spool_dir = /s   ", "result_timeout = 2  "),
    "blank lines": server("", "spool_dir = /s", "   ", "", "result_timeout = 2", ""),
    "CRLF": server("spool_dir = /s", "result_timeout = 2").replace("\n", "\r\n"),
    "no newline at the end": server("spool_dir = /s", "result_timeout = 2").rstrip("\n"),
    "indented first key": "[server]\n  spool_dir = /s\n" + REST,
    "indented comment after a key": server("spool_dir = /s", "  # note", "result_timeout = 2"),
    "another key continued": server("audit_log = /var/log/", "  webknock", "spool_dir = /s"),
    "in [DEFAULT]": "[DEFAULT]\nspool_dir = /d\nresult_timeout = 3\n" + server(),
    "[server] over [DEFAULT]": "[DEFAULT]\nspool_dir = /d\nresult_timeout = 3\n"
    + server("spool_dir = /s", "result_timeout = 4"),
    "[DEFAULT] after [server]": server("spool_dir = /s") + "[DEFAULT]\nresult_timeout = 3\n",
    "other sections": "[client]\nspool_dir = /wrong\nresult_timeout = 1\n"
    + server("spool_dir = /s")
    + "[notify]\nspool_dir = /also-wrong\n",
    "last of the file": server("spool_dir = /s", "result_timeout = 3599.5"),
    "timeout forms": server("spool_dir = /s", "result_timeout = 1e1"),
    "timeout underscore": server("spool_dir = /s", "result_timeout = 1_0"),
    "timeout small": server("spool_dir = /s", "result_timeout = 0.001"),
    "timeout padded": server("spool_dir = /s", "result_timeout = +02.50"),
    "odd blanks": server("spool_dir =\u00a0/s\u00a0", "result_timeout = 2\x0c"),
    "spool path with spaces": server("spool_dir = /srv/web knock/spool"),
    "root": server("spool_dir = /"),
}


@pytest.mark.parametrize("text", AGREE.values(), ids=AGREE.keys())
def test_the_cgi_reads_what_webknockd_reads(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    assert read_cgi_settings(str(path)) == from_load(path)


def test_defaults_are_the_daemons(tmp_path: Path) -> None:
    path = write(tmp_path, server("spool_dir = /s"))
    assert read_cgi_settings(str(path)) == ("/s", cgiconf.DEFAULT_RESULT_TIMEOUT)
    assert load(path).result_timeout == cgiconf.DEFAULT_RESULT_TIMEOUT
    assert cgiconf.ENV_CONFIG == "WEBKNOCK_CONFIG"
    assert cgiconf.DEFAULT_CONFIG == "/etc/webknock/webknock.ini"


REFUSED = {
    "no [server]": "[DEFAULT]\nspool_dir = /s\n",
    "[Server]": server("spool_dir = /s").replace("[server]", "[Server]"),
    "[ server ]": server("spool_dir = /s").replace("[server]", "[ server ]"),
    "only other sections": "[client]\nspool_dir = /s\n",
    "empty file": "",
    "no spool_dir": server("result_timeout = 2"),
    "empty spool_dir": server("spool_dir =", "result_timeout = 2"),
    "relative spool_dir": server("spool_dir = run/spool"),
    "home spool_dir": server("spool_dir = ~/spool"),
    "commented spool_dir": server("spool_dir = # /s"),
    "spool_dir in another section": server() + "[client]\nspool_dir = /s\n",
    "timeout 0": server("spool_dir = /s", "result_timeout = 0"),
    "timeout negative": server("spool_dir = /s", "result_timeout = -1"),
    "timeout an hour": server("spool_dir = /s", "result_timeout = 3600"),
    "timeout huge": server("spool_dir = /s", "result_timeout = 1e300"),
    "timeout nan": server("spool_dir = /s", "result_timeout = nan"),
    "timeout inf": server("spool_dir = /s", "result_timeout = inf"),
    "timeout words": server("spool_dir = /s", "result_timeout = soon"),
    "timeout unit": server("spool_dir = /s", "result_timeout = 2s"),
    "timeout hex": server("spool_dir = /s", "result_timeout = 0x2"),
    "timeout comma": server("spool_dir = /s", "result_timeout = 2,5"),
    "timeout comment without blank": server("spool_dir = /s", "result_timeout = 2;x"),
    "byte order mark": "\ufeff" + server("spool_dir = /s"),
}


@pytest.mark.parametrize("text", REFUSED.values(), ids=REFUSED.keys())
def test_what_webknockd_refuses_the_cgi_refuses_naming_the_file(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(CgiConfigError) as info:
        read_cgi_settings(str(path))
    assert str(info.value).startswith(f"{path}: ")
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load(path)


@pytest.mark.parametrize(
    "text",
    [
        server("spool_dir = /s", "  /more"),
        server("spool_dir = /s", "", "  /more"),  # configparser keeps blank lines in a value
        server("spool_dir = /s", "\t/more"),
        server("spool_dir = /s", "result_timeout = 2", "   5"),
        "[DEFAULT]\nspool_dir = /s\n  /more\n" + server(),
    ],
    ids=["indented", "after a blank line", "tab", "timeout", "in [DEFAULT]"],
)
def test_a_continued_value_is_refused(tmp_path: Path, text: str) -> None:
    """configparser would join the lines (and load may accept the path it makes); the CGI
    reads no such value."""
    path = write(tmp_path, text)
    with pytest.raises(CgiConfigError, match="continues on the next line"):
        read_cgi_settings(str(path))


def test_a_continued_value_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, server("spool_dir = /s", "  /more"))
    with pytest.raises(CgiConfigError, match=f"^{path}: "):
        read_cgi_settings(str(path))


def test_an_unreadable_file_is_refused_naming_it(tmp_path: Path) -> None:
    missing = tmp_path / "missing.ini"
    with pytest.raises(CgiConfigError, match=f"^{missing}: cannot read"):
        read_cgi_settings(str(missing))
    with pytest.raises(CgiConfigError, match=f"^{tmp_path}: cannot read"):
        read_cgi_settings(str(tmp_path))  # a directory
    binary = tmp_path / "binary.ini"
    binary.write_bytes(b"[server]\nspool_dir = /s\xff\n")
    with pytest.raises(CgiConfigError, match=f"^{binary}: not a UTF-8 text file"):
        read_cgi_settings(str(binary))


#: Files webknock.config.load accepts that the CGI reads differently from configparser.
#: Refusing them is allowed (the admin sees it at the first knock); another value is not.
ODD = {
    "indented section": "[server]\n"
    + "".join(f"  {line}\n" for line in REST.splitlines())
    + "  spool_dir = /s\n  result_timeout = 2\n",
    "comment after the header": "[server] ; the daemon's\n" + REST + "spool_dir = /s\n",
    "value continued after a blank line": server("spool_dir = /s", "", "  more"),
    "vertical tab in a value": server("spool_dir = /s\x0bresult_timeout = 9"),
    "line separator in a value": server("spool_dir = /s\u2028/t"),
    "next line in a value": server("spool_dir = /s\x85result_timeout = 9"),
}


@pytest.mark.parametrize(
    "text",
    [pytest.param(text, id=name, marks=[]) for name, text in ODD.items()],
)
def test_the_cgi_never_reads_another_value_than_webknockd(tmp_path: Path, text: str) -> None:
    path = write(tmp_path, text)
    expected = from_load(path)
    try:
        got = read_cgi_settings(str(path))
    except CgiConfigError as exc:
        assert str(exc).startswith(str(path)) or "continues" in str(exc)
        return
    assert got == expected
