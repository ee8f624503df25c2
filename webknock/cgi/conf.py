"""The settings the CGI needs, read from the instance config without configparser.

The CGI only relays (:mod:`webknock.cgi.relay`): it needs to know where the spool is, how long
to wait for webknockd's answer, and whether a GET gets the browser page; nothing else.
The full loader (:func:`webknock.config.load`) costs a CGI process about as much as
starting Python (configparser, re, dataclasses, pathlib), so this reads the same file
with the same rules for these keys only: ``[server]`` over ``[DEFAULT]``, keys in any case, ``=``
or ``:``, whole-line and inline ``#``/``;`` comments. Anything it cannot read the way
configparser would (a value continued on the next line, no ``[server]`` section) is a
:class:`CgiConfigError`; ``webknockctl check-config`` validates the whole file.
"""

from __future__ import annotations

DEFAULT_CONFIG = "/etc/webknock/webknock.ini"
ENV_CONFIG = "WEBKNOCK_CONFIG"
SPOOL_KEY = "spool_dir"
TIMEOUT_KEY = "result_timeout"
BROWSER_KEY = "browser_page"
DEFAULT_RESULT_TIMEOUT = 5.0
MAX_RESULT_TIMEOUT = 3600.0


class CgiConfigError(Exception):
    """The config cannot give the CGI its spool and timeout; the message says why."""


def _values(text: str) -> dict[str, dict[str, str]]:
    """Every key of every section (keys lowercased); only the keys the CGI needs are checked
    for continuation lines."""
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] | None = None
    last = ""
    for raw in text.split("\n"):  # as configparser: only \n ends a line
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if raw[0] in " \t" and current is not None and last:
            if last in (SPOOL_KEY, TIMEOUT_KEY, BROWSER_KEY):
                raise CgiConfigError(f"{last} continues on the next line")
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            last = ""
            continue
        if current is None:
            continue  # configparser refuses this; check-config says so
        cut = min((i for i in (line.find("="), line.find(":")) if i >= 0), default=-1)
        if cut <= 0:
            last = ""
            continue
        key, value = line[:cut].strip().lower(), line[cut + 1 :]
        for i, ch in enumerate(value):
            if ch in "#;" and i > 0 and value[i - 1] in " \t":
                value = value[:i]
                break
        current[key] = value.strip()
        last = key
    return sections


def _server_values(path: str) -> dict[str, str]:
    """The keys of ``[server]`` over ``[DEFAULT]``; raises CgiConfigError."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except OSError as exc:
        raise CgiConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CgiConfigError(f"{path}: not a UTF-8 text file") from None
    try:
        sections = _values(text)
    except CgiConfigError as exc:
        raise CgiConfigError(f"{path}: [server] {exc}") from None
    if "server" not in sections:
        raise CgiConfigError(f"{path}: missing section [server]")
    return {**sections.get("DEFAULT", {}), **sections["server"]}


def _spool(values: dict[str, str], path: str) -> str:
    spool = values.get(SPOOL_KEY, "")
    if not spool.startswith("/"):
        raise CgiConfigError(f"{path}: [server] {SPOOL_KEY} is not an absolute path")
    return spool


def read_cgi_settings(path: str) -> tuple[str, float]:
    """(spool_dir, result_timeout) of the config at `path`; raises CgiConfigError."""
    merged = _server_values(path)
    spool = _spool(merged, path)
    timeout_text = merged.get(TIMEOUT_KEY, "")
    if not timeout_text:
        return spool, DEFAULT_RESULT_TIMEOUT
    try:
        timeout = float(timeout_text)
    except ValueError:
        timeout = -1.0
    if not 0 < timeout < MAX_RESULT_TIMEOUT:
        raise CgiConfigError(f"{path}: [server] {TIMEOUT_KEY} is not a number of seconds")
    return spool, timeout


TRUE = ("1", "yes", "true", "on")
FALSE = ("0", "no", "false", "off")


def read_page_settings(path: str) -> str | None:
    """The spool_dir of the config at `path` when ``[server] browser_page`` is on, None
    when it is off (the default); raises CgiConfigError."""
    merged = _server_values(path)
    value = merged.get(BROWSER_KEY, "").lower()
    if value in FALSE or not value:
        return None
    if value not in TRUE:
        raise CgiConfigError(f"{path}: [server] {BROWSER_KEY} must be yes or no")
    return _spool(merged, path)
