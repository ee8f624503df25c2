"""webknock: a web-knocking firewall service (protocol v1 compatible)."""

__version__ = "0.1.0"
