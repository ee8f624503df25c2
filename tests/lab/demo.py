"""The webknock demo: a port goes from refused to open and back, in throwaway namespaces.

``./demo`` installs what it needs and runs this; to run it alone (as root, from the
repository root, with the venv tests/run or ./demo built):

    /var/tmp/webknock-venv/bin/python3 -m tests.lab.demo [--web-server apache]

A server namespace (nginx + fcgiwrap or Apache serving the CGI as www-data, webknockd,
an iptables INPUT policy that drops everything but HTTP) and a client namespace are
built with documentation addresses; the client connects to a protected port, knocks,
connects again, the grant is listed, revoked, granted again for a few seconds and left
to expire. Every step says what it expects; the demo exits 1 at the first step that
does not behave, 0 when all did. SIGINT/SIGTERM/SIGHUP clean up (namespaces,
processes, temp files) and exit 130/143/129.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from tests.lab import (
    CLIENT4,
    REPO,
    SERVER4,
    TCP_PORTS,
    UDP_PORTS,
    Deployment,
    LabError,
    deployment,
)
from tests.lab.client import CLIENT_SHIM, ClientHome

PORT = TCP_PORTS[0]

EXIT_OK, EXIT_FAILED, EXIT_LAB = 0, 1, 2


class Interrupted(KeyboardInterrupt):
    """A signal asked the demo to stop; unwinding runs every cleanup."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StepFailed(Exception):
    """A step did not behave as the demo says it should."""


#: The signal that asked the demo to stop, once one did.
_signalled: int | None = None


def _on_signal(signum: int, _frame: FrameType | None) -> None:
    global _signalled
    if _signalled is not None:  # already unwinding: let the cleanup finish
        print(f"\n(signal {signum} ignored: still cleaning up)", file=sys.stderr, flush=True)
        return
    _signalled = signum
    raise Interrupted(signum)


def check_signalled() -> None:
    """Raise the Interrupted a signal asked for, if its own raise was lost.

    The handler raises wherever the main thread is, and Python only prints an exception
    raised while a finalizer (``__del__``, a weakref callback) runs: the demo would go on
    with every later signal ignored. Each step and every wait checks here."""
    if _signalled is not None:
        raise Interrupted(_signalled)


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)


def clock(ts: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ts))


def client_cli_problem(client: ClientHome) -> str | None:
    """Why the real client (webknock.client.cli) cannot be used here, or None."""
    if importlib.util.find_spec("webknock.client") is None:
        return "webknock.client is not part of this source tree yet"
    argv = [str(client.python), "-c", "import webknock.client.cli"]
    proc = client.ns.run(argv, check=False, env=client.env())
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return f"importing webknock.client.cli failed: {lines[-1] if lines else proc.returncode}"
    return None


def demo_client(d: Deployment) -> ClientHome:
    """The client user's home (profiles, keys, getinfo cache) inside the site's temp dir,
    so the demo leaves nothing in /var/cache/webknock or root's home."""
    return ClientHome(d.lab.client, d.site.python, d.site.root / "client", d.site.env())


