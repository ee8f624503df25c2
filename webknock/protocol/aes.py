"""pycryptodome's AES, loaded without the subprocess its ctypes loader starts.

Without cffi, pycryptodome asks ``platform.architecture()`` once per process
before loading its shared objects, and that runs the ``file`` program. We answer
that question for it when its cache is present and empty; with cffi, or in another
pycryptodome layout, this does nothing and the import is as usual (see docs/design.md).
"""

from __future__ import annotations

import struct
import sys


def _prime_loader_cache() -> None:
    if not sys.platform.startswith("linux"):
        return
    from Crypto.Util import _raw_api

    cache = getattr(_raw_api, "cached_architecture", None)
    if isinstance(cache, list) and not cache:
        cache[:] = [f"{struct.calcsize('P') * 8}bit", "ELF"]


_prime_loader_cache()

from Crypto.Cipher import AES  # noqa: E402 - after the loader cache is primed

__all__ = ["AES"]
