"""Protocol v2 end to end: enrol, knock, refuse, revoke, through nginx + fcgiwrap.

Two clients with their own keys (made by `webknock keygen` in the client namespace,
enrolled with `webknockctl client add`), different ports and source networks; the real
client as installed, and raw packets for what no honest client sends (a tampered
packet, a replay). v1 keeps working on the same URL.
"""

from __future__ import annotations

import base64
import datetime
import http.client
import json
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.lab import CLIENT4, CLIENT6, SERVER4, SERVER6, Deployment, deployment
from webknock.protocol import messages, transport, v1, v2

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "client" / "webknock"
POST_BOOT = "from tests.e2e.test_v2 import post_main; post_main()"


def post_main() -> None:
    """(Client namespace) POST each form body of stdin's list; print status and body."""
    out = []
    for item in json.loads(sys.stdin.read()):
        server = SERVER6 if ":" in item["src"] else SERVER4
        conn = http.client.HTTPConnection(server, 80, timeout=30, source_address=(item["src"], 0))
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
            conn.request("POST", "/webknock", base64.b64decode(item["body"]), headers)
            resp = conn.getresponse()
            out.append({"status": resp.status, "body": base64.b64encode(resp.read()).decode()})
        finally:
            conn.close()
    print(json.dumps(out))


@dataclass
class User:
    """One client user: home, profile, key, and the `webknock` command in the lab."""

    d: Deployment
    name: str
    home: Path

    @property
    def profile(self) -> Path:
        return self.home / f"{self.name}.ini"

    def run(self, *args: str) -> tuple[int, str, str]:
        argv = [str(self.d.site.python), str(CLIENT), "--config", str(self.profile), *args]
        env = {
            **self.d.site.env(),
            "PYTHONPATH": str(REPO),
            "HOME": str(self.home),
            "XDG_CACHE_HOME": str(self.home / "cache"),
        }
        proc = self.d.lab.client.run(argv, check=False, env=env, timeout=60)
        return proc.returncode, proc.stdout, proc.stderr

    def keygen(self) -> str:
        code, out, err = self.run("keygen", "-q")
        assert code == 0, err
        return out.strip()

    def enrol(self, *options: str, family: str = "ipv4") -> None:
        """Enrol this user's key and write the profile the admin printed (plus url and
        key_file, which the user fills in)."""
        key = self.keygen()
        printed = self.d.ctl("client", "add", self.name, "--key", key, *options).stdout
        lines = [ln for ln in printed.splitlines() if ln and not ln.startswith("#")]
        lines += [
            f"url = http://{SERVER4 if family == 'ipv4' else f'[{SERVER6}]'}/webknock",
            f"key_file = {self.name}.key",
            f"family = {family}",
            "timeout = 10",
        ]
        self.profile.write_text("\n".join(lines) + "\n")

    def signing_key(self) -> v2.SigningKey:
        return v2.SigningKey.from_pem((self.home / f"{self.name}.key").read_text())


@pytest.fixture
def lab() -> Iterator[tuple[Deployment, Path]]:
    with deployment("nginx") as d, tempfile.TemporaryDirectory() as home:
        try:
            yield d, Path(home)
        except BaseException:
            print(d.diagnostics())
            raise


def user(lab: tuple[Deployment, Path], name: str) -> User:
    d, base = lab
    home = base / name
    home.mkdir(mode=0o700)
    return User(d, name, home)


def grants_of(d: Deployment, client: str) -> set[tuple[str, str, int]]:
    return {(g["ip"], g["proto"], g["port"]) for g in d.list_json() if g["client"] == client}


def posts(d: Deployment, items: list[tuple[str, bytes]]) -> list[tuple[int, bytes]]:
    spec = [{"src": src, "body": base64.b64encode(body).decode()} for src, body in items]
    proc = d.lab.client.run(
        [str(d.site.python), "-c", POST_BOOT],
        input=json.dumps(spec),
        env={**d.site.env(), "PYTHONPATH": str(REPO)},
    )
    return [(a["status"], base64.b64decode(a["body"])) for a in json.loads(proc.stdout)]


def v2_form(key: v2.SigningKey, server: v2.SigningKey, body: dict[str, Any]) -> bytes:
    return (
        b"v2=" + transport.encode_field(v2.encode_request(key, server.kid, v2.dumps(body))).encode()
    )


