"""The venvs: made from Debian's python with system site-packages, webknock installed from
the source tree with its pinned dependencies, byte-compiled (the web user cannot write
``__pycache__``).

:func:`activate` puts a venv's site-packages on this process's path, so the installer
(running with Debian's python from the source tree) can then import the parts of webknock
that need pycryptodome or filelock.
"""

from __future__ import annotations

import importlib
import os
import shutil
import sys
from pathlib import Path

from webknock.install.console import InstallError
from webknock.install.host import Host

SERVER_EXTRA, CLIENT_EXTRA = "[server]", "[client]"


def _usable(host: Host, venv: Path) -> bool:
    python = venv / "bin" / "python3"
    try:
        cfg = (venv / "pyvenv.cfg").read_text()
    except OSError:
        return False
    if "include-system-site-packages = true" not in cfg.splitlines():
        return False
    return host.runner.run([str(python), "-I", "-c", ""]).returncode == 0


def build_venv(host: Host, venv: Path, extra: str, work: Path) -> None:
    """Create or update `venv` with webknock`extra` from the source tree (built from a
    clean copy in `work`, so the tree gets no build/ or egg-info); raises InstallError."""
    system = host.system_python
    if not os.access(system, os.X_OK):
        raise InstallError(f"{system} not found (apt-get install python3)")
    if host.runner.run([system, "-c", "import ensurepip, venv"]).returncode != 0:
        raise InstallError(f"{system} cannot make venvs (apt-get install python3-venv)")
    if _usable(host, venv):
        host.console.step(f"updating the venv {venv}")
    else:
        host.console.step(f"creating the venv {venv} (from {system}, with system site-packages)")
        shutil.rmtree(venv, ignore_errors=True)
        venv.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        proc = host.runner.run([system, "-m", "venv", "--system-site-packages", str(venv)])
        if proc.returncode != 0:
            raise InstallError(f"{system} -m venv {venv} failed: {proc.stderr.strip()}")
    os.chmod(venv, 0o755)  # noqa: S103 (the web user runs the CGI from it)
    build = work / "build" / "webknock"
    shutil.rmtree(build.parent, ignore_errors=True)
    build.mkdir(parents=True)
    shutil.copy2(host.src / "pyproject.toml", build)
    shutil.copytree(
        host.src / "webknock", build / "webknock", ignore=shutil.ignore_patterns("__pycache__")
    )
    python = str(venv / "bin" / "python3")
    host.runner.run([python, "-I", "-m", "pip", "uninstall", "-q", "-y", "webknock"])
    # --ignore-installed: every pinned dependency goes into the venv itself, even where a
    # Debian package of the same version would satisfy pip; the CGI (-IS) sees only the
    # venv's site-packages.
    pip = [python, "-I", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    pip += ["--no-warn-script-location", "--ignore-installed"]
    pip += ["-c", str(host.src / "requirements.txt"), f"{build}{extra}"]
    proc = host.runner.run(pip, capture=False)
    if proc.returncode != 0:
        raise InstallError(
            f"pip could not install webknock into {venv} (see above; PyPI must be reachable)"
        )
    compiled = host.runner.run([python, "-I", "-m", "compileall", "-q", "-j", "0", f"{venv}/lib"])
    if compiled.returncode != 0:
        raise InstallError(f"byte-compiling {venv} failed: {compiled.stdout.strip()[-2000:]}")


def site_packages(venv: Path) -> Path:
    """The venv's site-packages for this python version."""
    return venv / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def activate(venv: Path) -> None:
    """Let this process import the venv's packages (after its own: webknock itself keeps
    coming from the source tree)."""
    path = str(site_packages(venv))
    if os.path.isdir(path) and path not in sys.path:
        sys.path.append(path)
        importlib.invalidate_caches()
