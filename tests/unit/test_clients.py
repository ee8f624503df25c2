"""Enrolled v2 clients (webknock.server.clients): one file per client, parsed with the line at
fault named, the directory loaded with every unusable file skipped, and re-read on change."""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path

import pytest

from webknock.protocol import v2
from webknock.server.clients import (
    MAX_FILE,
    Client,
    ClientError,
    ClientRegistry,
    Problem,
    load_clients,
    parse_client,
)

ALICE = v2.SigningKey.from_seed(bytes(range(32)))
BOB = v2.SigningKey.from_seed(bytes(range(1, 33)))
CAROL = v2.SigningKey.from_seed(bytes(range(2, 34)))

FULL = f"""\
# webknock client alice
key = {ALICE.public_text("alice@laptop")}
ports = tcp/22, udp/51820
max_time = 600
from = 192.0.2.0/24, 2001:db8::/32
open_prefix = 24, 64
expires = 2027-06-30
enabled = yes
"""


def write(directory: Path, name: str, text: str | bytes) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / name
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


def error_of(text: str) -> ClientError:
    with pytest.raises(ClientError) as info:
        parse_client("alice", text)
    return info.value


# -- parse_client --------------------------------------------------------------------------


def test_every_field() -> None:
    client = parse_client("alice", FULL, Path("/x/alice.conf"))
    assert client == Client(
        name="alice",
        public=ALICE.public,
        comment="alice@laptop",
        ports=frozenset({("tcp", 22), ("udp", 51820)}),
        max_time=600,
        sources=(
            ipaddress.ip_network("192.0.2.0/24"),
            ipaddress.ip_network("2001:db8::/32"),
        ),
        expires=datetime.date(2027, 6, 30),
        enabled=True,
        open_prefix=(24, 64),
    )
    assert client.path == Path("/x/alice.conf") and client.kid == ALICE.kid


def test_the_defaults() -> None:
    client = parse_client("alice", f"key = {ALICE.public_text()}\n")
    assert (client.comment, client.ports, client.max_time, client.sources) == ("", None, None, ())
    assert (client.expires, client.enabled, client.path) == (None, True, None)
    assert client.open_prefix is None
    assert client.prefix_for(ipaddress.ip_address("198.51.100.1")) is None
    offered = frozenset({("tcp", 22), ("tcp", 2222), ("udp", 51820)})
    assert client.allowed(offered) == offered
    assert client.longest(3600) == 3600
    assert not client.expired(10**10)
    assert client.admits(ipaddress.ip_address("198.51.100.1"))
    assert client.admits(ipaddress.ip_address("2001:db8::1"))


def test_comments_blank_lines_case_spacing_and_crlf() -> None:
    text = (
        "# a comment\r\n"
        "\r\n"
        "   # indented comment\r\n"
        f"  KEY={ALICE.public_text('alice')}   # trailing comment\r\n"
        "Ports   =   tcp/22 udp/51820   # two ports\r\n"
        "enabled = No\r\n"
    )
    client = parse_client("alice", text)
    assert client.public == ALICE.public and client.comment == "alice"
    assert client.ports == frozenset({("tcp", 22), ("udp", 51820)})
    assert client.enabled is False


def test_a_hash_without_a_space_before_it_is_no_comment() -> None:
    client = parse_client("alice", f"key = {ALICE.public_text('alice#1')}\n")
    assert client.comment == "alice#1"


@pytest.mark.parametrize(
    ("value", "enabled"),
    [
        *[("yes", True), ("true", True), ("on", True), ("1", True), ("YES", True)],
        *[("no", False), ("false", False), ("off", False), ("0", False), ("Off", False)],
    ],
)
def test_enabled_values(value: str, enabled: bool) -> None:
    text = f"key = {ALICE.public_text()}\nenabled = {value}\n"
    assert parse_client("alice", text).enabled is enabled


