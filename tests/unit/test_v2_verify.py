"""Protocol v2 through webknockd (docs/protocol-v2.md): knocks spooled as the CGI does, the
daemon's drain verifies, burns the replay mark, applies and answers; every refusal of the spec
in its order, the per-client policy, clients_dir read again on change, and the client's name
on every grant."""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
from pathlib import Path
from typing import Any

import pytest

from tests.cgi_side import frame, openports_packet, reply, submit
from tests.conftest import write_instance
from tests.fakes import MemoryFirewall, memory_daemon
from webknock.addresses import parse_address
from webknock.config import ServerConfig, load
from webknock.ctl import cli as ctl
from webknock.fsutil import write_atomic
from webknock.protocol import v2
from webknock.protocol.v1 import Keys
from webknock.server.events import Event
from webknock.server.loop import Daemon

#: The daemon's clock: one second after the vectors' `ts` (their replies say `"time":NOW`).
NOW = 1764057601.0
TS = 1764057600
HOME = "192.0.2.10"
OFFICE = "198.51.100.7"
TODAY = datetime.datetime.fromtimestamp(NOW, datetime.UTC).date()

Vectors = dict[str, Any]


def seeded(vectors: Vectors, who: str) -> v2.SigningKey:
    return v2.SigningKey.from_seed(bytes.fromhex(vectors[who]["seed_hex"]))


ALICE_SEED = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
ALICE = v2.SigningKey.from_seed(bytes.fromhex(ALICE_SEED))  # the vectors' client
BOB = v2.SigningKey.from_seed(bytes(range(100, 132)))
CAROL = v2.SigningKey.from_seed(bytes(range(150, 182)))


class Reply:
    """What a CGI got back for one v2 knock."""

    def __init__(self, status: int, note: str, raw: bytes, packet: bytes, body: Any) -> None:
        self.status, self.note, self.raw, self.packet, self.body = status, note, raw, packet, body

    @property
    def bare(self) -> bool:
        return self.body is None

    @property
    def code(self) -> str:
        assert self.body is not None and self.body["success"] is False, self.body
        return str(self.body["code"])

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.note!r}, {self.body!r})"


class Instance:
    """One instance with a v2 server key (the vectors' server), its clients_dir, and
    webknockd on an in-memory firewall with a clock of its own."""

    def __init__(
        self,
        tmp_path: Path,
        keys: Keys,
        vectors: Vectors,
        *,
        server_key: bool = True,
        **overrides: str,
    ) -> None:
        self.cfg: ServerConfig = load(write_instance(tmp_path, keys, **overrides))
        self.keys = keys
        self.server = seeded(vectors, "server")
        if server_key:
            write_atomic(self.cfg.server_key_file, self.server.to_pem().encode(), 0o600)
        self.events: list[Event] = []
        self.now = NOW
        self.daemon: Daemon
        self.fw: MemoryFirewall
        self.daemon, self.fw = memory_daemon(self.cfg, self.events.append, clock=lambda: self.now)

    # -- clients_dir ------------------------------------------------------------------------

    def enrol(self, name: str, key: v2.SigningKey | None, extra: str = "", **kw: str) -> Path:
        """Write <clients_dir>/<name>.conf: the key's line (unless None), `kw` as lines."""
        self.cfg.clients_dir.mkdir(exist_ok=True)
        lines = [f"key = {key.public_text(name + '@test')}"] if key else []
        lines += [f"{k} = {v}" for k, v in kw.items()]
        path = self.cfg.clients_dir / f"{name}.conf"
        path.write_text("\n".join(lines) + "\n" + extra)
        return path

    # -- knocking ---------------------------------------------------------------------------

    def send(
        self, packet: bytes, remote: str = HOME, protocol: str = "v2"
    ) -> tuple[int, str, bytes]:
        waiting = submit(self.cfg, payload=frame(packet, remote, protocol=protocol))
        self.daemon.drain()
        answer = waiting.result(2)
        assert answer is not None, "no answer"
        return answer

    def knock_packet(self, packet: bytes, remote: str = HOME) -> Reply:
        status, note, raw = self.send(packet, remote)
        if status != 200:
            return Reply(status, note, raw, packet, None)
        assert note == ""
        body = json.loads(v2.verify_reply(self.server.public, packet, raw))
        assert isinstance(body, dict) and body["time"] == int(self.now)
        return Reply(status, note, raw, packet, body)

    def knock(
        self,
        key: v2.SigningKey = ALICE,
        remote: str = HOME,
        server_kid: bytes | None = None,
        **members: Any,
    ) -> Reply:
        """A v2 request signed by `key`; `members` over an openports for `remote`."""
        obj: dict[str, Any] = {"api": "openports", "ts": int(self.now), "nonce": v2.new_nonce()}
        if members.get("api", "openports") == "openports":
            obj["ip"] = remote
        obj.update(members)
        obj = {k: v for k, v in obj.items() if v is not DROP}
        packet = v2.encode_request(key, server_kid or self.server.kid, v2.dumps(obj))
        return self.knock_packet(packet, remote)

    def knock_raw(self, body: bytes, key: v2.SigningKey = ALICE, remote: str = HOME) -> Reply:
        return self.knock_packet(v2.encode_request(key, self.server.kid, body), remote)

    def held(self) -> dict[tuple[str, str, int], float]:
        return {(k.ip_text, k.proto, k.port): e for k, e in self.fw.held.items()}

    def grants(self) -> dict[tuple[str, str, int], str | None]:
        return {
            (g.key.ip_text, g.key.proto, g.key.port): g.client
            for g in self.daemon.engine.store.read().all()
        }


