"""Files the installer writes: atomically, with an explicit mode, owned by root.

Entry points are shims: the source tree's script with its ``#!`` line set to the venv's
python (the interpreter's flags kept, e.g. the CGI's ``-IS``).
"""

from __future__ import annotations

import os
from pathlib import Path

from webknock.fsutil import write_atomic
from webknock.install.console import InstallError

#: The line of the CGI after which a copy outside the snippet's reach gets its config.
CGI_IMPORT = "from webknock.cgi.relay import main"


def write_file(path: Path, text: str | bytes, mode: int) -> None:
    """Replace `path` with `text` (temp file + rename), mode `mode`; owned by root:root
    when root writes it (a user's client install stays the user's)."""
    data = text.encode() if isinstance(text, str) else text
    owner = 0 if os.geteuid() == 0 else -1
    write_atomic(path, data, mode, uid=owner, gid=owner, fsync=False)


def install_file(src: Path, dest: Path, mode: int) -> None:
    """Copy `src` to `dest` atomically with `mode`."""
    write_file(dest, src.read_bytes(), mode)


def shim_text(src: Path, python: Path, config: Path | None = None) -> str:
    """The entry point `src` with `python` as its interpreter; with `config`, the CGI's
    config built in (``WEBKNOCK_CONFIG`` set before its import line)."""
    lines = src.read_text().splitlines(keepends=True)
    if not lines or not lines[0].startswith("#!"):
        raise InstallError(f"{src}: expected a #! line")
    first = lines[0].rstrip("\n")
    flags = f" {first.split(' ', 1)[1]}" if " " in first else ""
    body = lines[1:]
    if config is not None:
        at = next((i for i, ln in enumerate(body) if ln.startswith(CGI_IMPORT)), None)
        if at is None or "import os\n" not in body[:at]:
            raise InstallError(f"{src}: cannot find its import line ({CGI_IMPORT})")
        line = f'os.environ.setdefault("WEBKNOCK_CONFIG", "{config}")  # install.sh --cgi-dir\n'
        body.insert(at, line)
    return f"#!{python}{flags}\n" + "".join(body)


def install_shim(src: Path, dest: Path, python: Path, config: Path | None = None) -> None:
    """Write the shim of `src` to `dest` (0755); see :func:`shim_text`."""
    write_file(dest, shim_text(src, python, config), 0o755)


def is_our_shim(path: Path, python: Path) -> bool:
    """`path` is a regular file whose ``#!`` line runs `python`: a shim this installer
    wrote for that venv (an admin's own script of the same name is never removed)."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        with open(path, "rb") as fh:
            first = fh.readline().decode(errors="replace").rstrip("\n")
    except OSError:
        return False
    want = f"#!{python}"
    return first == want or first.startswith(want + " ")


def remove(path: Path) -> None:
    """Remove a file if it is there."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def rmdir_quiet(path: Path) -> bool:
    """Remove an empty directory; False if it is not there or not empty."""
    try:
        os.rmdir(path)
    except OSError:
        return False
    return True


def temp_beside(path: Path, text: str, mode: int) -> Path:
    """A new dot file beside `path` holding `text`, with `mode` (for a file that must
    be checked before it takes its place)."""
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(text)
    return tmp


def place_new(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` unless `path` exists (then remove `tmp`, raise InstallError)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise InstallError(f"{path} appeared while writing it; re-run") from None
    finally:
        os.unlink(tmp)
