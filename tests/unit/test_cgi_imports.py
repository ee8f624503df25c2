"""What one CGI request costs in imports and processes: junk is refused before config or
crypto is loaded, a valid request loads only what it uses, and nothing spawns a process."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO, write_instance
from webknock.config import load
from webknock.protocol import messages, transport, v1
from webknock.spooldirs import prepare_spool

#: Runs the CGI in a fresh interpreter and reports the modules it ended with and every
#: process it tried to start (audit hooks see fork/exec/spawn without importing anything).
PROBE = """
import os, sys
spawned = []
order = []  # our modules' imports, the replay mark and the renames, in their order
def hook(event, args):
    if event == "import" and args[0].startswith("webknock."):
        order.append("import " + args[0])
    elif event == "open" and isinstance(args[0], str) and "/seen/r-" in args[0]:
        order.append("mark")
    elif event == "os.rename":
        order.append("rename " + os.path.basename(args[1]))
    elif event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.exec", "os.system"):
        import traceback
        spawned.append(event + ": " + "".join(traceback.format_stack(limit=12)))
sys.addaudithook(hook)
from webknock.cgi import main
main(detach=False)  # the web server's CGI ends in main(); the probe reports after it
modules = sorted(sys.modules)
import json
with open(os.environ["PROBE_REPORT"], "w") as fh:
    json.dump({"modules": modules, "spawned": spawned, "order": order}, fh)
"""

#: Never on any CGI path: the client's HTTP library, CLI parsing, logging setup, and the
#: daemon's side of the spool (it validates what the CGI wrote, the CGI need not load it).
NEVER = {
    "requests",
    "urllib3",
    "argparse",
    "logging",
    "sqlite3",
    "filelock",
    "webknock.spool_reader",
    "webknock.grants",  # records of the daemon's (dataclasses, ~1 ms each to build)
    "webknock.state",
    "webknock.engine",
    "inotify_simple",  # the CGI waits on its doorbell, which needs no library
    "termios",
}
#: Not before a request passed the cheap screen (method, length, shape of `data`).
HEAVY = {
    "Crypto",
    "configparser",
    "webknock.config",
    "webknock.keys",
    "webknock.spool",  # replay marks and throttle counters
    "json",
    "hmac",
}
#: Only when a request is spooled, and nothing else: the way back.
SPOOL = {"webknock.doorbell"}


@pytest.fixture
def instance(tmp_path: Path, vector_keys: v1.Keys) -> Path:
    config = write_instance(tmp_path, vector_keys, result_timeout="1")
    prepare_spool(load(config).spool, pwd.getpwnam("www-data").pw_gid)
    return config


def probe(tmp_path: Path, config: Path, body: bytes, method: str = "POST") -> dict[str, Any]:
    report = tmp_path / "report.json"
    env = {
        "PATH": "/usr/bin:/bin",
        "REQUEST_METHOD": method,
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "192.0.2.10",
        "WEBKNOCK_CONFIG": str(config),
        "PYTHONPATH": str(REPO),
        "PROBE_REPORT": str(report),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
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


def sealed(keys: v1.Keys, data: bytes) -> bytes:
    return b"data=" + transport.encode_field(v1.encode(keys, data)).encode()


@pytest.mark.parametrize(
    ("method", "body", "status"),
    [
        ("GET", b"", 400),
        ("POST", b"x=1", 400),
        ("POST", b"data=" + b"!" * 683, 403),
        ("POST", b"data=" + b"A" * 100, 403),  # base64, but not a multiple of 512 bytes
    ],
)
def test_junk_is_refused_before_config_or_crypto(
    tmp_path: Path, instance: Path, method: str, body: bytes, status: int
) -> None:
    got = probe(tmp_path, instance, body, method)
    assert got["status"] == status
    assert top_level(got["modules"]) & (NEVER | HEAVY | SPOOL) == set()
    assert got["spawned"] == []


def test_a_throttled_address_is_refused_before_keys_crypto_or_json(
    tmp_path: Path, instance: Path
) -> None:
    cfg = load(instance)
    counter = cfg.spool.seen / "f-192.0.2.10"  # the peer's count of bad packets: at the limit
    with open(counter, "wb") as fh:
        fh.truncate(cfg.throttle_failures)
    got = probe(tmp_path, instance, b"data=" + b"A" * 683)  # 512 bytes: passes the screen
    assert got["status"] == 429
    loaded = top_level(got["modules"])
    assert loaded & {"Crypto", "json", "hmac", "webknock.keys", "webknock.doorbell"} == set()
    assert "webknock.spool" in loaded  # where the counter is read
    assert got["spawned"] == []


def test_getinfo_loads_crypto_but_not_the_way_back(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    got = probe(tmp_path, instance, sealed(vector_keys, messages.getinfo_request(int(time.time()))))
    assert got["status"] == 200
    modules = top_level(got["modules"])
    assert {"Crypto", "webknock.config", "webknock.keys", "webknock.spool"} <= modules
    assert modules & (NEVER | SPOOL) == set()
    assert got["spawned"] == [], "pycryptodome's loader must not run `file` per request"


def test_openports_adds_only_the_way_back(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    data = messages.openports_request("192.0.2.10", [("tcp", 22)], 60, int(time.time()))
    got = probe(tmp_path, instance, sealed(vector_keys, data))
    assert got["status"] == 504  # no daemon in this test: the whole wait path ran
    modules = top_level(got["modules"])
    info = probe(
        tmp_path, instance, sealed(vector_keys, messages.getinfo_request(int(time.time())))
    )
    assert info["status"] == 200
    assert modules - top_level(info["modules"]) == SPOOL, "each import costs every knock"
    assert modules & NEVER == set()
    assert got["spawned"] == []


def test_the_way_back_loads_while_the_daemon_works(
    tmp_path: Path, instance: Path, vector_keys: v1.Keys
) -> None:
    """Between the replay mark and its request the CGI loads nothing (the request's way in
    is the module that made the mark); the doorbell's module loads after the request is
    written, while webknockd works on it."""
    data = messages.openports_request("192.0.2.10", [("tcp", 22)], 60, int(time.time()))
    got = probe(tmp_path, instance, sealed(vector_keys, data))
    assert got["status"] == 504
    order = got["order"]
    written = [i for i, e in enumerate(order) if e.startswith("rename ") and e.endswith(".req")]
    assert len(written) == 1 and order.count("mark") == 1, order
    mark = order.index("mark")
    assert order.index("import webknock.spool") < mark < written[0], order
    assert order[mark + 1 : written[0]] == [], "no module loads between the mark and the request"
    assert order[written[0] + 1 :] == ["import webknock.doorbell"], "the way back, nothing else"


def test_installed_layout_is_byte_compiled(tmp_path: Path) -> None:
    """The web user cannot write __pycache__: the installer compiles every module."""
    install = (REPO / "install.sh").read_text()
    assert "compileall" in install
    assert os.access(REPO / "cgi-bin" / "webknock.cgi", os.X_OK)


def test_web_server_gets_end_of_file_and_the_process_ends_with_the_answer(
    tmp_path: Path,
) -> None:
    """After the answer, stdout and stderr are flushed and hung up and the process ends:
    nothing after main() runs (no interpreter teardown either; here a write and a sleep
    that never happen)."""
    code = (
        "import os, time\n"
        "from webknock.cgi import main\n"
        "main()\n"
        "os.write(1, b'late')\n"
        "time.sleep(3)\n"
    )
    env = {"PATH": "/usr/bin:/bin", "REQUEST_METHOD": "GET", "PYTHONPATH": str(REPO)}
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