DROP: Any = object()


@pytest.fixture
def inst(tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors) -> Instance:
    """alice (the vectors' client) may open tcp/22 from anywhere."""
    instance = Instance(tmp_path, vector_keys, v2_vectors)
    instance.enrol("alice", ALICE, ports="tcp/22")
    return instance


def make(tmp_path: Path, keys: Keys, vectors: Vectors, **kw: Any) -> Instance:
    return Instance(tmp_path, keys, vectors, **kw)


def test_the_vector_keys_are_the_ones_used_here(v2_vectors: Vectors) -> None:
    assert ALICE.public_text() == v2_vectors["client"]["public"]
    assert seeded(v2_vectors, "server").public_text() == v2_vectors["server"]["public"]


# -- the vectors through the daemon --------------------------------------------------------


@pytest.mark.parametrize("name", ["getinfo", "openports", "openports-v6-refused"])
def test_the_daemon_answers_each_vector_with_its_reply_byte_for_byte(
    inst: Instance, v2_vectors: Vectors, name: str
) -> None:
    case = next(c for c in v2_vectors["cases"] if c["name"] == name)
    status, note, raw = inst.send(bytes.fromhex(case["packet_hex"]))
    assert (status, note) == (200, "")
    assert raw.hex() == case["reply_hex"]
    assert raw[68:].decode() == case["reply_body"]


def test_getinfo_of_an_enrolled_client(inst: Instance) -> None:
    r = inst.knock(api="getinfo")
    assert r.status == 200
    assert r.body == {
        "success": True,
        "client": "alice",
        "ip": HOME,
        "ports": ["tcp/22"],
        "maxtime": 3600,
        "time": int(NOW),
    }
    assert inst.fw.held == {} and inst.grants() == {}


def test_getinfo_reports_the_address_seen_not_the_one_claimed(inst: Instance) -> None:
    assert inst.knock(api="getinfo", ip="203.0.113.5").body["ip"] == HOME


def test_openports_of_an_enrolled_client(inst: Instance) -> None:
    r = inst.knock(ports=["tcp/22"], time=60)
    assert r.body == {
        "success": True,
        "client": "alice",
        "ip": HOME,
        "ports": ["tcp/22"],
        "expires": int(NOW) + 60,
        "time": int(NOW),
    }
    assert inst.held() == {(HOME, "tcp", 22): NOW + 60}
    assert inst.grants() == {(HOME, "tcp", 22): "alice"}


def test_a_reply_verifies_only_for_its_own_request(inst: Instance) -> None:
    first = inst.knock(api="getinfo")
    second = inst.knock(api="getinfo")
    assert first.packet != second.packet
    v2.verify_reply(inst.server.public, first.packet, first.raw)
    with pytest.raises(v2.V2Error):
        v2.verify_reply(inst.server.public, second.packet, first.raw)
    with pytest.raises(v2.V2Error):
        v2.verify_reply(ALICE.public, first.packet, first.raw)


def test_an_ipv4_mapped_ip_is_the_ipv4_address(inst: Instance) -> None:
    r = inst.knock(ip=f"::ffff:{HOME}")
    assert r.body["success"] is True and r.body["ip"] == HOME


def test_openports_from_ipv6(inst: Instance) -> None:
    r = inst.knock(remote="2001:db8::10", time=10)
    assert r.body["success"] is True and r.body["ip"] == "2001:db8::10"
    assert inst.held() == {("2001:db8::10", "tcp", 22): NOW + 10}


# -- bare 403 --------------------------------------------------------------------------------


def assert_bare_403(r: Reply) -> None:
    assert (r.status, r.note, r.raw) == (403, "", b""), r


