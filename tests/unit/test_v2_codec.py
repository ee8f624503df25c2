"""Protocol v2 codec (webknock.protocol.v2): every vector of tests/vectors/v2.json reproduced
byte for byte, every must_refuse alteration refused, key texts, PEM and request bodies."""

from __future__ import annotations

import json
from typing import Any

import pytest

from webknock.protocol import v2
from webknock.protocol.transport import V2_HEAD, decode_v2_field, encode_field

Vectors = dict[str, Any]

CASES = ("getinfo", "openports", "openports-v6-refused")


def key_of(vectors: Vectors, who: str) -> v2.SigningKey:
    return v2.SigningKey.from_seed(bytes.fromhex(vectors[who]["seed_hex"]))


def case_of(vectors: Vectors, name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [c for c in vectors["cases"] if c["name"] == name]
    assert len(found) == 1, name
    return found[0]


def test_the_vector_file_has_the_cases_the_spec_names(v2_vectors: Vectors) -> None:
    assert tuple(c["name"] for c in v2_vectors["cases"]) == CASES
    assert set(v2_vectors["must_refuse"]) == {
        "flipped_body_byte",
        "flipped_signature_byte",
        "reply_to_other_request",
    }


# -- keys ----------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["client", "server"])
def test_public_key_text_and_kid_from_the_seed(v2_vectors: Vectors, who: str) -> None:
    key = key_of(v2_vectors, who)
    assert key.public_text() == v2_vectors[who]["public"]
    assert key.kid.hex() == v2_vectors[who]["kid_hex"]
    assert v2.key_id(key.public) == key.kid
    assert len(key.public) == 32 and len(key.kid) == v2.KID_LEN
    raw, comment = v2.parse_public_key(v2_vectors[who]["public"])
    assert (raw, comment) == (key.public, "")


def test_the_spec_example_key_text_parses() -> None:
    raw, comment = v2.parse_public_key("wk2:11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
    assert len(raw) == 32 and comment == ""


def test_repr_shows_the_kid_not_the_key(v2_vectors: Vectors) -> None:
    key = key_of(v2_vectors, "client")
    assert repr(key) == f"SigningKey(kid={v2_vectors['client']['kid_hex']})"
    assert v2_vectors["client"]["seed_hex"] not in repr(key)


@pytest.mark.parametrize("comment", ["", "alice@laptop", "alice laptop (2025)"])
def test_public_key_text_round_trip(comment: str) -> None:
    key = v2.SigningKey.generate()
    text = key.public_text(comment)
    assert text.startswith("wk2:") and "=" not in text.split(" ")[0]
    assert v2.parse_public_key(text) == (key.public, comment)
    assert v2.parse_public_key(f"  {text}  \n") == (key.public, comment)
    assert v2.public_key_text(key.public, comment) == text


def not_a_point() -> bytes:
    """32 bytes encoding a y of which no x makes a point of Ed25519 (RFC 8032 5.1.3: x² =
    (y² - 1) / (d y² + 1) has no square root mod p)."""
    p = 2**255 - 19
    d = -121665 * pow(121666, -1, p) % p
    for y in range(2, 1000):
        x2 = (y * y - 1) * pow(d * y * y + 1, -1, p) % p
        if x2 and pow(x2, (p - 1) // 2, p) == p - 1:
            return y.to_bytes(32, "little")
    raise AssertionError("no such y below 1000")


def b64url(raw: bytes) -> str:
    return encode_field(raw)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("wk1:" + b64url(bytes(range(32))), "starts with"),
        ("WK2:" + b64url(bytes(range(32))), "starts with"),
        (b64url(bytes(range(32))), "starts with"),
        ("", "starts with"),
        ("wk2:" + b64url(bytes(range(31))), "32 bytes, this one 31"),
        ("wk2:" + b64url(bytes(range(33))), "32 bytes, this one 33"),
        ("wk2:", "32 bytes, this one 0"),
        ("wk2:" + b64url(bytes(range(32)))[:-1] + "+", "not base64url"),
        ("wk2:" + b64url(bytes(range(32)))[:-1] + "/", "not base64url"),
        ("wk2:" + b64url(bytes(range(32))) + "=", "not base64url"),
        ("wk2:" + b64url(bytes(range(32)))[:-1] + "!", "not base64url"),
        ("wk2:" + "A" * 45, "not base64url"),  # 1 more than a multiple of 4
        ("wk2:" + b64url(bytes(range(32))) + "A", "32 bytes, this one 33"),
        ("wk2:" + b64url(not_a_point()), "not a point"),
        ("wk2:" + b64url(((2**255 - 19) + 1).to_bytes(32, "little")), "not a point"),
    ],
)
def test_parse_public_key_refuses(text: str, why: str) -> None:
    with pytest.raises(v2.V2Error, match=why):
        v2.parse_public_key(text)


def test_pem_round_trip() -> None:
    key = v2.SigningKey.generate()
    pem = key.to_pem()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----\n") and pem.endswith("-----\n")
    back = v2.SigningKey.from_pem(pem)
    assert (back.public, back.kid) == (key.public, key.kid)
    assert back.sign(b"message") == key.sign(b"message")  # Ed25519 is deterministic


def test_pem_of_a_vector_key_round_trips(v2_vectors: Vectors) -> None:
    key = key_of(v2_vectors, "server")
    back = v2.SigningKey.from_pem(key.to_pem())
    assert back.public_text() == v2_vectors["server"]["public"]


@pytest.mark.parametrize(
    "pem",
    [
        "",
        "not a key",
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    ],
)
def test_from_pem_refuses_what_is_no_private_key(pem: str) -> None:
    with pytest.raises(v2.V2Error, match="PKCS#8"):
        v2.SigningKey.from_pem(pem)


def test_from_pem_refuses_a_public_key_and_another_curve() -> None:
    from Crypto.PublicKey import ECC

    public = ECC.generate(curve="Ed25519").public_key().export_key(format="PEM")
    with pytest.raises(v2.V2Error):
        v2.SigningKey.from_pem(public)
    p256 = ECC.generate(curve="P-256").export_key(format="PEM")
    with pytest.raises(v2.V2Error):
        v2.SigningKey.from_pem(p256)


# -- packets of the vectors ---------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_request_packet_byte_for_byte(v2_vectors: Vectors, name: str) -> None:
    case = case_of(v2_vectors, name)
    client, server = key_of(v2_vectors, "client"), key_of(v2_vectors, "server")
    body = case["body"].encode()
    packet = v2.encode_request(client, server.kid, body)
    assert packet.hex() == case["packet_hex"]
    assert packet[:4] == b"WK2Q" and packet[4:12] == client.kid and packet[76:] == body
    assert v2.split_request(packet) == (client.kid, packet[12:76], body)
    assert v2.verify_request(client.public, server.kid, packet) == body


@pytest.mark.parametrize("name", CASES)
def test_form_field_byte_for_byte(v2_vectors: Vectors, name: str) -> None:
    case = case_of(v2_vectors, name)
    packet = bytes.fromhex(case["packet_hex"])
    field, _, value = case["form"].partition("=")
    assert field == "v2"
    assert value == encode_field(packet)
    assert decode_v2_field(value.encode()) == packet


@pytest.mark.parametrize("name", CASES)
def test_reply_byte_for_byte(v2_vectors: Vectors, name: str) -> None:
    case = case_of(v2_vectors, name)
    server = key_of(v2_vectors, "server")
    packet = bytes.fromhex(case["packet_hex"])
    reply = v2.encode_reply(server, packet, case["reply_body"].encode())
    assert reply.hex() == case["reply_hex"]
    assert reply[:4] == b"WK2R"
    assert v2.verify_reply(server.public, packet, reply) == case["reply_body"].encode()


@pytest.mark.parametrize("name", CASES)
def test_the_vector_bodies_parse(v2_vectors: Vectors, name: str) -> None:
    case = case_of(v2_vectors, name)
    request = v2.parse_body(case["body"].encode())
    body = json.loads(case["body"])
    assert (request.api, request.ts, request.nonce) == (body["api"], body["ts"], body["nonce"])
    if name == "getinfo":
        assert request.ip is None and request.ports == () and request.time == 0
    else:
        assert str(request.ip) == body["ip"]
        assert [v2.port_text(p) for p in request.ports] == body["ports"]
        assert request.time == body["time"]


def test_the_openports_vector_body_in_detail(v2_vectors: Vectors) -> None:
    request = v2.parse_body(case_of(v2_vectors, "openports")["body"].encode())
    assert str(request.ip) == "192.0.2.10"
    assert request.ports == (("tcp", 22), ("udp", 51820)) and request.time == 600
    v6 = v2.parse_body(case_of(v2_vectors, "openports-v6-refused")["body"].encode())
    assert str(v6.ip) == "2001:db8::10" and v6.ports == () and v6.time == 0


# -- must_refuse --------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_a_flipped_body_byte_is_refused(v2_vectors: Vectors, name: str) -> None:
    client, server = key_of(v2_vectors, "client"), key_of(v2_vectors, "server")
    packet = bytes.fromhex(case_of(v2_vectors, name)["packet_hex"])
    for offset in (V2_HEAD, V2_HEAD + 10, len(packet) - 1):
        for bit in (0x01, 0x80):
            bad = bytearray(packet)
            bad[offset] ^= bit
            with pytest.raises(v2.V2Error, match="does not verify"):
                v2.verify_request(client.public, server.kid, bytes(bad))


@pytest.mark.parametrize("name", CASES)
def test_a_flipped_signature_byte_is_refused(v2_vectors: Vectors, name: str) -> None:
    client, server = key_of(v2_vectors, "client"), key_of(v2_vectors, "server")
    packet = bytes.fromhex(case_of(v2_vectors, name)["packet_hex"])
    for offset in (12, 12 + 31, 12 + 32, 75):
        bad = bytearray(packet)
        bad[offset] ^= 0x01
        with pytest.raises(v2.V2Error, match="does not verify"):
            v2.verify_request(client.public, server.kid, bytes(bad))


def test_a_request_for_another_server_or_from_another_key_is_refused(v2_vectors: Vectors) -> None:
    client, server = key_of(v2_vectors, "client"), key_of(v2_vectors, "server")
    packet = bytes.fromhex(case_of(v2_vectors, "getinfo")["packet_hex"])
    with pytest.raises(v2.V2Error):
        v2.verify_request(client.public, client.kid, packet)  # signed for `server` only
    with pytest.raises(v2.V2Error):
        v2.verify_request(server.public, server.kid, packet)


def test_the_getinfo_reply_does_not_verify_for_the_openports_request(v2_vectors: Vectors) -> None:
    server = key_of(v2_vectors, "server")
    reply = bytes.fromhex(case_of(v2_vectors, "getinfo")["reply_hex"])
    other = bytes.fromhex(case_of(v2_vectors, "openports")["packet_hex"])
    with pytest.raises(v2.V2Error, match="does not verify"):
        v2.verify_reply(server.public, other, reply)


@pytest.mark.parametrize("name", CASES)
def test_an_altered_reply_or_another_server_key_is_refused(v2_vectors: Vectors, name: str) -> None:
    case = case_of(v2_vectors, name)
    server, client = key_of(v2_vectors, "server"), key_of(v2_vectors, "client")
    packet = bytes.fromhex(case["packet_hex"])
    reply = bytes.fromhex(case["reply_hex"])
    for offset in (4, 67, 68, len(reply) - 1):
        bad = bytearray(reply)
        bad[offset] ^= 0x01
        with pytest.raises(v2.V2Error):
            v2.verify_reply(server.public, packet, bytes(bad))
    with pytest.raises(v2.V2Error):
        v2.verify_reply(client.public, packet, reply)
    for short in (b"", b"WK2R", reply[:69], b"WK2Q" + reply[4:]):
        with pytest.raises(v2.V2Error, match="not a v2 reply"):
            v2.verify_reply(server.public, packet, short)


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"WK2Q" + bytes(72),  # head only, no body
        b"WK2R" + bytes(72) + b"{}",
        b"WK1Q" + bytes(72) + b"{}",
        b"WK2Q" + bytes(72) + b"x" * 2049,
    ],
)
def test_split_request_refuses_wrong_magic_and_lengths(packet: bytes) -> None:
    with pytest.raises(v2.V2Error, match="not a v2 request"):
        v2.split_request(packet)


