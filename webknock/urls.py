"""The one check of a knock URL: the server's ``[server] url``, a client profile's ``url``
and the installer's ``--url`` all go through :func:`check_url`."""

from __future__ import annotations

from urllib.parse import urlsplit


def check_url(url: str) -> str:
    """Return `url` if it is a usable http(s) URL with a host, else raise ValueError."""
    if not url or any(c.isspace() for c in url):
        raise ValueError(f"{url!r} is not a URL")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{url!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise ValueError(f"{url!r} has a bad port") from None
    if parts.fragment:
        raise ValueError(f"{url!r} must not have a #fragment")
    return url