def test_an_unknown_key_gets_a_bare_403(inst: Instance) -> None:
    assert_bare_403(inst.knock(BOB))
    assert_bare_403(inst.knock(BOB, api="getinfo"))
    assert inst.fw.held == {}


def test_a_disabled_client_gets_a_bare_403(inst: Instance) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", enabled="no")
    assert_bare_403(inst.knock())
    assert_bare_403(inst.knock(api="getinfo"))
    assert inst.fw.held == {}


def test_a_bad_signature_gets_a_bare_403(inst: Instance) -> None:
    body = v2.dumps({"api": "openports", "ts": TS, "nonce": v2.new_nonce(), "ip": HOME})
    good = v2.encode_request(ALICE, inst.server.kid, body)
    flipped = bytearray(good)
    flipped[40] ^= 1
    assert_bare_403(inst.knock_packet(bytes(flipped)))
    other_body = bytearray(good)
    other_body[-2] ^= 1
    assert_bare_403(inst.knock_packet(bytes(other_body)))
    # signed by bob under alice's kid
    forged = good[:12] + BOB.sign(v2.REQUEST_CONTEXT + inst.server.kid + body) + body
    assert_bare_403(inst.knock_packet(forged))
    # signed by alice for another server
    assert_bare_403(inst.knock(server_kid=BOB.kid))
    assert inst.fw.held == {}
    assert inst.knock_packet(good).body["success"] is True  # none burnt its nonce


def test_without_a_server_key_v2_is_off(
    tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors
) -> None:
    inst = make(tmp_path, vector_keys, v2_vectors, server_key=False)
    inst.enrol("alice", ALICE)
    assert not inst.cfg.server_key_file.exists()
    assert_bare_403(inst.knock())
    assert inst.fw.held == {}
    # v1 on the same instance is unaffected
    status, _, body = inst.send(openports_packet(vector_keys, HOME, ts=NOW), protocol="v1")
    assert reply(vector_keys, (status, "", body))["success"] is True


def test_a_server_key_readable_by_others_is_500_and_v1_still_works(inst: Instance) -> None:
    os.chmod(inst.cfg.server_key_file, 0o644)
    status, _, raw = inst.send(v2.encode_request(ALICE, inst.server.kid, b"{}"))
    assert (status, raw) == (500, b"")
    answer = inst.send(openports_packet(inst.keys, HOME, ts=NOW), protocol="v1")
    assert reply(inst.keys, answer)["success"] is True


# -- signed refusals, in the spec's order --------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        v2.dumps({"api": "closeports", "ts": TS, "nonce": "A" * 22}),
        v2.dumps({"api": "getinfo", "ts": str(TS), "nonce": "A" * 22}),
        v2.dumps({"api": "getinfo", "ts": TS, "nonce": "short"}),
        v2.dumps({"api": "openports", "ts": TS, "nonce": "A" * 22}),
        v2.dumps({"api": "openports", "ts": TS, "nonce": "A" * 22, "ip": HOME, "ports": "tcp/22"}),
        v2.dumps({"api": "openports", "ts": TS, "nonce": "A" * 22, "ip": HOME, "ports": ["tcp/0"]}),
        v2.dumps({"api": "openports", "ts": TS, "nonce": "A" * 22, "ip": HOME, "time": -1}),
    ],
)
def test_a_malformed_body_is_a_signed_bad_request(inst: Instance, body: bytes) -> None:
    r = inst.knock_raw(body)
    assert r.status == 200 and r.code == "bad_request"
    assert set(r.body) == {"success", "code", "error", "time"}
    assert inst.fw.held == {}


def test_bad_request_comes_before_expired(inst: Instance) -> None:
    inst.enrol("alice", ALICE, expires=str(TODAY - datetime.timedelta(days=1)))
    assert inst.knock_raw(b"[]").code == "bad_request"
    assert inst.knock().code == "expired"


def test_an_expired_key(inst: Instance) -> None:
    inst.enrol("alice", ALICE, expires=str(TODAY - datetime.timedelta(days=1)))
    r = inst.knock()
    assert r.code == "expired" and r.body["error"] == "this key has expired"
    assert inst.knock(api="getinfo").code == "expired"
    assert inst.fw.held == {}


def test_a_key_expiring_today_is_still_accepted(inst: Instance) -> None:
    inst.enrol("alice", ALICE, expires=str(TODAY))
    end_of_day = datetime.datetime.combine(TODAY, datetime.time(23, 59, 59), datetime.UTC)
    inst.now = end_of_day.timestamp()
    assert inst.knock().body["success"] is True
    inst.now += 1  # the next day (UTC)
    assert inst.knock().code == "expired"