def test_bodies_of_1_to_2048_bytes_are_encoded(v2_vectors: Vectors) -> None:
    client, server = key_of(v2_vectors, "client"), key_of(v2_vectors, "server")
    for size in (1, 2048):
        packet = v2.encode_request(client, server.kid, b"x" * size)
        assert v2.verify_request(client.public, server.kid, packet) == b"x" * size
    for size in (0, 2049):
        with pytest.raises(v2.V2Error):
            v2.encode_request(client, server.kid, b"x" * size)


def test_new_nonces_are_well_formed_and_new() -> None:
    nonces = {v2.new_nonce() for _ in range(100)}
    assert len(nonces) == 100
    assert all(v2.NONCE.fullmatch(n) and len(n) == 22 for n in nonces)


# -- bodies -------------------------------------------------------------------------------

TS = 1764057600
NONCE = "AAECAwQFBgcICQoLDA0ODw"


def body(**members: Any) -> bytes:
    obj = {"api": "openports", "ts": TS, "nonce": NONCE, "ip": "192.0.2.10"}
    obj.update(members)
    return json.dumps({k: v for k, v in obj.items() if v is not DROP}).encode()


DROP: Any = object()


def test_a_minimal_openports_body_means_all_ports_for_the_longest() -> None:
    request = v2.parse_body(body())
    assert request == v2.Request("openports", TS, NONCE, request.ip, (), 0)
    assert str(request.ip) == "192.0.2.10"


