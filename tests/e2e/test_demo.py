"""The demo (tests/lab/demo.py, what ./demo runs after its apt/venv bootstrap) end to end.

CI fails here if the protected port does not go refused -> open -> refused (revoke) ->
open -> refused (expiry), and if an interrupted demo leaves a namespace behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading

import pytest

from tests.lab import REPO, delete_namespace, shared_venv

pytestmark = pytest.mark.e2e

CONNECT = re.compile(
    r"^\s*\d+\. connect to \S+ from the client \(\S+\) \.\.\. (open|refused)", re.M
)
NAMESPACE = re.compile(r"^\s+(?:server|client) (wk\S+):", re.M)


def demo(*args: str) -> list[str]:
    return [str(shared_venv() / "bin" / "python3"), "-m", "tests.lab.demo", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "WEBKNOCK_VENV": str(shared_venv())}


def namespaces() -> str:
    return subprocess.run(
        ["ip", "netns", "list"], capture_output=True, text=True, check=True
    ).stdout


@pytest.mark.parametrize(
    ("web_server", "backend"),
    [("nginx", "iptables"), ("apache", "iptables"), ("nginx", "nftables")],
)
def test_demo_goes_from_refused_to_open_and_back(web_server: str, backend: str) -> None:
    proc = subprocess.run(
        demo("--web-server", web_server, "--backend", backend, "--expiry", "3"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert CONNECT.findall(proc.stdout) == ["refused", "open", "refused", "open", "refused"], out
    for needle in ("knock", "webknockctl list", "192.0.2.10  tcp    22", "revoked", "removed at"):
        assert needle in proc.stdout, out
    shown = "192.0.2.10 . 22" if backend == "nftables" else "-s 192.0.2.10/32 -p tcp"
    assert shown in proc.stdout, f"the grant in the server's firewall\n{out}"
    assert proc.stdout.rstrip().splitlines()[-1].startswith("demo OK"), out
    names = NAMESPACE.findall(proc.stdout)
    assert len(names) == 2 and not any(n in namespaces() for n in names)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_demo_cleans_up(sig: signal.Signals) -> None:
    proc = subprocess.Popen(
        demo("--expiry", "60"),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    watchdog = threading.Timer(240, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # until the knock opened the port: lab, daemon, grant all live
            lines.append(line)
            if re.match(r"^\s*3\. connect .* open", line):
                break
        names = NAMESPACE.findall("".join(lines))
        assert len(names) == 2, "".join(lines)
        assert all(n in namespaces() for n in names)
        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=120)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if proc.returncode == -signal.SIGKILL:  # killed here: the demo cleaned up nothing
            for name in NAMESPACE.findall("".join(lines)):
                if name in namespaces():
                    delete_namespace(name)
    out = "".join(lines) + rest
    assert proc.returncode == 128 + sig, out
    assert f"demo interrupted ({sig.name})" in out, out
    assert not any(n in namespaces() for n in names), f"{names} left behind\n{out}"