def test_expired_comes_before_clock(inst: Instance) -> None:
    inst.enrol("alice", ALICE, expires=str(TODAY - datetime.timedelta(days=1)))
    assert inst.knock(ts=TS - 3600).code == "expired"


@pytest.mark.parametrize("skew", [-31, 31, -(10**6), 10**6])
def test_a_request_outside_the_window_is_a_clock_refusal(inst: Instance, skew: int) -> None:
    r = inst.knock(ts=int(NOW) + skew)
    assert r.code == "clock" and r.body["time"] == int(NOW)
    assert f"{skew:+d} s" in r.body["error"] and "+/-30 s" in r.body["error"]
    assert inst.fw.held == {}


@pytest.mark.parametrize("skew", [-30, 30, 0])
def test_a_request_inside_the_window_is_accepted(inst: Instance, skew: int) -> None:
    assert inst.knock(ts=int(NOW) + skew).body["success"] is True


def test_the_window_is_v2_ts_window(tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors) -> None:
    inst = make(tmp_path, vector_keys, v2_vectors, v2_ts_window="5")
    inst.enrol("alice", ALICE)
    assert inst.knock(ts=int(NOW) - 6).code == "clock"
    assert inst.knock(ts=int(NOW) - 5).body["success"] is True


def test_clock_comes_before_source(inst: Instance) -> None:
    inst.enrol("alice", ALICE, **{"from": "198.51.100.0/24"})
    assert inst.knock(ts=TS - 100).code == "clock"
    assert inst.knock().code == "source"


def test_a_request_from_outside_the_client_networks_is_a_source_refusal(inst: Instance) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", **{"from": "198.51.100.0/24, 2001:db8:1::/48"})
    r = inst.knock()
    assert r.code == "source" and r.body["error"] == "not allowed from this address"
    assert inst.knock(api="getinfo").code == "source"
    assert inst.knock(remote="2001:db8:2::1").code == "source"
    assert inst.knock(remote=OFFICE).body["success"] is True
    assert inst.knock(remote="2001:db8:1::5").body["success"] is True
    assert set(inst.held()) == {(OFFICE, "tcp", 22), ("2001:db8:1::5", "tcp", 22)}


def test_source_comes_before_ip_mismatch(inst: Instance) -> None:
    inst.enrol("alice", ALICE, **{"from": "198.51.100.0/24"})
    assert inst.knock(ip=OFFICE).code == "source"


def test_an_ip_not_the_source_is_an_ip_mismatch(inst: Instance) -> None:
    r = inst.knock(ip="192.0.2.11")
    assert r.code == "ip_mismatch"
    assert r.body["error"] == "ip is not the address the request came from"
    assert inst.fw.held == {}


def test_getinfo_ip_is_informational_only(inst: Instance) -> None:
    assert inst.knock(api="getinfo", ip="192.0.2.11").body["success"] is True


@pytest.mark.parametrize(
    ("failed", "code"),
    [({"ts": TS - 100}, "clock"), ({"remote": OFFICE}, "source"), ({"ip": OFFICE}, "ip_mismatch")],
)
def test_the_checks_before_replay_answer_first(
    inst: Instance, failed: dict[str, Any], code: str
) -> None:
    inst.enrol("alice", ALICE, **{"from": "192.0.2.0/24"})
    nonce = v2.new_nonce()
    assert inst.knock(nonce=nonce).body["success"] is True
    assert inst.knock(nonce=nonce, **failed).code == code


def test_the_same_nonce_twice_is_a_replay(inst: Instance) -> None:
    nonce = v2.new_nonce()
    assert inst.knock(nonce=nonce, time=60).body["success"] is True
    r = inst.knock(nonce=nonce, time=600)  # another body, the same nonce
    assert r.code == "replay" and r.body["error"] == "this request was seen before"
    assert inst.held() == {(HOME, "tcp", 22): NOW + 60}


def test_the_very_same_packet_twice_is_a_replay(inst: Instance) -> None:
    first = inst.knock(api="getinfo")
    assert first.body["success"] is True
    assert inst.knock_packet(first.packet).code == "replay"


def test_a_replay_survives_a_new_daemon(inst: Instance) -> None:
    nonce = v2.new_nonce()
    assert inst.knock(nonce=nonce).body["success"] is True
    inst.daemon, inst.fw = memory_daemon(inst.cfg, clock=lambda: inst.now)
    assert inst.knock(nonce=nonce).code == "replay"


def test_a_nonce_is_per_client(inst: Instance) -> None:
    inst.enrol("bob", BOB)
    nonce = v2.new_nonce()
    assert inst.knock(ALICE, nonce=nonce).body["success"] is True
    assert inst.knock(BOB, nonce=nonce, remote="192.0.2.20").body["success"] is True