def test_unknown_members_are_ignored_and_ports_deduplicated() -> None:
    request = v2.parse_body(
        body(extra={"a": 1}, ports=["tcp/22", "udp/22", "tcp/22", "tcp/65535"], time=1)
    )
    assert request.ports == (("tcp", 22), ("udp", 22), ("tcp", 65535)) and request.time == 1


def test_a_getinfo_body_with_an_informational_ip() -> None:
    request = v2.parse_body(body(api="getinfo", ip="2001:db8::1", ports=DROP))
    assert request.api == "getinfo" and str(request.ip) == "2001:db8::1"
    assert v2.parse_body(body(api="getinfo", ip=DROP)).ip is None
    assert v2.parse_body(body(api="getinfo", ip="not an address")).ip is None


def test_an_ipv4_mapped_address_is_the_ipv4_address() -> None:
    assert str(v2.parse_body(body(ip="::ffff:192.0.2.10")).ip) == "192.0.2.10"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"\xff\xfe{}", "not JSON"),
        (b"[" * 100000 + b"]" * 100000, "not JSON"),
        (b"[]", "not a JSON object"),
        (b'"openports"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"42", "not a JSON object"),
        (body(api=DROP), "unknown api"),
        (body(api="closeports"), "unknown api"),
        (body(api="GETINFO"), "unknown api"),
        (body(api=["getinfo"]), "unknown api"),
        (body(ts=DROP), "ts is not an integer"),
        (body(ts="1764057600"), "ts is not an integer"),
        (body(ts=1764057600.0), "ts is not an integer"),
        (body(ts=True), "ts is not an integer"),
        (body(ts=None), "ts is not an integer"),
        (body(nonce=DROP), "nonce"),
        (body(nonce="A" * 15), "nonce"),
        (body(nonce="A" * 65), "nonce"),
        (body(nonce="A" * 15 + "="), "nonce"),
        (body(nonce="A" * 15 + "+"), "nonce"),
        (body(nonce="A" * 15 + "/"), "nonce"),
        (body(nonce="A" * 15 + "é"), "nonce"),
        (body(nonce="A" * 16 + "\n"), "nonce"),
        (body(nonce=1234567890123456789), "nonce"),
        (body(ip=DROP), "ip is not an address"),
        (body(ip=None), "ip is not an address"),
        (body(ip="192.0.2"), "ip is not an address"),
        (body(ip="example.org"), "ip is not an address"),
        (body(ip="192.0.2.0/24"), "ip is not an address"),
        (body(ip=3221226000), "ip is not an address"),
        (body(ip="fe80::1%eth0"), "ip is not an address"),
        (body(ip="fe80::1%1"), "ip is not an address"),
        (body(ports="tcp/22"), "ports is not a list"),
        (body(ports={"tcp": 22}), "ports is not a list"),
        (body(ports=None), "ports is not a list"),
        (body(ports=["tcp/22"] * 257), "ports is not a list"),
        (body(ports=[22]), "a port is not"),
        (body(ports=[["tcp", 22]]), "a port is not"),
        (body(ports=["tcp:22"]), "a port is not"),
        (body(ports=["sctp/22"]), "a port is not"),
        (body(ports=["TCP/22"]), "a port is not"),
        (body(ports=["tcp/ 22"]), "a port is not"),
        (body(ports=["tcp/22 "]), "a port is not"),
        (body(ports=["tcp/"]), "a port is not"),
        (body(ports=["tcp/0"]), "a port is not"),
        (body(ports=["udp/65536"]), "a port is not"),
        (body(ports=["tcp/100000"]), "a port is not"),
        (body(ports=["tcp/-1"]), "a port is not"),
        (body(ports=["tcp/22", "udp/0"]), "a port is not"),
        (body(time=-1), "time is negative"),
        (body(time=1.5), "time is not an integer"),
        (body(time="60"), "time is not an integer"),
        (body(time=True), "time is not an integer"),
        (body(time=None), "time is not an integer"),
    ],
)
def test_parse_body_refuses(raw: bytes, why: str) -> None:
    with pytest.raises(v2.V2Error, match=why):
        v2.parse_body(raw)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-32", "utf-8-sig"])
def test_a_body_not_in_utf8_is_refused(encoding: str) -> None:
    raw = json.dumps({"api": "getinfo", "ts": TS, "nonce": NONCE}).encode(encoding)
    with pytest.raises(v2.V2Error):
        v2.parse_body(raw)


@pytest.mark.parametrize("ip", [5, "fe80::1%eth0", ["192.0.2.10"]])
def test_a_getinfo_ip_that_is_no_address_is_ignored(ip: object) -> None:
    assert v2.parse_body(body(api="getinfo", ip=ip)).ip is None


def test_dumps_is_compact() -> None:
    assert v2.dumps({"a": 1, "b": [1, 2]}) == b'{"a":1,"b":[1,2]}'
    assert v2.port_text(("udp", 51820)) == "udp/51820"
