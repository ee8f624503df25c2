"""End-to-end tests need root, network namespaces and the Debian packages tests/run installs."""

from __future__ import annotations

import os
import shutil

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    missing = [
        t for t in ("ip", "nginx", "fcgiwrap", "apache2", "iptables-restore") if not shutil.which(t)
    ]
    reason = ""
    if os.geteuid() != 0:
        reason = "end-to-end tests need root (run tests/run as root)"
    elif missing:
        reason = f"missing {', '.join(missing)} (tests/run installs them)"
    for item in items:
        if "tests/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
