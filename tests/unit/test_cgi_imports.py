"""What one CGI request costs in imports and processes. The CGI frames and relays: on no
path does it load crypto, a config parser, JSON, regular expressions, address parsing or
typing, junk is refused before it even reads the config, and nothing spawns a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.cgi_side import WEB, getinfo_packet, openports_packet
from tests.conftest import REPO, write_instance
from tests.unit.test_cgi import PlayDaemon, answers, v2_form
from webknock.config import SpoolPaths, load
from webknock.protocol import transport, v1
from webknock.spool.mount import prepare_spool

#: Runs the CGI in a fresh interpreter started as the shipped shim starts it (``-I -S``)
#: and reports the modules it ended with, every process it tried to start (audit hooks
#: see fork/exec/spawn without importing anything) and, in order, the imports of our
#: modules, the files it opened in the spool and its renames.
PROBE = """
import os, sys
sys.path.insert(0, os.environ["PROBE_REPO"])
spawned = []
order = []
def hook(event, args):
    if event == "import" and args[0].startswith("webknock"):
        order.append("import " + args[0])
    elif (event == "open" and isinstance(args[0], str) and "/spool/" in args[0]
            and "/webknock/spool/" not in args[0]):
        order.append("open " + os.path.basename(args[0]))
    elif event == "os.rename":
        order.append("rename " + os.path.basename(args[1]))
    elif event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec", "os.system"):
        import traceback
        spawned.append(event + ": " + "".join(traceback.format_stack(limit=12)))
sys.addaudithook(hook)
from webknock.cgi.relay import main
main(detach=False)  # the web server's CGI ends in main(); the probe reports after it
modules = sorted(sys.modules)
import json
with open(os.environ["PROBE_REPORT"], "w") as fh:
    json.dump({"modules": modules, "spawned": spawned, "order": order}, fh)
