"""Root verifies every knock, through real nginx + fcgiwrap (as www-data), with the keys
0600 root:root and webknockd under the unit's capability bounding set (no DAC_OVERRIDE).

- The original PHP client's packets (the shape of tests/vectors/v1.json, sealed with the
  vector keys) work over IPv4 and IPv6, and the replies decode with those keys. (That
  the vectors' own reply packets decode is tests/unit/test_codec.py's.)
- The web user, who can write into requests/ and waits/, forges requests of every shape
  and gets no grant, no rule, no write through a link; the daemon survives.
- A flood of planted entries leaves the daemon's log quiet, valid knocks keep working,
  and housekeeping removes the entries (what it cannot remove it logs once).
- Bad packets are throttled per prefix; a valid knock never is. A copied packet sent first
  from another address does not burn it. The web user cannot fill more than the spool's
  own tmpfs.

Client-side code (`client_main`) runs in the client namespace; web-user code
(`web_user_main`) in the server namespace as www-data, started as fcgiwrap is.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import http.client
import json
import os
import re
import select
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import webknock.spool as spool_layout
from tests.lab import (
    CLIENT4,
    CLIENT6,
    OTHER4,
    OTHER6,
    SERVER4,
    SERVER6,
    Deployment,
    wait_until,
)
from webknock.protocol import messages, transport, v1
from webknock.spool import request as wkspool

REPO = Path(__file__).resolve().parents[2]
#: How fcgiwrap is started in the lab (tests/lab Nginx): the web user, its groups.
WEB_USER = ["setpriv", "--reuid=www-data", "--regid=www-data", "--init-groups"]
CLIENT_BOOT = "from tests.e2e.test_root_side import client_main; client_main()"
WEB_BOOT = "from tests.e2e.test_root_side import web_user_main; web_user_main()"
#: webknockd's housekeeping period (webknock.server.loop.PRUNE_EVERY), plus slack.
ROUND = 10.0 + 1.5
MiB = 1024 * 1024


# -- client side (runs in the client namespace) ---------------------------------------------


def post(server: str, src: str, body: bytes) -> tuple[int, str, bytes]:
    """One form POST to /webknock from `src` on a fresh connection: status, note, body."""
    conn = http.client.HTTPConnection(server, 80, timeout=30, source_address=(src, 0))
    try:
        headers = {"Content-Type": "application/x-www-form-urlencoded", "Connection": "close"}
        conn.request("POST", "/webknock", body, headers)
        resp = conn.getresponse()
        return resp.status, resp.getheader("X-Webknock-Error") or "", resp.read()
    finally:
        conn.close()


def client_main() -> None:
    """Send `posts` in order: each a ready `body` (Base64) or a `seal` (keys and a request
    object whose null ``ts`` becomes the time of sending, serialised compactly in its own
    key order, as the PHP client does). Prints status, note, body of each."""
    spec = json.loads(sys.stdin.read())
    answers = []
    for item in spec["posts"]:
        if "seal" in item:
            keys = v1.Keys.from_hex(item["seal"]["keys"])
            request = dict(item["seal"]["request"])
            if request.get("ts") is None:
                request["ts"] = int(time.time())
            if "nonce" in request:  # ours: a fresh one each time (the PHP client sends none)
                request["nonce"] = messages.nonce()
            packet = v1.encode(keys, messages.dumps(request))
            body = b"data=" + transport.encode_field(packet).encode()
        else:
            body = base64.b64decode(item["body"])
        server = SERVER6 if ":" in item["src"] else SERVER4
        started = time.monotonic()
        status, note, reply = post(server, item["src"], body)
        answers.append(
            {
                "status": status,
                "note": note,
                "body": base64.b64encode(reply).decode(),
                "seconds": time.monotonic() - started,
            }
        )
        time.sleep(item.get("pause", 0))
    print(json.dumps({"answers": answers}))


# -- web-user side (runs in the server namespace as www-data) -------------------------------


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _write_file(path: Path, item: dict[str, Any], now: float) -> None:
    """A regular file, written under a temp name of the CGI's pattern and renamed into place
    (so the daemon never reads it half-written)."""
    tmp = path.parent / f".{wkspool.new_request_id()}{spool_layout.TEMP_SUFFIX}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, bytes.fromhex(item.get("hex", "")))
        if item.get("fill"):
            block = b"A" * MiB
            left = int(item["fill"])
            while left > 0:
                left -= os.write(fd, block[: min(left, MiB)])
        if item.get("sparse"):
            os.ftruncate(fd, int(item["sparse"]))
        os.fchmod(fd, int(item.get("mode", 0o640)))
    finally:
        os.close(fd)
    if "mtime" in item:
        os.utime(tmp, (now, now + item["mtime"]))
    os.rename(tmp, path)


def _make_dir(path: Path, depth: int) -> None:
    """A directory holding a file (under `depth` nested directories), mode 0500 all the way
    down: what root without CAP_DAC_OVERRIDE cannot empty as it is."""
    tmp = path.parent / f".{wkspool.new_request_id()}{spool_layout.TEMP_SUFFIX}"
    levels = [tmp]
    for _ in range(depth):
        levels.append(levels[-1] / "d")
    for level in levels:
        os.mkdir(level, 0o700)
    (levels[-1] / "file").write_bytes(b"x")
    for level in reversed(levels):
        os.chmod(level, 0o500)
    os.rename(tmp, path)


def _make_entry(path: Path, item: dict[str, Any], now: float) -> None:
    kind = item["kind"]
    if kind == "file":
        _write_file(path, item, now)
    elif kind == "symlink":
        os.symlink(item["target"], path)
    elif kind == "fifo":
        os.mkfifo(path, 0o600)
        if "mtime" in item:
            os.utime(path, (now, now + item["mtime"]))
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(str(path))
    elif kind == "dir":
        _make_dir(path, int(item.get("depth", 0)))
    elif kind == "hardlink":  # a second name for a file of our own
        source = path.parent / f"src-{wkspool.new_request_id()}"
        source.write_bytes(bytes.fromhex(item.get("hex", "")))
        os.link(source, path)
    elif kind == "attempt":  # where the web user must not be able to create anything
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
    elif kind == "link_from":  # a second name for a file of root's
        os.link(item["target"], path)
    else:
        raise SystemExit(f"unknown kind {kind}")


def _make_bell(root: Path, rid: str, kind: str, target: str) -> tuple[int, list[Path]]:
    """What the web user puts at waits/<rid> before the request: a doorbell as the CGI
    makes it, or something for root to write into. Returns (read end or -1, paths)."""
    path = root / spool_layout.WAITS_DIR / rid
    if kind == "fifo":
        return wkspool.install_bell(str(path)), [path]
    if kind == "hardlinked":  # our doorbell under another id, linked as this one
        other = root / spool_layout.WAITS_DIR / wkspool.new_request_id()
        fd = wkspool.install_bell(str(other))
        os.link(other, path)
        return fd, [other, path]
    if kind == "file":
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        os.fchmod(fd, 0o666)
        os.close(fd)
        return -1, []
    if kind == "symlink":
        os.symlink(target, path)
        return -1, []
    if kind == "dir":
        os.mkdir(path, 0o777)
        return -1, []
    raise SystemExit(f"unknown bell {kind}")


def plant(spec: dict[str, Any]) -> dict[str, Any]:
    """Create every item of `spec["plants"]` (`count` times each), then wait up to
    `spec["wait"]` seconds for the answers rung into the doorbells; per item label: what
    creating gave (ok or an errno name), the answers (status, or none), and the size of
    regular files put where a doorbell belongs."""
    from webknock.spool import doorbell

    root = Path(spec["spool"])
    now = time.time()
    results: dict[str, dict[str, Any]] = {}
    bells: list[tuple[str, int, list[Path]]] = []
    traps: list[tuple[str, Path]] = []
    for item in spec["plants"]:
        res = results.setdefault(item["label"], {"made": Counter(), "answers": Counter()})
        for n in range(int(item.get("count", 1))):
            rid = wkspool.new_request_id()
            path = root / item["dir"] / item["name"].format(id=rid, n=n)
            try:
                if item.get("bell"):
                    fd, paths = _make_bell(root, rid, item["bell"], item.get("bell_target", ""))
                    if fd >= 0:
                        bells.append((item["label"], fd, paths))
                    elif item["bell"] == "file":
                        traps.append((item["label"], root / spool_layout.WAITS_DIR / rid))
                _make_entry(path, item, now)
                res["made"]["ok"] += 1
            except OSError as exc:
                res["made"][_errno_name(exc)] += 1
    deadline = time.monotonic() + float(spec["wait"])
    waiting = {fd: (label, paths) for label, fd, paths in bells}
    poller = select.poll()
    for fd in waiting:
        poller.register(fd, select.POLLIN)
    while waiting and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            label, paths = waiting.pop(fd)
            poller.unregister(fd)
            data = os.read(fd, doorbell.MAX_ANSWER_BYTES + 1)
            status = doorbell.parse_answer(data)[0] if data else "empty"  # opened, not written
            results[label]["answers"][str(status)] += 1
            wkspool.remove_bell(str(paths[0]), fd)
            for extra in paths[1:]:
                extra.unlink()
    for fd, (label, paths) in waiting.items():
        results[label]["answers"]["none"] += 1
        wkspool.remove_bell(str(paths[0]), fd)
        for extra in paths[1:]:
            extra.unlink()
    for label, path in traps:
        results[label].setdefault("sizes", []).append(os.lstat(path).st_size)
    return {
        label: {k: dict(v) if isinstance(v, Counter) else v for k, v in r.items()}
        for label, r in results.items()
    }


def fill(spec: dict[str, Any]) -> None:
    """Write `spec["bytes"]` into `spec["path"]` until the file system says no; keep the
    file open until a line arrives on stdin (after the result is printed)."""
    fd = os.open(spec["path"], os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    block, chunk, written, error = b"\0" * MiB, MiB, 0, ""
    while written < spec["bytes"]:
        try:
            written += os.write(fd, block[: min(chunk, spec["bytes"] - written)])
        except OSError as exc:
            if exc.errno == errno.ENOSPC and chunk > 1:
                chunk = max(1, chunk // 64)  # fill the last pages too
                continue
            error = _errno_name(exc)
            break
    vfs = os.statvfs(spec["path"])
    print(json.dumps({"written": written, "error": error, "free": vfs.f_bavail}), flush=True)
    sys.stdin.readline()
    os.close(fd)


def web_user_main() -> None:
    spec = json.loads(sys.stdin.readline())
    if spec["action"] == "plant":
        print(json.dumps(plant(spec)))
    elif spec["action"] == "fill":
        fill(spec)
    else:
        raise SystemExit(f"unknown action {spec['action']}")


# -- test side ------------------------------------------------------------------------------


def boot_env(d: Deployment) -> dict[str, str]:
    return {**d.site.env(), "PYTHONPATH": str(REPO)}


def run_client(d: Deployment, posts: list[dict[str, Any]], wall: float = 120) -> list[Any]:
    """Send `posts` from the client namespace (see client_main); their answers."""
    proc = d.lab.client.run(
        [str(d.site.python), "-c", CLIENT_BOOT],
        input=json.dumps({"posts": posts}),
        timeout=wall,
        env=boot_env(d),
    )
    answers: list[Any] = json.loads(proc.stdout)["answers"]
    return answers


def run_web_user(d: Deployment, spec: dict[str, Any], wall: float = 120) -> dict[str, Any]:
    """Run web_user_main as www-data in the server namespace."""
    proc = d.lab.server.run(
        [*WEB_USER, str(d.site.python), "-c", WEB_BOOT],
        input=json.dumps({"spool": str(d.site.spool), **spec}) + "\n",
        timeout=wall,
        env=boot_env(d),
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def b64(body: bytes) -> str:
    return base64.b64encode(body).decode()


def form(packet: bytes) -> dict[str, str]:
    """A post of `packet` in the ``data`` field, for client_main."""
    return {"body": b64(b"data=" + transport.encode_field(packet).encode())}


def sealed_knock(keys: v1.Keys, ip: str, seconds: int = 600) -> dict[str, Any]:
    """A post client_main seals at sending time: an openports for tcp/22."""
    request = json.loads(messages.openports_request(ip, [("tcp", 22)], seconds, 0))
    request["ts"] = None  # client_main fills in the time of sending and a fresh nonce
    return {"seal": {"keys": keys.to_hex(), "request": request}}


def wrong_keys_packet(ip: str) -> bytes:
    """Well-formed, of the right length, not sealed with the site's keys."""
    return v1.encode(v1.Keys.generate(), messages.openports_request(ip, [("tcp", 22)], 60, 0))


