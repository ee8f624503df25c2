#!/usr/bin/python3 -IS
"""CGI entry point; install.sh rewrites the interpreter to the venv's python (flags kept).

-I -S, for an interpreter started per request: nothing runs but webknock. No PYTHON*
variable of the web server's environment, no user site, no script directory on the path,
and none of the .pth files and sitecustomize of the system's site-packages (each runs
code in every process, and some import a lot: one test host's .pth cost 50 ms). The one
path added is the venv's own site-packages, where install.sh puts webknock and its
dependencies (its .pth files are not read either).
"""
import os
import sys

sys.path.append(
    os.path.join(
        os.path.dirname(os.path.dirname(sys.executable)),
        "lib",
        "python%d.%d" % sys.version_info[:2],
        "site-packages",
    )
)

from webknock.cgi.relay import main  # noqa: E402

sys.exit(main())