def test_values_are_normalised() -> None:
    client = parse_client(
        "alice",
        f"key = {ALICE.public_text()}\nports = TCP/22,,tcp/22\nfrom = 192.0.2.7/24\n",
    )
    assert client.ports == frozenset({("tcp", 22)})
    assert client.sources == (ipaddress.ip_network("192.0.2.0/24"),)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("ports = tcp/22, sctp/9", "ports: 'sctp/9' is not tcp/N or udp/N"),
        ("ports = tcp/0", "ports: 'tcp/0' is not"),
        ("ports = udp/65536", "ports: 'udp/65536' is not"),
        ("ports = 22", "ports: '22' is not"),
        ("max_time = 0", "max_time: must be a whole number of seconds"),
        ("max_time = 604801", "max_time: must be"),
        ("max_time = 1h", "max_time: must be"),
        ("max_time = -5", "max_time: must be"),
        ("from = 192.0.2.0/33", "from: '192.0.2.0/33' is not a network"),
        ("from = example.org", "from: 'example.org' is not a network"),
        ("expires = 30.06.2027", "expires: '30.06.2027' is not a date"),
        ("expires = 2027-02-30", "expires: '2027-02-30' is not a date"),
        ("enabled = maybe", "enabled: must be yes or no"),
        (
            "colour = blue",
            "expected one of key, ports, max_time, from, open_prefix, expires, enabled",
        ),
        ("open_prefix = 15", "open_prefix: '15' is not an IPv4 prefix length from 16 to 32"),
        ("open_prefix = 33", "open_prefix: '33' is not an IPv4 prefix length"),
        ("open_prefix = 24, 31", "open_prefix: '31' is not an IPv6 prefix length from 32 to 128"),
        ("open_prefix = 24, 129", "open_prefix: '129' is not an IPv6 prefix length"),
        ("open_prefix = /24", "open_prefix: '/24' is not an IPv4 prefix length"),
        ("open_prefix = 24, 64, 64", "open_prefix: must be an IPv4 prefix length, optionally"),
        ("open_prefix =", "open_prefix: must be an IPv4 prefix length"),
        ("open_prefix = 2\u0664", "open_prefix: '2\u0664' is not an IPv4 prefix length"),
        ("just some words", "expected one of"),
        ("ports tcp/22", "expected one of"),
        ("= tcp/22", "expected one of"),
        ("ports = tcp/22\x07", "control characters"),
        ("max_time = 60\x00", "control characters"),
        (f"key = {ALICE.public_text()}", "key given twice"),
    ],
)
def test_a_bad_line_is_named_by_its_number(line: str, message: str) -> None:
    text = f"# header\n\nkey = {ALICE.public_text()}\n# line 4\n{line}\nmax_time = 60\n"
    if line.startswith("max_time"):
        text = text.replace("max_time = 60\n", "")
    exc = error_of(text)
    assert exc.line == 5, exc
    assert message in exc.message and message in str(exc)


def test_a_bad_key_line_is_named_by_its_number() -> None:
    short = "wk2:" + v2.public_key_text(bytes(31))[4:]
    exc = error_of(f"# header\nports = tcp/22\nkey = {short}\n")
    assert (exc.line, exc.message) == (3, "key: a public key is 32 bytes, this one 31")
    long_ = v2.public_key_text(bytes(33))
    assert error_of(f"key = {long_}\n").message == "key: a public key is 32 bytes, this one 33"
    assert "starts with" in error_of("key = ssh-ed25519 AAAA\n").message
    assert "not base64url" in error_of("key = wk2:abc!\n").message


def test_a_file_without_a_key_is_refused_as_a_whole() -> None:
    exc = error_of("# no key\nports = tcp/22\n")
    assert (exc.line, exc.message) == (0, "no line key = wk2:...")
    assert error_of("").line == 0


def test_control_characters_in_a_comment_are_ignored_with_it() -> None:
    client = parse_client("alice", f"# \x1b[31mred\nkey = {ALICE.public_text()} # \x07\n")
    assert client.comment == ""


