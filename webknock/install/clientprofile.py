"""The profile ``install.sh client`` installs: read (file, stdin or pasted on a terminal),
told apart (v1 blob or v2 profile of ``webknockctl client add``, never both), and written
as a client profile that :func:`webknock.client.profile.load_profile` accepts."""

from __future__ import annotations

import configparser
import os
import re
import select
import stat
from dataclasses import dataclass
from pathlib import Path

from webknock.install.console import InstallError, ProfileRefused
from webknock.install.files import remove, temp_beside
from webknock.install.host import Host
from webknock.install.v1profile import BEGIN, END

#: The comment `webknockctl client add` puts in the profiles it prints.
ENROLLED = re.compile(
    r"#\s*webknock profile: client (\S+) of instance (\S+) \(key id ([0-9a-f]{16})\)"
)
_EXTRA_DEFAULTS = {
    "verify": "yes       # check the server certificate (https)",
    "timeout": "10       # seconds per request",
    "family": "...       # address family to knock from: see webknock --help",
}


def _stdin_kind(host: Host) -> str:
    """ "file", "pipe" (pipe or socket), or "other" (e.g. /dev/null)."""
    try:
        mode = os.fstat(host.stdin.fileno()).st_mode
    except (AttributeError, OSError, ValueError):
        return "pipe"  # a stream without a descriptor (tests)
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        return "pipe"
    return "other"


def paste_profile(host: Host) -> str:
    """Lines pasted on the terminal, up to the profile's last line (the END line of a v1
    blob, or [client] with its ports and its server_key), plus the rest of the same paste;
    Ctrl-D ends it at any time."""
    lines: list[str] = []
    begin = client = ports = keyed = False
    while True:
        line = host.stdin.readline()
        if not line:
            return "".join(lines)
        lines.append(line if line.endswith("\n") else line + "\n")
        t = re.sub(r"\s", "", line)
        begin = begin or t == BEGIN.replace(" ", "")
        client = client or t == "[client]"
        ports = ports or t.startswith(("ports=", "ports:"))
        keyed = keyed or t.startswith(("server_key=", "server_key:", "sign=", "sign:"))
        if t == END.replace(" ", "") or (not begin and client and ports and keyed):
            break
    while True:  # the rest of the same paste, if any
        try:
            ready, _, _ = select.select([host.stdin], [], [], 0.5)
        except (TypeError, ValueError, OSError):
            break
        line = host.stdin.readline() if ready else ""
        if not line:
            break
        lines.append(line)
    return "".join(lines)


def read_profile_text(host: Host, source: str) -> str:
    """The profile text from --from FILE, stdin (--from - or a pipe) or the terminal;
    raises ProfileRefused when there is none."""
    say = host.console.say
    if source and source != "-":
        path = Path(source)
        if not os.access(path, os.R_OK) or path.is_dir():
            raise ProfileRefused(f"--from {source}: no such readable file")
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            raise InstallError(f"cannot read {source}: {exc.strerror}") from None
    elif not source and host.terminal:
        say("Paste the client profile: the one `webknockctl client add` printed on the server")
        say(
            "([client] ... ports = ...), or the v1 blob of `install.sh server --v1` (BEGIN to END)."
        )
        say("Reading stops by itself after its last line (press Enter if the cursor stays on")
        say("that line; Ctrl-D also ends the input):")
        text = paste_profile(host)
        say("(profile read)")
    elif source == "-" or _stdin_kind(host) == "file":
        text = host.stdin.read()
    elif _stdin_kind(host) == "pipe":
        host.console.err.write("(reading the profile from stdin, to its end)\n")
        text = host.stdin.read()
    else:
        raise ProfileRefused(
            "no profile given: stdin is no terminal to paste it into, and no --from"
        )
    if not text.strip():
        raise ProfileRefused("no profile given: the input was empty")
    return text


def _between_markers(text: str) -> list[str]:
    lines = text.splitlines()
    begin = [i for i, ln in enumerate(lines) if ln.strip() == BEGIN]
    end = [i for i, ln in enumerate(lines) if ln.strip() == END]
    if begin and end and end[-1] > begin[-1]:
        return lines[begin[-1] + 1 : end[-1]]
    return lines


def profile_kind(text: str, url: str) -> str:
    """ "v1" or "v2"; raises ProfileRefused for both, neither, or a v2 profile without a
    url (and no --url)."""
    lines = _between_markers(text) if BEGIN in text and END in text else text.splitlines()
    v1 = any(re.match(r"\s*(\[v1\]\s*$|keys_file\s*[=:])", ln) for ln in lines)
    v2 = any(re.match(r"\s*server_key\s*[=:]", ln) for ln in lines)
    if v1 and v2:
        raise ProfileRefused(
            "the profile has both v1 keys ([v1] or keys_file) and a v2 server_key: a profile "
            "speaks v1 or v2, not both (send the one you mean)"
        )
    if not v1 and not v2:
        raise ProfileRefused(
            "no client profile in the input: neither the [v1] keys of a v1 blob nor the "
            "server_key = wk2:... line of a v2 profile"
        )
    if v2 and not url and not any(re.match(r"\s*url\s*[=:]\s*\S", ln) for ln in lines):
        raise ProfileRefused(
            "the profile has no url (its server has no [server] url set): give the knock URL "
            "with --url https://HOST/PATH",
            how=False,
        )
    return "v1" if v1 else "v2"