def grant_rules(d: Deployment) -> list[str]:
    return [r for r in d.iptables_rules(4) + d.iptables_rules(6) if "GRANTS -s" in r]


def daemon_log(d: Deployment, offset: int = 0) -> str:
    return d.site.daemon_log.read_bytes()[offset:].decode(errors="replace")


#: Log lines of grant events (the knocks the tests make on purpose).
_GRANT_EVENT = re.compile(r' INFO (open|renew) \S+ |"event":')


def quiet_lines(text: str) -> list[str]:
    """The daemon's lines at INFO and above that are not grant events (the lab runs it with
    -v: its DEBUG lines are for the admin who asks)."""
    return [
        ln
        for ln in text.splitlines()
        if " DEBUG " not in ln and not _GRANT_EVENT.search(ln) and ln.strip()
    ]


def snapshot(path: Path) -> tuple[str, int, int, int, int]:
    """Digest (never the content: /etc/shadow is among them), mode, owner, mtime."""
    st = os.lstat(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def spool_entries(d: Deployment, sub: str) -> list[str]:
    return sorted(os.listdir(d.site.spool / sub))


def use_keys(d: Deployment, keys: v1.Keys) -> None:
    """Give the site `keys` (0600 root:root, as the installer writes them) and restart
    webknockd with them."""
    from webknock.keys import format_keys

    d.site.stop_daemon()
    d.site.keys_file.write_text(format_keys(keys))
    os.chown(d.site.keys_file, 0, 0)
    os.chmod(d.site.keys_file, 0o600)
    d.site.keys = keys
    d.site.start_daemon(d.lab.server)


# -- the original client's packets -----------------------------------------------------------


def test_php_client_packets_work_over_ipv4_and_ipv6(
    site: Deployment, vectors: dict[str, Any], vector_keys: v1.Keys
) -> None:
    d = site
    use_keys(d, vector_keys)
    st = os.stat(d.site.keys_file)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)
    denied = d.lab.server.run([*WEB_USER, "cat", str(d.site.keys_file)], check=False)
    assert denied.returncode != 0 and "Permission denied" in denied.stderr

    cases = vectors["cases"]
    getinfo, openports = (json.loads(cases[i]["plaintext"]) for i in (0, 1))
    # Compact JSON in the original's key order reproduces the vectors byte for byte.
    assert messages.dumps(getinfo).decode() == cases[0]["plaintext"]
    assert messages.dumps(openports).decode() == cases[1]["plaintext"]
    keys = vector_keys.to_hex()

    def php(template: dict[str, Any], **values: Any) -> dict[str, Any]:
        request = {**template, **values, "ts": None}  # keys keep the template's order
        assert list(request) == list(template)
        return {"seal": {"keys": keys, "request": request}}

    tcp22 = [{"proto": "TCP", "num": 22}]
    answers = run_client(
        d,
        [
            # Without a nonce two getinfo of the same second are one request: a second apart.
            {"src": CLIENT4, **php(getinfo)},
            {"src": CLIENT4, **php(openports, ip=CLIENT4, ports=tcp22, time=600), "pause": 1.1},
            {"src": CLIENT6, **php(getinfo)},
            {"src": CLIENT6, **php(openports, ip=CLIENT6, ports=tcp22, time=600)},
            # The vector itself: opened with the same keys, refused for its 2025 timestamp.
            {"src": CLIENT4, "body": b64(b"data=" + cases[1]["post_data"].encode())},
        ],
    )
    now = time.time()
    assert [a["status"] for a in answers] == [200, 200, 200, 200, 403], answers
    assert "clock skew" in answers[4]["note"]
    replies = [v1.decode(vector_keys, base64.b64decode(a["body"])) for a in answers[:4]]
    # The reply to CLIENT6's getinfo is the vectors' getinfo reply, byte for byte.
    assert replies[2].decode() == cases[2]["plaintext"]
    info4 = json.loads(replies[0])
    assert info4 == {**json.loads(cases[2]["plaintext"]), "ip": CLIENT4}
    assert list(info4) == list(json.loads(cases[2]["plaintext"]))
    for raw in (replies[1], replies[3]):
        granted = json.loads(raw)
        assert list(granted) == list(json.loads(cases[3]["plaintext"]))  # success, expires
        assert granted["success"] is True and abs(granted["expires"] - (now + 600)) < 10

    a = d.agent
    assert a.tcp_open(SERVER4, CLIENT4, 22) and a.tcp_open(SERVER6, CLIENT6, 22)
    assert not a.tcp_open(SERVER4, OTHER4, 22) and not a.tcp_open(SERVER6, OTHER6, 22)
    assert not a.tcp_open(SERVER4, CLIENT4, 2222), "only the port asked for"
    got = sorted((g["ip"], g["proto"], g["port"]) for g in d.list_json())
    assert got == [(CLIENT4, "tcp", 22), (CLIENT6, "tcp", 22)]
    assert sorted(grant_rules(d)) == sorted(
        [
            "-A WEBKNOCK-GRANTS -s 192.0.2.10/32 -p tcp -m tcp --dport 22 -j ACCEPT",
            "-A WEBKNOCK-GRANTS -s 2001:db8::10/128 -p tcp -m tcp --dport 22 -j ACCEPT",
        ]
    )