def test_two_clients_with_their_own_ports_and_networks(lab: tuple[Deployment, Path]) -> None:
    d, _ = lab
    alice, bob = user(lab, "alice"), user(lab, "bob")
    alice.enrol("--ports", "tcp/22")
    bob.enrol("--ports", "tcp/2222", "--from", "2001:db8::/64", family="ipv6")

    code, _, err = alice.run("knock", "--json")
    assert code == 0, err
    assert grants_of(d, "alice") == {(CLIENT4, "tcp", 22)}

    code, _, err = bob.run("knock")
    assert code == 0, err
    assert grants_of(d, "bob") == {(CLIENT6, "tcp", 2222)}

    # bob from IPv4: not one of his networks (a signed refusal: `source`)
    bob.profile.write_text(
        bob.profile.read_text().replace(f"[{SERVER6}]", SERVER4).replace("ipv6", "ipv4")
    )
    code, _, err = bob.run("knock")
    assert code == 1 and "source" in err, err
    assert grants_of(d, "bob") == {(CLIENT6, "tcp", 2222)}
    # alice asks for bob's port: not hers
    code, _, err = alice.run("knock", "--ports", "tcp/2222")
    assert code == 1, err
    audit = d.ctl("list", "--json").stdout
    assert '"client": "alice"' in audit and '"client": "bob"' in audit


def test_unknown_tampered_replayed_expired_and_removed_are_refused(
    lab: tuple[Deployment, Path],
) -> None:
    d, _ = lab
    alice, mallory = user(lab, "alice"), user(lab, "mallory")
    alice.enrol()
    mallory.keygen()  # a key pair nobody enrolled
    mallory.profile.write_text(alice.profile.read_text().replace("alice.key", "mallory.key"))
    code, _, err = mallory.run("knock")
    assert code == 1 and "not enrolled" in err, err

    server = d.site.server_key
    key = alice.signing_key()
    now = int(time.time())
    body = {
        "api": "openports",
        "ts": now,
        "nonce": v2.new_nonce(),
        "ip": CLIENT4,
        "ports": ["tcp/22", "tcp/2222"],
        "time": 60,
    }
    form = v2_form(key, server, body)
    packet = transport.decode_v2_field(form[3:])
    tampered = bytearray(packet)
    tampered[-3] ^= 1
    tampered_form = b"v2=" + transport.encode_field(bytes(tampered)).encode()
    (s1, _), (s2, r2), (s3, r3) = posts(
        d, [(CLIENT4, tampered_form), (CLIENT4, form), (CLIENT4, form)]
    )
    assert s1 == 403, "a tampered packet does not verify: bare 403"
    assert s2 == 200 and json.loads(v2.verify_reply(server.public, packet, r2))["success"]
    assert s3 == 200
    refusal = json.loads(v2.verify_reply(server.public, packet, r3))
    assert refusal["success"] is False and refusal["code"] == "replay"
    assert grants_of(d, "alice") == {(CLIENT4, "tcp", 22), (CLIENT4, "tcp", 2222)}

    # an expired key (the admin edits the date into the file: add refuses past dates)
    conf = d.site.clients_dir / "alice.conf"
    yesterday = datetime.date.today() - datetime.timedelta(days=2)
    conf.write_text(conf.read_text() + f"expires = {yesterday.isoformat()}\n")
    code, _, err = alice.run("knock")
    assert code == 1 and "expired" in err, err
    conf.write_text(conf.read_text().replace(f"expires = {yesterday.isoformat()}\n", ""))
    code, _, err = alice.run("knock")
    assert code == 0, err

    # removed with --revoke: the port closes at once and the next knock is refused
    removed = d.ctl("client", "remove", "alice", "--revoke").stdout
    assert "live grant(s) of client alice" in removed
    assert grants_of(d, "alice") == set()
    rules = d.lab.server.run(["iptables-save"]).stdout
    assert CLIENT4 not in rules, "the port closed at once"
    code, _, err = alice.run("knock")
    assert code == 1 and "not enrolled" in err, err


def test_v1_keeps_working_on_the_same_url(lab: tuple[Deployment, Path]) -> None:
    d, _ = lab
    alice = user(lab, "alice")
    alice.enrol()
    now = int(time.time())
    data = messages.openports_request(CLIENT4, [("tcp", 22)], 60, now)
    v1_form = b"data=" + transport.encode_field(v1.encode(d.site.keys, data)).encode()
    ((status, reply),) = posts(d, [(CLIENT4, v1_form)])
    assert status == 200 and json.loads(v1.decode(d.site.keys, reply))["success"] is True
    code, _, err = alice.run("knock")
    assert code == 0, err
    listed = {(g["ip"], g["port"], g["client"]) for g in d.list_json()}
    assert (CLIENT4, 22, "alice") in listed  # the v2 knock renewed it: the last to open it
