"""inotify_simple, with the C library loaded without a subprocess.

inotify_simple finds libc with ``ctypes.util.find_library("c")``, which runs
``ldconfig -p`` in a child process the first time an INotify is made: several
milliseconds, and a process webknockd need not start. On glibc systems
the library's soname is fixed, so we load it by that name into the module's own
cache; where that fails (another libc) the library finds it its own way.
"""

from __future__ import annotations

import ctypes

import inotify_simple
from inotify_simple import INotify, flags

GLIBC = "libc.so.6"


def _prime_libc() -> None:
    if getattr(inotify_simple, "_libc", False) is not None:
        return  # already loaded, or a layout of the library we do not know
    try:
        inotify_simple._libc = ctypes.CDLL(GLIBC, use_errno=True)
    except OSError:
        pass


_prime_libc()

__all__ = ["INotify", "flags"]