# -- the web user forges requests -------------------------------------------------------------


def frame(packet: bytes, remote: str, *, field: str = "v1", forwarded: str = "") -> str:
    """A spool frame as the CGI writes it, as hex for web_user_main."""
    return wkspool.encode_request(field, remote, forwarded, "forged", packet).hex()


def forged_requests(d: Deployment, canary: Path) -> list[dict[str, Any]]:
    """Every shape the web user can put into the spool, with the answers its doorbells may
    get (`expect`; "none": no answer at all)."""
    junk = os.urandom(512)
    now = int(time.time())
    unsealed = messages.openports_request("198.51.100.7", [("tcp", 22)], 600, now)
    unsealed = unsealed.ljust(512, b"\0")
    stale = v1.encode(
        d.site.keys, messages.openports_request(OTHER4, [("tcp", 22)], 60, now - 3600)
    )
    elsewhere = v1.encode(d.site.keys, messages.openports_request(CLIENT6, [("tcp", 22)], 60, now))
    v2_packet = transport.V2_REQUEST_MAGIC + os.urandom(transport.V2_HEAD - 4 + 100)
    good_head = wkspool.encode_request("v1", CLIENT4, "", "forged", b"")
    old_json = json.dumps(
        {"v": 1, "ip": CLIENT4, "ports": [["tcp", 22]], "time": 600, "received": now, "ua": ""}
    ).encode()
    shadow, keys = "/etc/shadow", str(d.site.keys_file)

    def req(label: str, expect: set[str], **item: Any) -> dict[str, Any]:
        base = {"label": label, "dir": "requests", "name": "{id}.req", "kind": "file"}
        return {**base, "bell": "fifo", "expect": sorted(expect), **item}

    def raw(label: str, data: bytes) -> dict[str, Any]:
        return req(label, {"400"}, hex=data.hex())

    def odd(label: str, dirname: str, name: str, **item: Any) -> dict[str, Any]:
        return {"label": label, "dir": dirname, "name": name, "expect": [], **item}

    bad = {"403", "429"}
    return [
        # Frames the daemon must verify, and refuse.
        req("junk packet, remote=client", bad, count=25, hex=frame(junk, CLIENT4)),
        req("unsealed JSON", bad, hex=frame(unsealed, "198.51.100.7")),
        req("other keys", bad, hex=frame(wrong_keys_packet("203.0.113.9"), "203.0.113.9")),
        req("captured, stale", {"403"}, hex=frame(stale, OTHER4)),
        req("captured, remote=another", {"403"}, hex=frame(elsewhere, OTHER6)),
        req("remote=0.0.0.0", bad, hex=frame(junk, "0.0.0.0")),
        req("remote=broadcast", bad, hex=frame(junk, "255.255.255.255")),
        req("remote=::", bad, hex=frame(junk, "::")),
        req("remote=multicast", bad, hex=frame(junk, "ff02::1")),
        req("remote=loopback", bad, hex=frame(junk, "127.0.0.1")),
        req("remote=mapped", bad, hex=frame(junk, "::ffff:198.51.100.77")),
        req("remote=scoped", bad | {"500"}, hex=frame(junk, "fe80::1%eth0")),
        req("remote=empty", {"500"}, hex=frame(junk, "")),
        req("remote=name", {"500"}, hex=frame(junk, "not-an-address")),
        req("forwarded", bad, hex=frame(junk, SERVER4, forwarded=f"{CLIENT6}, {CLIENT4}")),
        req("v2 frame", bad, hex=frame(v2_packet, "2001:db8:1::5", field="v2")),
        # Frames the daemon must not even verify.
        raw("frame version 1", good_head.replace(b"spool 2", b"spool 1") + junk),
        raw("frame version 3", good_head.replace(b"spool 2", b"spool 3") + junk),
        raw("old JSON request", old_json),
        raw("headers reordered", spool_layout.MAGIC + b"remote=192.0.2.10\nfield=v1\n" + junk),
        raw("header NUL", good_head.replace(b"forged", b"for\0ged") + junk),
        raw("no empty line", good_head[:-1] + junk),
        raw("field v3", good_head.replace(b"field=v1", b"field=v3") + junk),
        raw("packet 100 bytes", good_head + junk[:100]),
        raw("frame too big", good_head + junk * 12),
        raw("empty file", b""),
        req("huge file", {"400"}, fill=2 * MiB),
        req("sparse 1 TiB", {"400"}, sparse=1 << 40),
        req("symlink to shadow", {"400"}, kind="symlink", target=shadow),
        req("symlink to keys", {"400"}, kind="symlink", target=keys),
        req("symlink to canary", {"400"}, kind="symlink", target=str(canary)),
        req("dangling symlink", {"400"}, kind="symlink", target="/nonexistent"),
        req("fifo", {"400"}, kind="fifo"),
        req("socket", {"400"}, kind="socket"),
        req("hard link", {"400"}, kind="hardlink", hex=frame(junk, "198.51.100.8")),
        req("dir 0500 with a file", {"400", "none"}, kind="dir"),
        # The daemon answers into something else than the web user's own doorbell.
        req(
            "bell hard-linked",
            {"empty", "none"},
            bell="hardlinked",
            hex=frame(junk, "198.51.100.9"),
        ),
        req("bell regular file", set(), bell="file", hex=frame(junk, "198.51.100.10")),
        req(
            "bell symlink to canary",
            set(),
            bell="symlink",
            bell_target=str(canary),
            hex=frame(junk, "198.51.100.11"),
        ),
        req(
            "bell symlink to shadow",
            set(),
            bell="symlink",
            bell_target=shadow,
            hex=frame(junk, "198.51.100.12"),
        ),
        req("bell dir", set(), bell="dir", hex=frame(junk, "198.51.100.13")),
        # Names and kinds of nothing the CGI makes, in both directories.
        odd("name x.req", "requests", "x{n}.req", kind="file", hex=frame(junk, CLIENT4)),
        odd("name upper", "requests", "{id}.REQ", kind="file", hex=frame(junk, CLIENT4)),
        odd("name id only", "requests", "{id}", kind="file", hex=frame(junk, CLIENT4)),
        odd("name newline", "requests", "a\n{id}.req", kind="file", hex="00"),
        odd("name long", "requests", "L" * 250 + "{n}", kind="file", hex="00"),
        odd("temp dir", "requests", ".{id}.tmp", kind="dir"),
        odd("waits file", "waits", "{id}", kind="file", hex="00"),
        odd("waits fifo name", "waits", "bell-{n}", kind="fifo"),
        odd("waits symlink", "waits", "{id}", kind="symlink", target=shadow),
        odd("waits dir", "waits", "d{n}", kind="dir"),
        odd("waits socket", "waits", "s{n}", kind="socket"),
        # Directories the web user must not reach at all, files it cannot link in.
        odd("in claimed/", "claimed", "{id}.req", kind="attempt", fails=["EACCES"]),
        odd("in rejected/", "rejected", "x", kind="attempt", fails=["EACCES"]),
        odd("in the spool root", ".", "x", kind="attempt", fails=["EACCES"]),
        odd(
            "link to shadow",
            "requests",
            "{id}.req",
            kind="link_from",
            target=shadow,
            fails=["EXDEV"],
        ),
        odd("link to keys", "requests", "{id}.req", kind="link_from", target=keys, fails=["EXDEV"]),
    ]


