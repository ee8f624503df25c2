"""webknock.install runs with Debian's python before any venv exists: importing its CLI
(and running its --help) must need only the standard library."""

from __future__ import annotations

import subprocess
import sys

from tests.unit.fixtures.install.fakehost import REPO

BLOCKED = ("Crypto", "filelock", "inotify_simple", "requests", "nftables")

SCRIPT = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"blocked: {{name}}")
        return None
sys.meta_path.insert(0, Block())
sys.path.insert(0, {str(REPO)!r})
import pkgutil
import webknock.install
import webknock.install.cli as cli
for info in pkgutil.iter_modules(webknock.install.__path__):
    __import__(f"webknock.install.{{info.name}}")
sys.exit(cli.main(["server", "--help"]))
"""


def test_the_installer_imports_only_the_standard_library() -> None:
    proc = subprocess.run(
        [sys.executable, "-I", "-B", "-c", SCRIPT],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: install.sh server")


def test_the_bootstrap_answers_help_without_root_or_a_venv() -> None:
    proc = subprocess.run(
        ["bash", str(REPO / "install.sh"), "client", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0 and proc.stdout.startswith("Usage: install.sh client"), proc
