"""The spool: how the CGI (web user) hands grant requests to webknockd (root).

Layout under ``spool_dir``::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the result)
    results/   root:WEBGROUP 0750  daemon writes ``<id>.json`` (atomic); CGI only reads
    rejected/  root:root     0700  invalid requests moved aside for the admin
    seen/      root:WEBGROUP 1730  replay cache, one empty file per accepted packet MAC
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO) that the daemon rings
                                   once the result is written (see webknock.doorbell)

This module is the format of both file kinds and the CGI's side of it, which is on
the path of every openports and so imports nothing the CGI does not already have.
A request file is untrusted input to root: :mod:`webknock.spool_reader` checks the
file itself (regular, not a link, one link, owner, size) before its content.
"""

from __future__ import annotations

import json
import os

from webknock.fsutil import write_atomic

TYPE_CHECKING = False  # not `from typing import ...`: this is on the CGI's path
if TYPE_CHECKING:
    from pathlib import Path
    from typing import Any

    from webknock.grants import Address

MAX_REQUEST_BYTES = 8192
REQUEST_SUFFIX = ".req"
RESULT_SUFFIX = ".json"
MAX_UA = 200


def new_request_id() -> str:
    return os.urandom(16).hex()


def encode_request(
    ip: Address, ports: list[tuple[str, int]], time: int, received: float, user_agent: str = ""
) -> bytes:
    return json.dumps(
        {
            "v": 1,
            "ip": str(ip),
            "ports": [[p, n] for p, n in ports],
            "time": time,
            "received": received,
            "ua": user_agent[:MAX_UA],
        },
        separators=(",", ":"),
    ).encode()


def write_request(requests_dir: Path, request_id: str, payload: bytes) -> Path:
    """Write the request atomically (dot temp file + rename) with mode 0640; return its path.

    Raises OSError (full disk, read-only spool) and then leaves nothing behind. Not fsynced:
    after a crash the CGI, which waits for the result, has answered 504 anyway.
    """
    final = requests_dir / f"{request_id}{REQUEST_SUFFIX}"
    write_atomic(final, payload, 0o640, fsync=False)
    return final


def result_payload(ok: bool, **fields: Any) -> bytes:
    return json.dumps({"v": 1, "ok": ok, **fields}, separators=(",", ":")).encode()


def parse_result(data: bytes) -> dict[str, Any]:
    """Read a result file written by the daemon (trusted, but still checked for shape)."""
    obj = json.loads(data)
    if not isinstance(obj, dict) or obj.get("v") != 1 or not isinstance(obj.get("ok"), bool):
        raise ValueError("malformed result file")
    return obj