def test_web_user_forgeries_open_nothing(site: Deployment) -> None:
    d = site
    canary = d.site.root / "canary"
    canary.write_bytes(b"canary\n")
    os.chmod(canary, 0o666)  # root's, writable by anyone: a write through a link would land
    watched = [canary, d.site.keys_file, d.site.config, Path("/etc/shadow")]
    before = {p: snapshot(p) for p in watched}
    rules = (d.iptables_rules(4), d.iptables_rules(6))
    plants = forged_requests(d, canary)
    offset = d.site.daemon_log.stat().st_size

    result = run_web_user(d, {"action": "plant", "plants": plants, "wait": 8})
    print(json.dumps(result))
    for item in plants:
        got = result[item["label"]]
        count = item.get("count", 1)
        if "fails" in item:
            assert set(got["made"]) <= set(item["fails"]), (item["label"], got)
            continue
        assert got["made"] == {"ok": count}, (item["label"], got)
        if item.get("bell") in ("fifo", "hardlinked"):
            assert sum(got["answers"].values()) == count, (item["label"], got)
            assert set(got["answers"]) <= set(item["expect"]), (item["label"], got)
    assert result["junk packet, remote=client"]["answers"] == {"403": 20, "429": 5}
    assert result["bell regular file"]["sizes"] == [0], "nothing written into a plain file"

    assert d.site.daemon is not None and d.site.daemon.poll() is None, "webknockd survives"
    assert d.list_json() == []
    assert (d.iptables_rules(4), d.iptables_rules(6)) == rules
    assert {p: snapshot(p) for p in watched} == before, "nothing written through a link"

    # Housekeeping takes away whatever the daemon did not claim: one round at most.
    def left() -> dict[str, list[str]]:
        return {s: e for s in ("requests", "claimed", "waits") if (e := spool_entries(d, s))}

    assert wait_until(lambda: not left(), ROUND + 2), left()
    for name in spool_entries(d, "rejected"):  # kept for the admin: small regular files only
        st = os.lstat(d.site.spool / "rejected" / name)
        assert stat.S_ISREG(st.st_mode) and st.st_size <= spool_layout.MAX_REQUEST_BYTES, name
    log = daemon_log(d, offset)
    assert "Traceback" not in log and "unexpected error" not in log, log[-3000:]

    # Forged junk in CLIENT4's name throttles CLIENT4's bad packets, never its valid knock.
    bad, good = run_client(
        d,
        [
            {"src": CLIENT4, **form(wrong_keys_packet(CLIENT4))},
            {"src": CLIENT4, **sealed_knock(d.site.keys, CLIENT4)},
        ],
    )
    assert (bad["status"], good["status"]) == (429, 200)
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22)
    assert [g["ip"] for g in d.list_json()] == [CLIENT4]