def test_tabs_are_whitespace() -> None:
    client = parse_client("alice", f"key\t=\t{ALICE.public_text()}\nports =\ttcp/22,\tudp/51820\n")
    assert client.ports == frozenset({("tcp", 22), ("udp", 51820)})


def test_an_empty_from_line_is_refused() -> None:
    with pytest.raises(ClientError):
        parse_client("alice", f"key = {ALICE.public_text()}\nfrom =   # office only\n")


# -- Client --------------------------------------------------------------------------------


def test_client_policy() -> None:
    client = parse_client("alice", FULL)
    offered = frozenset({("tcp", 22), ("tcp", 2222), ("udp", 51821)})
    assert client.allowed(offered) == frozenset({("tcp", 22)})
    assert client.longest(3600) == 600 and client.longest(300) == 300
    end = datetime.datetime(2027, 6, 30, 23, 59, 59, tzinfo=datetime.UTC).timestamp()
    assert not client.expired(end)
    assert client.expired(end + 1)
    assert client.admits(ipaddress.ip_address("192.0.2.200"))
    assert client.admits(ipaddress.ip_address("2001:db8:1::1"))
    assert not client.admits(ipaddress.ip_address("192.0.3.1"))
    assert not client.admits(ipaddress.ip_address("2001:db9::1"))


def test_render_round_trips() -> None:
    full = parse_client("alice", FULL)
    assert parse_client("alice", full.render()) == full
    assert full.render().startswith("# webknock client alice\n")
    minimal = Client("bob", BOB.public)
    assert parse_client("bob", minimal.render()) == minimal
    disabled = Client(
        "carol",
        CAROL.public,
        "carol at home",
        ports=frozenset(),
        max_time=1,
        enabled=False,
    )
    assert parse_client("carol", disabled.render()) == disabled


def test_render_is_parse_clients_own_format() -> None:
    text = parse_client("alice", FULL).render()
    assert f"key = {ALICE.public_text('alice@laptop')}\n" in text
    assert "ports = tcp/22, udp/51820\n" in text
    assert "from = 192.0.2.0/24, 2001:db8::/32\n" in text
    assert "open_prefix = 24, 64\n" in text
    assert "expires = 2027-06-30\n" in text and text.endswith("enabled = yes\n")


@pytest.mark.parametrize(
    ("value", "lengths", "rendered", "v4", "v6"),
    [
        ("24, 64", (24, 64), "24, 64", 24, 64),
        ("24 64", (24, 64), "24, 64", 24, 64),
        ("24", (24, 128), "24", 24, None),  # IPv4 only
        ("24, 128", (24, 128), "24", 24, None),
        ("32, 64", (32, 64), "32, 64", None, 64),  # IPv6 only
        ("32", (32, 128), "32", None, None),  # the address alone, said explicitly
        ("16,32", (16, 32), "16, 32", 16, 32),
    ],
)
def test_open_prefix(
    value: str, lengths: tuple[int, int], rendered: str, v4: int | None, v6: int | None
) -> None:
    client = parse_client("alice", f"key = {ALICE.public_text()}\nopen_prefix = {value}\n")
    assert client.open_prefix == lengths
    assert f"open_prefix = {rendered}\n" in client.render()
    assert parse_client("alice", client.render()) == client
    assert client.prefix_for(ipaddress.ip_address("198.51.100.7")) == v4
    assert client.prefix_for(ipaddress.ip_address("2001:db8::7")) == v6


def test_problem_names_file_and_line() -> None:
    assert str(Problem(Path("/c/a.conf"), 3, "bad")) == "/c/a.conf:3: bad"
    assert str(Problem(Path("/c/a.conf"), 0, "bad")) == "/c/a.conf: bad"


# -- load_clients --------------------------------------------------------------------------