@dataclass(frozen=True)
class Written:
    """What :func:`write_profile` wrote; client, instance and kid from the enrolment line
    of `webknockctl client add` (empty without one)."""

    url: str
    client: str = ""
    instance: str = ""
    kid: str = ""


def _profile_text(
    name: str, kind: str, url: str, ports: str, seconds: str, extra: dict[str, str],
    keys_path: Path, server_key: str, enrolled: re.Match[str] | None,
) -> str:  # fmt: skip
    text = [f"# webknock client profile {name} (protocol {kind}), written by install.sh client."]
    if enrolled and kind == "v2":
        text.append(
            f"# Enrolled as client {enrolled[1]} of instance {enrolled[2]} (key id {enrolled[3]})."
        )
    text += [
        f"# Use: webknock --profile {name} knock|keep|exec -- CMD|info (see webknock --help)",
        "[client]",
        f"url = {url}",
    ]
    if kind == "v1":
        text.append(f"keys_file = {keys_path}")
    else:
        text += [
            f"server_key = {server_key}",
            "# the private key of this client (made by webknock keygen; it never leaves this host)",
            f"key_file = {name}.key",
        ]
    text.append(f"ports = {ports}")
    if seconds:
        text.append(f"time = {seconds}")
    for key, value in extra.items():
        text.append(f"{key} = {value}" if value else f"# {key} = {_EXTRA_DEFAULTS[key]}")
    return "\n".join(text) + "\n"


def write_profile(
    text: str, profile: Path, keys_path: Path, mode: int, url_override: str, kind: str
) -> Written:
    """Write profile `profile` (`mode`) from `text` of `kind`, and for v1 its keys file
    (0600); checked by the client's own loader before either takes its place. Needs the
    venv. Raises InstallError ("profile blob: ...") for a profile that does not load."""
    from webknock.client.errors import ConfigError
    from webknock.client.profile import load_profile, parse_ports
    from webknock.keys import format_keys
    from webknock.protocol import v1, v2
    from webknock.urls import check_url

    lines = [ln.strip() for ln in _between_markers(text)]
    enrolled = next((m for m in map(ENROLLED.match, lines) if m), None)
    # What came before the first section (a prompt, a notice) is not part of the profile.
    first = next((i for i, ln in enumerate(lines) if ln.startswith("[")), 0)
    parser = configparser.ConfigParser(interpolation=None)
    server_key, keys = "", None
    try:
        parser.read_string("\n".join(lines[first:]), source="profile")
        url = url_override or parser.get("client", "url", fallback="").strip()
        ports = parser.get("client", "ports").strip()
        seconds = parser.get("client", "time", fallback="").strip()
        extra = {
            k: parser.get("client", k, fallback="").strip() for k in ("verify", "timeout", "family")
        }
        if kind == "v1":
            keys = v1.Keys.from_hex(dict(parser.items("v1")))
        else:
            server_key = parser.get("client", "server_key").strip()
    except (configparser.Error, ValueError) as exc:
        raise InstallError(f"profile blob: {str(exc).splitlines()[0]}") from None
    if not url:
        raise ProfileRefused(
            "profile: it has no url (the server has no [server] url): pass the knock URL "
            "with --url https://HOST/PATH",
            how=False,
        )
    try:
        check_url(url)
    except ValueError as exc:
        raise InstallError(f"profile blob: url: {exc}") from None
    try:
        if not parse_ports(ports):
            raise ValueError("empty")
    except ValueError:
        raise InstallError(
            f"profile blob: ports {ports!r} is not a list like tcp/22, udp/51820"
        ) from None
    if seconds and not seconds.isdigit():
        raise InstallError(f"profile blob: time {seconds!r} is not a number of seconds")
    if kind == "v2":
        try:
            v2.parse_public_key(server_key)
        except v2.V2Error as exc:
            raise InstallError(
                f"profile blob: server_key {server_key[:60]!r} is not a v2 public key: {exc}"
            ) from None
    name = profile.stem
    body = _profile_text(name, kind, url, ports, seconds, extra, keys_path, server_key, enrolled)
    tmp = temp_beside(profile, body, mode)
    try:
        load_profile(tmp, name)
    except ConfigError as exc:
        remove(tmp)
        raise InstallError(f"profile blob: {str(exc).replace(str(tmp), str(profile))}") from None
    if keys is not None:
        os.replace(temp_beside(keys_path, format_keys(keys), 0o600), keys_path)
    os.replace(tmp, profile)
    if enrolled:
        return Written(url, enrolled[1], enrolled[2], enrolled[3])
    return Written(url)