# -- planted entries: a quiet log --------------------------------------------------------------


def planted_flood(d: Deployment) -> list[dict[str, Any]]:
    """Over 4 000 entries of what housekeeping removes, and one it cannot (a tree deeper
    than it walks)."""
    junk = b"junk".hex()
    day = 86400

    def p(
        label: str, dirname: str, name: str, kind: str, count: int = 1, **kw: Any
    ) -> dict[str, Any]:
        return {"label": label, "dir": dirname, "name": name, "kind": kind, "count": count, **kw}

    return [
        p("unexpected names", "requests", "junk-{n}", "file", 1500, hex=junk),
        p("malformed requests", "requests", "{id}.req", "file", 500, hex=junk),
        p("abandoned temp files", "requests", ".{id}.tmp", "file", 200, hex=junk, mtime=-300),
        p("temp files from the future", "requests", ".{id}.tmp", "file", 200, hex=junk, mtime=day),
        p("future junk", "requests", "future-{n}", "file", 50, hex=junk, mtime=10 * day),
        p("fifos", "requests", "fifo-{n}", "fifo", 300),
        p("symlinks", "requests", "link-{n}", "symlink", 300, target="/etc/shadow"),
        p("0500 dirs", "requests", "dir-{n}", "dir", 40),
        p("0500 dirs named as requests", "requests", "{id}.req", "dir", 10),
        p("1 TiB sparse", "requests", "sparse-1t", "file", sparse=1 << 40),
        p("1 TiB sparse request", "requests", "{id}.req", "file", sparse=1 << 40),
        p("too deep", "requests", "deep-tree", "dir", depth=70),
        p("bells of bad names", "waits", "bell-{n}", "fifo", 500),
        p("files named as bells", "waits", "{id}", "file", 300, hex=junk),
        p("bells from the future", "waits", "{id}", "fifo", 200, mtime=day),
        p("abandoned bells", "waits", "{id}", "fifo", 100, mtime=-1000),
        p("0500 dirs in waits", "waits", "dir-{n}", "dir", 10),
    ]