def test_load_clients_reads_every_conf_file(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    write(d, "alice.conf", FULL)
    write(d, "bob.laptop.conf", f"key = {BOB.public_text()}\n")
    clients, problems = load_clients(d)
    assert problems == []
    assert sorted(clients) == ["alice", "bob.laptop"]
    assert clients["alice"].path == d / "alice.conf"
    assert clients["bob.laptop"].public == BOB.public


def test_files_not_ending_conf_and_dot_files_are_ignored(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    for name in ("alice.conf~", "alice.conf.bak", "alice.conf.dpkg-old", "README", ".x.conf"):
        write(d, name, "this is not a client file\x00")
    write(d, "bob.CONF", f"key = {BOB.public_text()}\n")
    assert load_clients(d) == ({}, [])


def test_a_missing_directory_is_no_clients(tmp_path: Path) -> None:
    assert load_clients(tmp_path / "nowhere") == ({}, [])


def test_a_directory_that_cannot_be_listed_is_one_problem(tmp_path: Path) -> None:
    path = write(tmp_path, "file", "x")
    clients, problems = load_clients(path)
    assert clients == {} and len(problems) == 1
    assert problems[0].path == path and "cannot list" in problems[0].message


def test_a_bad_file_is_skipped_with_its_line_and_the_others_kept(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    write(d, "alice.conf", FULL)
    bad = write(d, "bob.conf", f"key = {BOB.public_text()}\n\nports = tcp/70000\n")
    clients, problems = load_clients(d)
    assert list(clients) == ["alice"]
    assert len(problems) == 1 and (problems[0].path, problems[0].line) == (bad, 3)
    assert "ports" in problems[0].message
    assert str(problems[0]).startswith(f"{bad}:3: ")


def test_the_same_key_in_two_files_skips_both_and_names_both(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    write(d, "alice.conf", f"key = {ALICE.public_text()}\n")
    write(d, "mallory.conf", f"key = {ALICE.public_text('copy')}\nports = tcp/22\n")
    write(d, "bob.conf", f"key = {BOB.public_text()}\n")
    clients, problems = load_clients(d)
    assert list(clients) == ["bob"]
    assert sorted((p.path.name, p.line, p.message) for p in problems) == [
        ("alice.conf", 0, "same key as mallory"),
        ("mallory.conf", 0, "same key as alice"),
    ]


def test_the_same_key_in_three_files(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    for name in ("a", "b", "c"):
        write(d, f"{name}.conf", f"key = {ALICE.public_text()}\n")
    clients, problems = load_clients(d)
    assert clients == {}
    assert {(p.path.name, p.message) for p in problems} == {
        ("a.conf", "same key as b, c"),
        ("b.conf", "same key as a, c"),
        ("c.conf", "same key as a, b"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "bad name",
        "bad\x01name",
        "tab\tname",
        "new\nline",
        "-dash",
        "_under",
        "a" * 65,
        "ümlaut",
        "semi;colon",
        "quote'",
    ],
)
def test_an_unusable_name_is_a_problem(tmp_path: Path, name: str) -> None:
    d = tmp_path / "clients"
    path = write(d, f"{name}.conf", f"key = {ALICE.public_text()}\n")
    write(d, "bob.conf", f"key = {BOB.public_text()}\n")
    clients, problems = load_clients(d)
    assert list(clients) == ["bob"]
    assert len(problems) == 1 and (problems[0].path, problems[0].line) == (path, 0)
    assert "client name" in problems[0].message
    assert "\n" not in problems[0].message.replace(repr(name)[1:-1], "")


@pytest.mark.parametrize("name", ["a", "A1", "a" * 64, "alice.laptop", "bob_2-x", "9lives"])
def test_usable_names(tmp_path: Path, name: str) -> None:
    d = tmp_path / "clients"
    write(d, f"{name}.conf", f"key = {ALICE.public_text()}\n")
    clients, problems = load_clients(d)
    assert (list(clients), problems) == ([name], [])


def test_a_file_that_is_not_utf8_is_a_problem(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    path = write(d, "alice.conf", f"key = {ALICE.public_text()} caf\xe9\n".encode("latin-1"))
    clients, problems = load_clients(d)
    assert clients == {}
    assert problems == [Problem(path, 0, "not a UTF-8 text file")]


def test_a_file_over_the_limit_is_a_problem(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    path = write(d, "alice.conf", f"key = {ALICE.public_text()}\n" + "#" * MAX_FILE + "\n")
    clients, problems = load_clients(d)
    assert clients == {} and len(problems) == 1
    assert problems[0].path == path and f"over {MAX_FILE} bytes" in problems[0].message


def test_a_directory_named_conf_is_a_problem(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    (d / "alice.conf").mkdir(parents=True)
    clients, problems = load_clients(d)
    assert clients == {} and len(problems) == 1 and "cannot read" in problems[0].message


# -- ClientRegistry ------------------------------------------------------------------------


def stamp(path: Path, seconds: int) -> None:
    """A distinct modification time (filesystem timestamps may be coarse)."""
    os.utime(path, (1_700_000_000 + seconds, 1_700_000_000 + seconds))


def test_the_registry_rereads_on_change_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import webknock.server.clients

    loads: list[Path] = []
    real = webknock.server.clients.load_clients

    def counting(directory: Path) -> tuple[dict[str, Client], list[Problem]]:
        loads.append(directory)
        return real(directory)

    monkeypatch.setattr(webknock.server.clients, "load_clients", counting)
    d = tmp_path / "clients"
    registry = ClientRegistry(d)
    assert registry.refresh() is True  # first look: nothing there
    assert registry.refresh() is False and registry.clients == {}
    alice = write(d, "alice.conf", f"key = {ALICE.public_text()}\n")
    stamp(alice, 1)
    assert registry.refresh() is True
    assert registry.lookup(ALICE.kid) == registry.clients["alice"]
    assert registry.lookup(BOB.kid) is None
    assert registry.refresh() is False
    assert len(loads) == 2  # no change, no reading

    alice.write_text(f"key = {ALICE.public_text()}\nenabled = no\n")  # edited in place
    stamp(alice, 2)
    assert registry.refresh() is True and registry.clients["alice"].enabled is False
    stamp(alice, 3)  # touched: read again, same result
    assert registry.refresh() is True and registry.clients["alice"].enabled is False
    bob = write(d, "bob.conf", f"key = {BOB.public_text()}\n")
    stamp(bob, 4)
    assert registry.refresh() is True and registry.lookup(BOB.kid) is not None
    write(d, "notes.txt", "anything")  # not a client file, but the directory changed
    assert registry.refresh() is True and sorted(registry.clients) == ["alice", "bob"]
    alice.unlink()
    assert registry.refresh() is True
    assert registry.lookup(ALICE.kid) is None and list(registry.clients) == ["bob"]
    assert registry.refresh() is False
    assert len(loads) == 7


def test_a_file_replaced_by_rename_is_seen(tmp_path: Path) -> None:
    """Ansible, Salt and `webknockctl client` write a new file and rename it into place."""
    d = tmp_path / "clients"
    alice = write(d, "alice.conf", f"key = {ALICE.public_text()}\n")
    stamp(alice, 1)
    registry = ClientRegistry(d)
    registry.refresh()
    new = write(d, ".alice.tmp", f"key = {ALICE.public_text()}\n")
    stamp(new, 1)  # same size, same time: only the inode differs
    os.rename(new, alice)
    assert registry.refresh() is True


def test_the_registry_keeps_the_problems(tmp_path: Path) -> None:
    d = tmp_path / "clients"
    write(d, "alice.conf", "key = nonsense\n")
    write(d, "bob.conf", f"key = {BOB.public_text()}\n")
    registry = ClientRegistry(d)
    registry.refresh()
    assert list(registry.clients) == ["bob"] and list(registry.by_kid) == [BOB.kid]
    assert [(p.path.name, p.line) for p in registry.problems] == [("alice.conf", 1)]