class Demo:
    """The narrated steps; each raises StepFailed when the system misbehaves."""

    def __init__(self, d: Deployment, client: ClientHome, *, use_cli: bool) -> None:
        self.d, self.client = d, client
        self.use_cli = use_cli
        self.n = 0

    def step(self, text: str) -> None:
        check_signalled()
        self.n += 1
        print(f"{self.n:2d}. {text}", end="", flush=True)

    @staticmethod
    def detail(text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            print(f"      {line}", flush=True)

    def connect(self, expect_open: bool) -> None:
        self.step(f"connect to {SERVER4}:{PORT} from the client ({CLIENT4}) ... ")
        is_open = self.d.agent.tcp_open(SERVER4, CLIENT4, PORT, timeout=1.0)
        print("open" if is_open else "refused (timed out: the firewall drops it)", flush=True)
        if is_open != expect_open:
            raise StepFailed(
                f"step {self.n}: expected the port to be {'open' if expect_open else 'refused'}"
            )

    def profile(self, seconds: int) -> Path:
        """A v1 client profile as `install.sh client` writes it, in the demo's client home."""
        ports, name = f"tcp/{PORT}", f"demo-{seconds}"
        return self.client.write_v1_profile(name, self.d, ports=ports, time=str(seconds))

    def knock(self, seconds: int) -> float:
        """Knock for tcp/PORT; return the expiry webknockd recorded."""
        if self.use_cli:
            profile = self.profile(seconds)
            self.step(f"knock: webknock --config {profile.name} knock (tcp/{PORT}, {seconds} s)\n")
            proc = self.client.run("--config", str(profile), "knock")
            self.detail(proc.stdout + proc.stderr)
            if proc.returncode != 0:
                raise StepFailed(f"step {self.n}: webknock knock exited {proc.returncode}")
        else:
            self.step(f"knock from {CLIENT4}: openports tcp/{PORT} for {seconds} s ... ")
            result = self.d.agent.knock(SERVER4, CLIENT4, [("tcp", PORT)], time=seconds)
            reply = result["reply"] or {}
            if result["status"] != 200 or reply.get("success") is not True:
                print("FAILED", flush=True)
                raise StepFailed(f"step {self.n}: knock answered {result}")
            print("success", flush=True)
        grants = [g for g in self.d.list_json() if g["ip"] == CLIENT4 and g["port"] == PORT]
        if not grants:
            raise StepFailed(f"step {self.n}: the knock left no grant in webknockctl list")
        expires = float(grants[0]["expires"])
        self.detail(f"granted tcp/{PORT} to {CLIENT4} until {clock(expires)}")
        return expires

    def show_rules(self) -> None:
        backend = self.d.site.settings.get("backend")
        if backend == "nftables":
            argv, title = ["nft", "list", "set", "inet", "webknock", "tcp4"], "nft list set"
            out = self.d.lab.server.run(argv, check=False).stdout
            lines = [ln.strip() for ln in out.splitlines() if "elements" in ln or "expires" in ln]
        else:
            argv, title = ["iptables", "-S", "WEBKNOCK-GRANTS"], "iptables -S WEBKNOCK-GRANTS"
            out = self.d.lab.server.run(argv, check=False).stdout
            lines = [ln for ln in out.splitlines() if ln.startswith("-A")]
        self.detail("\n".join([f"server firewall ({title}):", *lines]))

    def list_grants(self) -> None:
        self.step("webknockctl list\n")
        self.detail(self.d.ctl("list").stdout)

    def revoke(self) -> None:
        self.step(f"webknockctl revoke {CLIENT4} ... ")
        out = self.d.ctl("revoke", CLIENT4).stdout.strip()
        print(out.replace("\n", "; "), flush=True)
        if self.d.list_json():
            raise StepFailed(f"step {self.n}: grants left after revoke: {self.d.list_json()}")

    def all_grants(self) -> list[dict[str, Any]]:
        """Every grant of the state file, expired ones not yet removed included."""
        grants: list[dict[str, Any]] = json.loads(self.d.ctl("list", "--json", "--all").stdout)
        return grants

    def wait_expiry(self, expires: float) -> None:
        self.step(f"wait for the grant to expire at {clock(expires)} (webknockd removes it) ... ")
        deadline = expires + 15
        while time.time() < deadline:
            check_signalled()
            if time.time() >= expires and not self.all_grants():
                print(f"removed at {clock(time.time())}", flush=True)
                return
            time.sleep(0.25)
        print("still there", flush=True)
        raise StepFailed(f"step {self.n}: the grant was not removed: {self.all_grants()}")

    def run(self, expiry: int) -> None:
        self.connect(expect_open=False)
        self.knock(3600)
        self.connect(expect_open=True)
        self.show_rules()
        self.list_grants()
        self.revoke()
        self.connect(expect_open=False)
        expires = self.knock(expiry)
        self.connect(expect_open=True)
        self.wait_expiry(expires)
        self.connect(expect_open=False)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="demo",
        description="webknock end to end in throwaway network namespaces: a protected port "
        "is refused, a knock opens it, a revoke and an expiry close it again (root).",
        epilog="Exit status: 0 every step behaved, 1 a step did not, 2 the lab could not be "
        "built, 129/130/143 interrupted (after cleaning up).",
    )
    parser.add_argument(
        "--web-server", choices=("nginx", "apache"), default="nginx", help="default: nginx"
    )
    parser.add_argument(
        "--backend", choices=("iptables", "nftables"), default="iptables", help="default: iptables"
    )
    parser.add_argument(
        "--expiry",
        type=int,
        default=5,
        metavar="SECONDS",
        help="time of the grant left to expire (default 5)",
    )
    parser.add_argument(
        "--agent",
        action="store_true",
        help="knock with the lab agent even when the webknock client is importable",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.expiry <= 300:
        parser.error("--expiry must be 1 to 300 seconds")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (it builds network namespaces and firewalls)", file=sys.stderr)
        return EXIT_LAB
    install_signal_handlers()
    label = {"nginx": "nginx + fcgiwrap", "apache": "Apache (mod_cgid)"}[args.web_server]
    print("webknock demo: building throwaway network namespaces ...", flush=True)
    built = False
    try:
        # nftables: an accept in our table cannot override the host's drop, so the host
        # policy leaves the offered ports to webknock and webknock guards them (protect)
        protect = args.backend == "nftables"
        with deployment(args.web_server, backend=args.backend, protect=protect) as d:
            built = True
            try:
                client = demo_client(d)
                problem = "--agent given" if args.agent else client_cli_problem(client)
                print(
                    f"  server {d.lab.server.name}: {SERVER4}, {label} running the CGI as "
                    f"www-data, webknockd ({args.backend}),\n"
                    + (
                        "    host policy drops all but HTTP and the offered ports, webknock's "
                        "table (protect = yes) drops those without a grant; offers "
                        if protect
                        else "    INPUT policy DROP except HTTP; offers "
                    )
                    + ", ".join(
                        [*(f"tcp/{p}" for p in TCP_PORTS), *(f"udp/{p}" for p in UDP_PORTS)]
                    )
                    + f", a listener answers on them\n  client {d.lab.client.name}: {CLIENT4}",
                    flush=True,
                )
                if problem:
                    print(
                        f"  knocks: the lab agent (tests/lab/agent.py), not the webknock "
                        f"client: {problem}",
                        flush=True,
                    )
                else:
                    print(f"  knocks: the webknock client ({CLIENT_SHIM.relative_to(REPO)})")
                Demo(d, client, use_cli=problem is None).run(args.expiry)
            except StepFailed as exc:
                print(f"\ndemo FAILED: {exc}\n{d.diagnostics()}", file=sys.stderr, flush=True)
                return EXIT_FAILED
    except Interrupted as exc:
        print(f"\ndemo interrupted ({exc}): namespaces and processes removed", file=sys.stderr)
        return 128 + exc.signum
    except LabError as exc:
        if built:
            print(f"\ndemo FAILED: {exc}", file=sys.stderr)
            return EXIT_FAILED
        print(f"\ndemo: the lab could not be built: {exc}", file=sys.stderr)
        return EXIT_LAB
    print(
        "demo OK: refused -> knock -> open -> revoke -> refused -> "
        f"knock for {args.expiry} s -> open -> expiry -> refused; lab removed",
        flush=True,
    )
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