def test_planted_flood_keeps_the_log_quiet_and_knocks_working(site: Deployment) -> None:
    d = site
    offset = d.site.daemon_log.stat().st_size
    knocks: list[Any] = []

    def knock_during_flood() -> None:
        # One a second for longer than a housekeeping round: some come while it prunes.
        posts = [{"src": CLIENT4, "pause": 1.0, **sealed_knock(d.site.keys, CLIENT4)}] * 12
        knocks.extend(run_client(d, posts))

    knocker = threading.Thread(target=knock_during_flood)
    knocker.start()
    try:
        time.sleep(0.5)
        plants = planted_flood(d)
        result = run_web_user(d, {"action": "plant", "plants": plants, "wait": 0})
        planted = time.monotonic()
    finally:
        knocker.join(120)
    print(json.dumps(result), [(k["status"], round(k["seconds"], 3)) for k in knocks])
    for item in plants:
        assert result[item["label"]]["made"] == {"ok": item["count"]}, item["label"]
    assert sum(item["count"] for item in plants) > 4000
    assert [k["status"] for k in knocks] == [200] * 12, knocks
    assert max(k["seconds"] for k in knocks) < 5, "valid knocks are not held up"

    # One housekeeping round after planting says all there is to say ...
    time.sleep(max(0.0, planted + ROUND - time.monotonic()))
    first = quiet_lines(daemon_log(d, offset))
    # ... and the next one says nothing: no line per entry, per tick or per round.
    time.sleep(ROUND)
    second = quiet_lines(daemon_log(d, offset))
    print("\n".join(second))
    assert second == first, "new log lines after the planted entries were dealt with"
    assert len(first) <= 8, "a handful of summary lines"
    stuck = [ln for ln in first if "cannot remove" in ln]
    assert len(stuck) == 1 and "deep-tree" in stuck[0], stuck
    assert any(re.search(r"removed \d+ unexpected spool entr", ln) for ln in first), first
    assert any(re.search(r"refused \d+ malformed spool file", ln) for ln in first), first

    assert spool_entries(d, "requests") == ["deep-tree"], "all the rest is gone"
    assert spool_entries(d, "waits") == [] and spool_entries(d, "claimed") == []
    assert len(spool_entries(d, "rejected")) <= 1000  # KEEP_REJECTED, for the admin
    assert d.site.daemon is not None and d.site.daemon.poll() is None
    assert d.agent.knock(SERVER4, CLIENT4, [("tcp", 22)])["status"] == 200