@pytest.mark.parametrize(
    "failed",
    [
        {"ts": TS - 100},  # clock
        {"ts": TS + 100},  # clock
        {"remote": OFFICE, "ip": OFFICE},  # source
        {"ip": "192.0.2.11"},  # ip_mismatch
    ],
)
def test_a_refusal_before_the_replay_step_does_not_burn_the_nonce(
    inst: Instance, failed: dict[str, Any]
) -> None:
    inst.enrol("alice", ALICE, **{"from": "192.0.2.0/24"})
    nonce = v2.new_nonce()
    assert inst.knock(nonce=nonce, **failed).code in ("clock", "source", "ip_mismatch")
    assert inst.knock(nonce=nonce).body["success"] is True
    assert inst.knock(nonce=nonce).code == "replay"


def test_expired_and_bad_signature_do_not_burn_the_nonce(inst: Instance) -> None:
    nonce = v2.new_nonce()
    inst.enrol("alice", ALICE, expires=str(TODAY - datetime.timedelta(days=1)))
    assert inst.knock(nonce=nonce).code == "expired"
    inst.enrol("alice", ALICE, expires=str(TODAY))
    assert inst.knock(nonce=nonce).body["success"] is True


def test_a_ports_refusal_uses_the_nonce_up(inst: Instance) -> None:
    """It passed steps 1 to 3: its nonce is spent."""
    nonce = v2.new_nonce()
    assert inst.knock(nonce=nonce, ports=["udp/51820"]).code == "ports"
    assert inst.knock(nonce=nonce).code == "replay"


def test_replay_comes_before_ports(inst: Instance) -> None:
    nonce = v2.new_nonce()
    assert inst.knock(nonce=nonce).body["success"] is True
    assert inst.knock(nonce=nonce, ports=["udp/51820"]).code == "replay"


@pytest.mark.parametrize(
    "ports", [["udp/51820"], ["tcp/2222"], ["tcp/23"], ["tcp/23", "udp/51820"]]
)
def test_asking_only_for_ports_not_allowed_is_a_ports_refusal(
    inst: Instance, ports: list[str]
) -> None:
    r = inst.knock(ports=ports)
    assert r.code == "ports" and r.body["error"] == "none of the requested ports is offered"
    assert inst.fw.held == {}


def test_of_the_ports_asked_only_those_allowed_are_granted(inst: Instance) -> None:
    r = inst.knock(ports=["udp/51820", "tcp/22", "tcp/23"])
    assert r.body["ports"] == ["tcp/22"]
    assert set(inst.held()) == {(HOME, "tcp", 22)}


def test_the_grant_limit(tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors) -> None:
    inst = make(tmp_path, vector_keys, v2_vectors, max_grants="1")
    inst.enrol("alice", ALICE, ports="tcp/22")
    assert inst.knock().body["success"] is True
    r = inst.knock(remote="192.0.2.11")
    assert r.code == "limit" and "limit of 1 grants" in r.body["error"]
    assert inst.knock().body["success"] is True  # a renewal is never refused
    assert set(inst.held()) == {(HOME, "tcp", 22)}


def test_the_prefix_limit(tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors) -> None:
    inst = make(tmp_path, vector_keys, v2_vectors, max_grants_per_prefix="1")
    inst.enrol("alice", ALICE)
    assert inst.knock(ports=["tcp/22", "tcp/2222"]).code == "limit"
    assert inst.knock(ports=["tcp/22"]).body["success"] is True


def test_a_firewall_failure(inst: Instance) -> None:
    inst.fw.fail_apply = inst.fw.fail_sync = True
    r = inst.knock()
    assert r.code == "firewall" and r.body["error"] == "firewall failed to apply the rule"
    assert inst.grants() == {}


# -- per-client policy ---------------------------------------------------------------------


def test_a_client_gets_its_ports_of_those_offered(inst: Instance) -> None:
    inst.enrol("alice", ALICE, ports="tcp/2222, udp/51820, tcp/23")  # tcp/23: not offered
    info = inst.knock(api="getinfo").body
    assert info["ports"] == ["tcp/2222", "udp/51820"]
    r = inst.knock(ports=[])
    assert r.body["ports"] == ["tcp/2222", "udp/51820"]
    assert set(inst.held()) == {(HOME, "tcp", 2222), (HOME, "udp", 51820)}


def test_a_client_without_ports_gets_every_offered_port(inst: Instance) -> None:
    inst.enrol("alice", ALICE)
    assert inst.knock(api="getinfo").body["ports"] == ["tcp/22", "tcp/2222", "udp/51820"]
    assert inst.knock(ports=DROP).body["ports"] == ["tcp/22", "tcp/2222", "udp/51820"]