"""

#: Never on any CGI path. Crypto and keys are webknockd's (the CGI holds no secret); the
#: config is read by webknock.cgi.conf, without configparser; JSON, regular expressions,
#: address parsing, typing and dataclasses each cost milliseconds per knock; and neither
#: the daemon's side of the spool nor the client's HTTP library has any business here.
NEVER = {
    "Crypto",
    "Cryptodome",
    "hashlib",
    "_hashlib",
    "hmac",
    "configparser",
    "webknock.config",
    "webknock.ini",
    "webknock.keys",
    "webknock.protocol.v1",
    "webknock.protocol.aes",
    "webknock.protocol.messages",
    "json",
    "re",
    "ipaddress",
    "webknock.addresses",
    "typing",
    "dataclasses",
    "pathlib",
    "subprocess",
    "logging",
    "argparse",
    "sqlite3",
    "requests",
    "urllib3",
    "filelock",
    "inotify_simple",  # the CGI waits on its doorbell, which needs no library
    "termios",
    "webknock.spool.reader",
    "webknock.server.verify",
    "webknock.server.guard",
    "webknock.server.grants",
    "webknock.server.state",
    "webknock.server.engine",
    "webknock.server.daemon",
    "webknock.server.loop",
    "webknock.server.decide",
    "webknock.server.claim",
    "webknock.server.firewall",
    "webknock.ctl",
    "webknock.client",
    "webknock.install",
    "webknock.urls",
}
#: Not before a request passed the cheap screen (method, length, shape of the packet).
SPOOL = {"webknock.cgi.conf", "webknock.spool.request"}


@pytest.fixture
def instance(tmp_path: Path, vector_keys: v1.Keys) -> Path:
    config = write_instance(tmp_path, vector_keys, result_timeout="0.3")
    prepare_spool(load(config).spool, WEB.pw_gid)
    return config


def probe(
    tmp_path: Path, config: Path, body: bytes, method: str = "POST", answer: bool = True
) -> dict[str, Any]:
    """Run the CGI once under the probe; webknockd's stand-in claims what it spools and
    answers 200 (or, without `answer`, never)."""
    report = tmp_path / "report.json"
    report.unlink(missing_ok=True)
    env = {
        "PATH": "/usr/bin:/bin",
        "REQUEST_METHOD": method,
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "192.0.2.10",
        "WEBKNOCK_CONFIG": str(config),
        "PROBE_REPO": str(REPO),
        "PROBE_REPORT": str(report),
    }
    spool = SpoolPaths(tmp_path / "spool")
    reply = answers(200, body=b"sealed") if answer else (lambda _rid, _frame: None)
    with PlayDaemon(spool, reply):
        proc = subprocess.run(
            [sys.executable, "-I", "-S", "-c", PROBE],
            input=body,
            capture_output=True,
            env=env,
            timeout=30,
            check=False,
        )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(report.read_text())
    result["status"] = int(proc.stdout.split(b"\r\n", 1)[0].split()[1])
    return result


def top_level(modules: list[str]) -> set[str]:
    return set(modules) | {m.split(".")[0] for m in modules}


def v1_body(packet: bytes) -> bytes:
    return b"data=" + transport.encode_field(packet).encode()


def test_the_probe_starts_python_as_the_shim_does() -> None:
    """The shim runs ``python3 -IS``; so does the probe, where nothing of NEVER is loaded at
    start (else the checks below could neither pass nor mean anything)."""
    shebang = (REPO / "cgi-bin" / "webknock.cgi").read_text().splitlines()[0]
    assert shebang.startswith("#!") and shebang.endswith(" -IS")
    proc = subprocess.run(
        [sys.executable, "-I", "-S", "-c", "import sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    assert top_level(proc.stdout.split()) & (NEVER | SPOOL) == set()


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("PUT", b"", 400),
        ("POST", b"x=1", 400),
        ("POST", b"data=" + b"!" * 683, 403),
        ("POST", b"data=" + b"A" * 100, 403),  # base64, but not a multiple of 512 bytes
        ("POST", b"v2=" + transport.encode_field(b"WK2X" + bytes(100)).encode(), 403),
        ("POST", b"data=" + b"A" * 9000, 413),
    ],
)
def test_junk_is_refused_before_config_or_spool(
    tmp_path: Path, instance: Path, method: str, body: bytes, status: int
) -> None:
    got = probe(tmp_path, instance, body, method)
    assert got["status"] == status
    assert top_level(got["modules"]) & (NEVER | SPOOL) == set()
    assert got["spawned"] == []
    assert not [e for e in got["order"] if not e.startswith("import ")], "no spool touched"


def test_a_config_it_cannot_read_and_a_missing_spool(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    body = v1_body(getinfo_packet(vector_keys))
    got = probe(tmp_path, tmp_path / "missing.ini", body)
    assert got["status"] == 500
    assert top_level(got["modules"]) & NEVER == set() and got["spawned"] == []
    (tmp_path / "other").mkdir()
    elsewhere = write_instance(tmp_path / "other", vector_keys)
    got = probe(tmp_path, elsewhere, body)  # its spool was never made
    assert got["status"] == 503
    assert top_level(got["modules"]) & NEVER == set() and got["spawned"] == []


def paths(keys: v1.Keys) -> dict[str, bytes]:
    """The bodies of every kind of request the CGI relays."""
    return {
        "getinfo": v1_body(getinfo_packet(keys)),
        "openports": v1_body(openports_packet(keys)),
        "v2 getinfo": v2_form("getinfo")[0],
        "v2 openports": v2_form("openports")[0],
    }


def test_every_relayed_request_loads_the_same_little(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    """getinfo or openports, v1 or v2: the CGI cannot tell them apart, and pays the same."""
    loaded = {}
    for name, body in paths(vector_keys).items():
        got = probe(tmp_path, instance, body)
        assert got["status"] == 200, name
        modules = top_level(got["modules"])
        assert modules & NEVER == set(), name
        assert got["spawned"] == [], f"{name}: the CGI must not start a process"
        loaded[name] = modules
    assert all(m == loaded["getinfo"] for m in loaded.values())
    assert loaded["getinfo"].issuperset(SPOOL)


def test_no_answer_loads_nothing_more(tmp_path: Path, instance: Path, vector_keys: v1.Keys) -> None:
    answered = probe(tmp_path, instance, paths(vector_keys)["openports"])
    got = probe(tmp_path, instance, paths(vector_keys)["openports"], answer=False)
    assert got["status"] == 504  # claimed, never answered: the whole wait path ran, twice
    assert top_level(got["modules"]) == top_level(answered["modules"])
    assert got["spawned"] == []


def test_a_percent_encoded_field_loads_no_more(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    field = transport.encode_field(getinfo_packet(vector_keys)).encode()
    got = probe(tmp_path, instance, b"data=%" + f"{field[0]:02X}".encode() + field[1:])
    assert got["status"] == 200
    assert top_level(got["modules"]) & NEVER == set()


def test_everything_loads_before_the_request_is_spooled(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    """Every module the CGI needs is loaded before it touches the spool; the doorbell is
    open before the request appears (a fast daemon is never missed); once the request is
    in place the CGI only waits."""
    got = probe(tmp_path, instance, paths(vector_keys)["openports"])
    order = got["order"]
    spooled = [i for i, e in enumerate(order) if not e.startswith("import ")]
    assert [order[i].split()[0] for i in spooled] == ["open", "open", "rename"], order
    bell, temp, rename = (order[i] for i in spooled)
    rid = rename.split()[1].removesuffix(".req")
    assert bell == f"open {rid}" and temp == f"open .{rid}.tmp", order
    assert spooled == list(range(spooled[0], len(order))), "no import once the spool is touched"


def test_installed_layout_is_byte_compiled() -> None:
    """The web user cannot write __pycache__: the installer compiles every module."""
    install = (REPO / "webknock" / "install" / "venv.py").read_text()
    assert "compileall" in install  # tests/unit/test_install_server.py: run on the venv
    assert os.access(REPO / "cgi-bin" / "webknock.cgi", os.X_OK)


def test_web_server_gets_end_of_file_and_the_process_ends_with_the_answer() -> None:
    """After the answer, stdout and stderr are flushed and hung up and the process ends:
    nothing after main() runs (no interpreter teardown either; here a write and a sleep
    that never happen)."""
    code = (
        "import os, time\n"
        "from webknock.cgi.relay import main\n"
        "main()\n"
        "os.write(1, b'late')\n"
        "time.sleep(3)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "REQUEST_METHOD": "PUT", "PYTHONPATH": str(REPO)}
    t0 = time.monotonic()
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        out = proc.stdout.read()
        err = proc.stderr.read()
        assert proc.wait(10) == 0
    assert out.startswith(b"Status: 400 Bad Request\r\n") and b"late" not in out
    assert b"is not POST" in err, "the log line was flushed before the process ended"
    assert time.monotonic() - t0 < 2.5, "the process ended with its answer, before the sleep"


def test_a_get_with_the_browser_page_off_reads_only_its_setting(
    tmp_path: Path, instance: Path
) -> None:
    """A GET is the browser page's: with ``browser_page`` off it is refused after reading
    that one setting, before anything of the spool is loaded."""
    got = probe(tmp_path, instance, b"", "GET")
    assert got["status"] == 400
    assert "webknock.cgi.conf" in got["modules"] and "webknock.spool.request" not in got["modules"]
    assert top_level(got["modules"]) & NEVER == set()
    assert got["spawned"] == []