def test_unremovable_request_is_logged_once(site: Deployment) -> None:
    d = site
    offset = d.site.daemon_log.stat().st_size
    plants = [{"label": "deep", "dir": "requests", "name": "{id}.req", "kind": "dir", "depth": 70}]
    assert run_web_user(d, {"action": "plant", "plants": plants, "wait": 0})["deep"]["made"] == {
        "ok": 1
    }
    planted = time.monotonic()
    time.sleep(max(0.0, planted + ROUND - time.monotonic()))
    first = quiet_lines(daemon_log(d, offset))
    time.sleep(ROUND)
    second = quiet_lines(daemon_log(d, offset))
    print("\n".join(second))
    assert second == first, "an entry that cannot be removed is logged once"


# -- throttle and replay -----------------------------------------------------------------------


def test_bad_packets_are_throttled_but_a_valid_knock_is_not(site: Deployment) -> None:
    d = site
    limit = 20  # throttle_failures (the default, set explicitly)
    d.site.write_config(
        {**d.site.settings, "throttle_failures": str(limit), "throttle_window": "60"}
    )
    d.site.stop_daemon()
    d.site.start_daemon(d.lab.server)
    offset = d.site.daemon_log.stat().st_size
    cheap = [b"data=" + b"!" * 683, b"data=" + b"A" * 100, b"data=" + b"A" * 684]
    posts = [
        *({"src": CLIENT4, "body": b64(cheap[i % 3])} for i in range(30)),
        *({"src": CLIENT4, **form(wrong_keys_packet(CLIENT4))} for _ in range(25)),
        {"src": CLIENT4, **sealed_knock(d.site.keys, CLIENT4)},
        {"src": CLIENT4, **form(wrong_keys_packet(CLIENT4))},
        {"src": OTHER4, **form(wrong_keys_packet(OTHER4))},
        *({"src": CLIENT6, **form(wrong_keys_packet(CLIENT6))} for _ in range(limit)),
        {"src": OTHER6, **form(wrong_keys_packet(OTHER6))},
        {"src": OTHER6, **sealed_knock(d.site.keys, OTHER6)},
    ]
    statuses = [a["status"] for a in run_client(d, posts)]
    # Refused by the CGI (Base64, length): never counted.
    assert statuses[:30] == [403] * 30
    # 25 bad packets: the first `limit` refused, the rest throttled; then a valid knock gets in.
    assert statuses[30:56] == [403] * limit + [429] * (25 - limit) + [200]
    assert statuses[56:58] == [429, 403], "still throttled; another /32 is not"
    # IPv6 is counted per /64: CLIENT6's bad packets throttle OTHER6's, not its valid knock.
    assert statuses[58:] == [403] * limit + [429, 200]
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22) and d.agent.tcp_open(SERVER6, OTHER6, 22)
    assert sorted(g["ip"] for g in d.list_json()) == [CLIENT4, OTHER6]

    from webknock.server.state import StateStore

    counts = {p: c for p, c, _ in StateStore(d.site.state).read().load_failures(0)}
    assert counts == {"192.0.2.10/32": limit + 1, "192.0.2.20/32": 1, "2001:db8::/64": limit + 1}
    refused = [ln for ln in quiet_lines(daemon_log(d, offset)) if " refused " in ln]
    assert len(refused) == 2 * limit + 1, "no log line per throttled packet"