@pytest.mark.parametrize(
    ("asked", "granted"), [(60, 60), (600, 600), (601, 600), (10**6, 600), (0, 600), (DROP, 600)]
)
def test_time_is_capped_at_the_client_longest(inst: Instance, asked: Any, granted: int) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", max_time="600")
    assert inst.knock(api="getinfo").body["maxtime"] == 600
    assert inst.knock(time=asked).body["expires"] == int(NOW) + granted
    assert inst.held() == {(HOME, "tcp", 22): NOW + granted}


def test_a_client_max_time_over_the_instance_is_the_instance(inst: Instance) -> None:
    inst.enrol("alice", ALICE, max_time="7200")
    assert inst.knock(api="getinfo").body["maxtime"] == 3600
    assert inst.knock(time=0).body["expires"] == int(NOW) + 3600


def test_a_renewal_never_moves_the_expiry_earlier(inst: Instance) -> None:
    assert inst.knock(time=600).body["expires"] == int(NOW) + 600
    inst.now += 10
    assert inst.knock(time=60).body["expires"] == int(NOW) + 600
    inst.now += 10
    assert inst.knock(time=0).body["expires"] == int(NOW) + 20 + 3600


def test_two_clients_with_their_own_ports_and_sources(inst: Instance) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", **{"from": "192.0.2.0/24"})
    inst.enrol("bob", BOB, ports="udp/51820", max_time="300", **{"from": "198.51.100.0/24"})
    a = inst.knock(ALICE, api="getinfo").body
    b = inst.knock(BOB, api="getinfo", remote=OFFICE).body
    assert (a["client"], a["ports"], a["maxtime"]) == ("alice", ["tcp/22"], 3600)
    assert (b["client"], b["ports"], b["maxtime"]) == ("bob", ["udp/51820"], 300)
    assert inst.knock(BOB).code == "source"
    assert inst.knock(ALICE, remote=OFFICE).code == "source"
    assert inst.knock(BOB, remote=OFFICE, ports=["tcp/22"]).code == "ports"
    assert inst.knock(ALICE, ports=["udp/51820"]).code == "ports"
    assert inst.knock(ALICE).body["ports"] == ["tcp/22"]
    assert inst.knock(BOB, remote=OFFICE).body["ports"] == ["udp/51820"]
    assert inst.grants() == {(HOME, "tcp", 22): "alice", (OFFICE, "udp", 51820): "bob"}
    assert inst.held() == {(HOME, "tcp", 22): NOW + 3600, (OFFICE, "udp", 51820): NOW + 300}


# -- clients_dir changes -------------------------------------------------------------------


def test_changes_in_clients_dir_take_effect_for_the_next_knock(
    tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors
) -> None:
    inst = make(tmp_path, vector_keys, v2_vectors)
    assert not inst.cfg.clients_dir.exists()
    assert_bare_403(inst.knock())
    path = inst.enrol("alice", ALICE, ports="tcp/22")  # added
    assert inst.knock().body["success"] is True
    inst.enrol("alice", ALICE, ports="tcp/22", enabled="no")  # disabled
    assert_bare_403(inst.knock())
    inst.enrol("alice", ALICE, ports="tcp/22, tcp/2222")  # enabled again, other ports
    assert inst.knock(api="getinfo").body["ports"] == ["tcp/22", "tcp/2222"]
    path.unlink()  # removed
    assert_bare_403(inst.knock())
    assert_bare_403(inst.knock(api="getinfo"))
    inst.enrol("alice2", ALICE)  # the same key under another name
    assert inst.knock(api="getinfo").body["client"] == "alice2"


def test_a_replaced_key_is_the_new_one(inst: Instance) -> None:
    inst.enrol("alice", BOB)
    assert_bare_403(inst.knock(ALICE))
    assert inst.knock(BOB).body["client"] == "alice"


def test_a_broken_client_file_is_skipped_and_logged_once(
    inst: Instance, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="webknock.server.verify")
    broken = inst.enrol("bob", BOB, ports="tcp/99999")
    inst.enrol("carol", CAROL)
    for _ in range(3):
        assert inst.knock(ALICE).body["success"] is True
        assert inst.knock(CAROL, remote="192.0.2.30").body["success"] is True
        assert_bare_403(inst.knock(BOB, remote="192.0.2.20"))
    skipped = [r.getMessage() for r in caplog.records if "client file skipped" in r.getMessage()]
    assert skipped == [
        f"client file skipped: {broken}:2: ports: 'tcp/99999' is not tcp/N or udp/N (N from 1 to 65535)"
    ]
    inst.enrol("bob", BOB)  # repaired
    assert inst.knock(BOB, remote="192.0.2.20").body["client"] == "bob"
    assert len([r for r in caplog.records if "client file skipped" in r.getMessage()]) == 1


