"""End-to-end tests need root, network namespaces and the Debian packages tests/run installs.
(That none of them changes root's client cache or profiles is checked by tests/conftest.py.)
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from tests.lab import Deployment, watched_deployment


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


@pytest.fixture
def site() -> Iterator[Deployment]:
    """nginx + fcgiwrap, webknockd (iptables) and a client with a second address per family
    (OTHER4, OTHER6); the logs are printed when the test fails."""
    with watched_deployment("nginx") as d:
        yield d
