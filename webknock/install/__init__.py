"""The installer behind ``install.sh``: server, client, profile and uninstall.

``install.sh`` only makes sure Debian's python3 (with venv) is there and runs
:func:`webknock.install.cli.main` from the source tree with it. Everything this package
imports at module level is the standard library or a stdlib-only part of webknock; the
parts that need the pinned dependencies (pycryptodome, filelock) are imported only once
the venv exists (:func:`webknock.install.venv.activate`). Every path is below a root
prefix (:mod:`webknock.install.paths`), and every command that cannot run in a unit test
goes through a :class:`webknock.install.host.Runner`.
"""