def test_the_same_key_in_two_files_is_refused_for_both(inst: Instance) -> None:
    inst.enrol("mallory", ALICE, ports="tcp/2222")
    assert_bare_403(inst.knock())
    (inst.cfg.clients_dir / "mallory.conf").unlink()
    assert inst.knock().body["client"] == "alice"


# -- the client on every grant -------------------------------------------------------------


def test_the_grant_records_the_client(inst: Instance, capsys: pytest.CaptureFixture[str]) -> None:
    inst.knock(time=60)
    (grant,) = inst.daemon.engine.store.read().all()
    assert grant.client == "alice"
    listed = ctl.grant_json(grant, NOW)
    assert listed["client"] == "alice" and listed["ip"] == HOME and listed["remaining"] == 60
    ctl.cmd_list(inst.cfg, argparse.Namespace(all=True, json=True))
    (printed,) = json.loads(capsys.readouterr().out)
    assert (printed["ip"], printed["port"], printed["client"]) == (HOME, 22, "alice")
    opened = [e for e in inst.events if e.kind == "open"]
    assert [(e.ip, e.client, e.source) for e in opened] == [(HOME, "alice", "knock")]


def test_a_renewal_by_another_client_records_that_client(inst: Instance) -> None:
    inst.enrol("bob", BOB, ports="tcp/22")
    inst.knock(ALICE)
    inst.knock(BOB)
    assert inst.grants() == {(HOME, "tcp", 22): "bob"}
    assert [(e.kind, e.client) for e in inst.events] == [("open", "alice"), ("renew", "bob")]


def test_revoke_client_closes_only_that_clients_grants(inst: Instance) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22, udp/51820")
    inst.enrol("bob", BOB)
    inst.knock(ALICE)
    inst.knock(ALICE, remote="2001:db8::10")
    inst.knock(BOB, remote=OFFICE)
    inst.send(openports_packet(inst.keys, "192.0.2.99", ts=NOW), "192.0.2.99", protocol="v1")
    assert inst.grants() == {
        (HOME, "tcp", 22): "alice",
        (HOME, "udp", 51820): "alice",
        ("2001:db8::10", "tcp", 22): "alice",
        ("2001:db8::10", "udp", 51820): "alice",
        (OFFICE, "tcp", 22): "bob",
        (OFFICE, "tcp", 2222): "bob",
        (OFFICE, "udp", 51820): "bob",
        ("192.0.2.99", "tcp", 22): None,
    }
    gone = inst.daemon.engine.revoke_client("alice", NOW)
    assert sorted(str(g.key) for g in gone) == [
        "192.0.2.10:tcp/22",
        "192.0.2.10:udp/51820",
        "[2001:db8::10]:tcp/22",
        "[2001:db8::10]:udp/51820",
    ]
    assert inst.grants() == {
        (OFFICE, "tcp", 22): "bob",
        (OFFICE, "tcp", 2222): "bob",
        (OFFICE, "udp", 51820): "bob",
        ("192.0.2.99", "tcp", 22): None,
    }
    assert set(inst.held()) == set(inst.grants())
    revoked = [e for e in inst.events if e.kind == "revoke"]
    assert len(revoked) == 4 and {e.client for e in revoked} == {"alice"}
    assert inst.daemon.engine.revoke_client("alice", NOW) == []
    assert inst.daemon.engine.revoke_client("nobody", NOW) == []


# -- open_prefix: the client's network instead of its address ------------------------------


def test_a_client_with_open_prefix_gets_its_network_one_without_its_address(
    inst: Instance,
) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", open_prefix="24, 64")
    inst.enrol("bob", BOB, ports="tcp/22")
    r = inst.knock(ALICE, remote=OFFICE, time=60)
    assert r.body == {
        "success": True,
        "client": "alice",
        "ip": OFFICE,  # the address it knocked from, as ever
        "net": "198.51.100.0/24",  # and what was opened for it
        "ports": ["tcp/22"],
        "expires": int(NOW) + 60,
        "time": int(NOW),
    }
    assert inst.knock(ALICE, remote="2001:db8::10", time=60).body["net"] == "2001:db8::/64"
    r = inst.knock(BOB, remote="198.51.100.9", time=60)
    assert r.body["ip"] == "198.51.100.9" and "net" not in r.body
    assert inst.grants() == {
        ("198.51.100.0/24", "tcp", 22): "alice",
        ("2001:db8::/64", "tcp", 22): "alice",
        ("198.51.100.9", "tcp", 22): "bob",  # inside alice's network: a grant of its own
    }
    assert set(inst.held()) == set(inst.grants())
    opened = [(e.ip, e.extra.get("peer")) for e in inst.events if e.kind == "open"]
    assert opened == [
        ("198.51.100.0/24", OFFICE),
        ("2001:db8::/64", "2001:db8::10"),
        ("198.51.100.9", None),
    ]