def test_copied_packet_from_another_address_does_not_burn_it(site: Deployment) -> None:
    d = site
    packet = v1.encode(
        d.site.keys, messages.openports_request(CLIENT4, [("tcp", 22)], 600, int(time.time()))
    )
    copy = form(packet)
    answers = run_client(
        d,
        [
            {"src": OTHER4, **copy},
            {"src": CLIENT4, **copy},
            {"src": CLIENT4, **copy},
            {"src": OTHER4, **copy},
        ],
    )
    assert [a["status"] for a in answers] == [403, 200, 403, 403], answers
    assert "address mismatch" in answers[0]["note"]
    reply = json.loads(v1.decode(d.site.keys, base64.b64decode(answers[1]["body"])))
    assert reply["success"] is True
    (grant,) = d.list_json()
    assert (grant["ip"], grant["port"], grant["renew_count"]) == (CLIENT4, 22, 0)
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22) and not d.agent.tcp_open(SERVER4, OTHER4, 22)


# -- a full spool ------------------------------------------------------------------------------


@contextlib.contextmanager
def filling(d: Deployment, path: Path, size: int) -> Iterator[dict[str, Any]]:
    """The web user writes `size` bytes into `path` and holds the file open until the end
    of the block; yields what it reported."""
    with subprocess.Popen(
        d.lab.server.cmd([*WEB_USER, str(d.site.python), "-c", WEB_BOOT]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=boot_env(d),
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            spec = {"action": "fill", "path": str(path), "bytes": size}
            proc.stdin.write(json.dumps(spec) + "\n")
            proc.stdin.flush()
            yield json.loads(proc.stdout.readline())
            proc.stdin.write("\n")
            proc.stdin.flush()
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_web_user_cannot_fill_more_than_the_spool(site: Deployment) -> None:
    d = site
    spool, runtime = d.site.spool, d.site.spool.parent
    assert os.stat(spool).st_dev != os.stat(runtime).st_dev, "the spool is a mount of its own"
    vfs = os.statvfs(spool)
    assert vfs.f_blocks * vfs.f_frsize == 16 * MiB and vfs.f_files == 16384
    target = spool / "requests" / "fill"
    with filling(d, target, 32 * MiB) as wrote:
        print(wrote)
        assert wrote["error"] == "ENOSPC" and wrote["free"] == 0
        assert 15 * MiB < wrote["written"] <= 16 * MiB
        # Nothing left for a request: the CGI says so, nothing is applied.
        full = d.agent.knock(SERVER4, CLIENT4, [("tcp", 22)])
        assert full["status"] == 503, full
        assert d.list_json() == []
    assert wait_until(lambda: not target.exists(), ROUND + 2), "housekeeping removes it"
    assert os.statvfs(spool).f_bfree * vfs.f_frsize > 15 * MiB
    assert d.site.daemon is not None and d.site.daemon.poll() is None
    r = d.agent.knock(SERVER4, CLIENT4, [("tcp", 22)])
    assert r["status"] == 200 and r["reply"]["success"] is True
    assert d.agent.tcp_open(SERVER4, CLIENT4, 22)
    cgi_log = (d.web.dir / "fcgiwrap.log").read_text(errors="replace")
    assert "503: spool unavailable" in cgi_log
