"""The manifest of an instance: what install.sh installed for it, read by uninstall.

``KEY=VALUE`` lines below ``/opt/webknock/instances/INSTANCE``: config, url, web_server
(what a re-run remembers), and every snippet and CGI copy ever written (a re-run adds,
never forgets, so uninstall removes them all).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from webknock.install.files import write_file


@dataclass
class Manifest:
    instance: str
    config: str = ""
    url: str = ""
    web_server: str = ""
    snippets: list[str] = field(default_factory=list)
    cgi_copies: list[str] = field(default_factory=list)


def read_manifest(path: Path, instance: str) -> Manifest:
    """The manifest at `path`, or an empty one."""
    found = Manifest(instance)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return found
    for line in lines:
        key, sep, value = line.partition("=")
        if not sep or line.startswith("#"):
            continue
        if key in ("config", "url", "web_server") and not getattr(found, key):
            setattr(found, key, value)
        elif key == "snippet" and value and value not in found.snippets:
            found.snippets.append(value)
        elif key == "cgi_copy" and value and value not in found.cgi_copies:
            found.cgi_copies.append(value)
    return found


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write `manifest` (0644), keeping the snippets and CGI copies recorded before."""
    old = read_manifest(path, manifest.instance)
    lines = [
        f"# what install.sh installed for instance {manifest.instance} "
        "(read by install.sh uninstall)",
        f"config={manifest.config}",
        f"url={manifest.url}",
        f"web_server={manifest.web_server}",
    ]
    for key, values in (
        ("snippet", old.snippets + manifest.snippets),
        ("cgi_copy", old.cgi_copies + manifest.cgi_copies),
    ):
        lines += [f"{key}={v}" for v in dict.fromkeys(values) if v]
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    write_file(path, "\n".join(lines) + "\n", 0o644)