def test_another_address_of_the_network_renews_the_network_grant(inst: Instance) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", open_prefix="24")
    inst.knock(remote=OFFICE, time=60)
    inst.now += 10
    r = inst.knock(remote="198.51.100.200", time=600)
    assert r.body["net"] == "198.51.100.0/24" and r.body["expires"] == int(NOW) + 610
    assert inst.held() == {("198.51.100.0/24", "tcp", 22): NOW + 610}
    assert [(e.kind, e.extra.get("peer")) for e in inst.events] == [
        ("open", OFFICE),
        ("renew", "198.51.100.200"),
    ]
    r = inst.knock(remote="2001:db8::10", time=60)  # `24`: IPv6 opens the address alone
    assert r.body["ip"] == "2001:db8::10" and "net" not in r.body
    assert ("2001:db8::10", "tcp", 22) in inst.held()


def test_open_prefix_keeps_the_address_check(inst: Instance) -> None:
    """The packet's ip must still be the very address it came from, not one of its network."""
    inst.enrol("alice", ALICE, ports="tcp/22", open_prefix="24, 64")
    assert inst.knock(remote=OFFICE, ip="198.51.100.8").code == "ip_mismatch"
    assert inst.knock(remote=OFFICE, ip="198.51.100.0/24").code == "bad_request"
    assert inst.fw.held == {}
    assert inst.knock(api="getinfo", remote=OFFICE).body["ip"] == OFFICE


def test_a_network_grant_is_listed_revoked_and_closed_with_its_client(
    inst: Instance, capsys: pytest.CaptureFixture[str]
) -> None:
    inst.enrol("alice", ALICE, ports="tcp/22", open_prefix="24")
    inst.knock(remote=OFFICE, time=60)
    ctl.cmd_list(inst.cfg, argparse.Namespace(all=True, json=True))
    (printed,) = json.loads(capsys.readouterr().out)
    assert (printed["ip"], printed["port"], printed["client"]) == ("198.51.100.0/24", 22, "alice")
    gone = inst.daemon.engine.revoke_client("alice", NOW)
    assert [str(g.key) for g in gone] == ["198.51.100.0/24:tcp/22"] and inst.fw.held == {}
    inst.knock(remote=OFFICE, time=60)
    gone = inst.daemon.engine.revoke(parse_address("198.51.100.77"), None, None, NOW)
    assert [str(g.key) for g in gone] == ["198.51.100.0/24:tcp/22"], "an address inside it"
    assert inst.fw.held == {} and inst.grants() == {}


# -- v1 beside v2 --------------------------------------------------------------------------


def test_v1_and_v2_on_the_same_instance(inst: Instance) -> None:
    answer = inst.send(
        openports_packet(inst.keys, "192.0.2.20", ts=NOW), "192.0.2.20", protocol="v1"
    )
    assert reply(inst.keys, answer)["success"] is True
    assert inst.knock().body["success"] is True
    assert inst.grants() == {("192.0.2.20", "tcp", 22): None, (HOME, "tcp", 22): "alice"}


def test_a_v1_packet_in_the_v2_field_and_back_are_refused(inst: Instance) -> None:
    v1_packet = openports_packet(inst.keys, HOME, ts=NOW)
    status, _, body = inst.send(v1_packet, protocol="v2")
    assert (status, body) == (400, b"")  # the spool frame is malformed: set aside
    v2_packet = v2.encode_request(ALICE, inst.server.kid, v2.dumps({"api": "getinfo"}))
    status, _, body = inst.send(v2_packet, protocol="v1")
    assert (status, body) == (400, b"")
    assert inst.fw.held == {}


def test_without_keys_file_v1_is_refused_and_v2_works(
    tmp_path: Path, vector_keys: Keys, v2_vectors: Vectors
) -> None:
    inst = make(tmp_path, vector_keys, v2_vectors, keys_file="")
    assert inst.cfg.keys_file is None
    inst.enrol("alice", ALICE)
    status, note, body = inst.send(openports_packet(vector_keys, HOME, ts=NOW), protocol="v1")
    assert (status, note, body) == (403, "", b"")
    assert inst.knock().body["success"] is True
    assert inst.grants() == {(HOME, p, n): "alice" for p, n in inst.cfg.offered()}
