"""A throwaway network lab for end-to-end tests, the demo and benchmarks (root only).

``Lab`` builds a server and a client network namespace joined by a veth pair, with
documentation addresses only (192.0.2.0/24, 2001:db8::/64; a second server's link
198.51.100.0/24, 2001:db8:1::/64). ``Site`` deploys the repository's webknock into a temp
dir with the installer's own code (webknock.install, the temp dir as root prefix: entry
points, config, keys, spool; the venv is the lab's, made from Debian's /usr/bin/python3).
``Nginx`` and ``Apache`` serve the CGI from the snippet the installer writes. ``deployment`` puts it all together, ``second_server`` adds
another server to its lab. Everything is removed on exit, also on error.

The parts: proc.py (commands, children), net.py (namespaces, links, host policy), site.py,
web.py, deploy.py; client.py (the webknock client in the client namespace), agent.py and
listener.py (run inside the namespaces), demo.py (./demo). Everything is importable from here.
"""

from __future__ import annotations

import sys

from tests.lab.deploy import (
    AGENT,
    LISTENER,
    Agent,
    Deployment,
    deploy,
    deployment,
    reported,
    second_server,
    start_listeners,
    watched_deployment,
)
from tests.lab.net import (
    BASE_FIREWALL,
    CLIENT4,
    CLIENT6,
    FIRST_LINK,
    NFT_BASE_FIREWALL,
    NOT_OFFERED_TCP,
    OTHER4,
    OTHER6,
    PREFIX4,
    PREFIX6,
    SECOND_LINK,
    SERVER4,
    SERVER6,
    TCP_PORTS,
    UDP_PORTS,
    Lab,
    Link,
    Netns,
    close_server_firewall,
    delegated_ports,
    delete_namespace,
    namespace_pids,
)
from tests.lab.proc import (
    LabError,
    require_root,
    run,
    stop_process,
    wait_for,
    wait_until,
)
from tests.lab.site import (
    REPO,
    Site,
    installed_files,
    server_requirements,
    shared_venv,
)
from tests.lab.web import (
    WEB_SERVERS,
    Apache,
    Nginx,
    _wait_listening,
    fcgiwrap_argv,
    write_site_snippet,
)

__all__ = [
    "AGENT",
    "BASE_FIREWALL",
    "CLIENT4",
    "CLIENT6",
    "FIRST_LINK",
    "LISTENER",
    "NFT_BASE_FIREWALL",
    "NOT_OFFERED_TCP",
    "OTHER4",
    "OTHER6",
    "PREFIX4",
    "PREFIX6",
    "REPO",
    "SECOND_LINK",
    "SERVER4",
    "SERVER6",
    "TCP_PORTS",
    "UDP_PORTS",
    "WEB_SERVERS",
    "Agent",
    "Apache",
    "Deployment",
    "Lab",
    "LabError",
    "Link",
    "Netns",
    "Nginx",
    "Site",
    "_wait_listening",
    "close_server_firewall",
    "delegated_ports",
    "delete_namespace",
    "deploy",
    "deployment",
    "fcgiwrap_argv",
    "installed_files",
    "namespace_pids",
    "reported",
    "require_root",
    "run",
    "second_server",
    "server_requirements",
    "shared_venv",
    "start_listeners",
    "stop_process",
    "wait_for",
    "wait_until",
    "watched_deployment",
    "write_site_snippet",
]


if __name__ == "__main__":  # pragma: no cover
    print(__doc__, file=sys.stderr)
