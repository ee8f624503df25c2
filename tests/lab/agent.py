"""Client-side actions for lab tests, run inside the client namespace.

Reads one JSON object on stdin ({"action": ..., "keys": {...}, ...}) and prints one
JSON result. Speaks protocol v1 with the stdlib only (http.client), independent of
the webknock client, so the server is tested on its own.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from typing import Any

from webknock.protocol import messages, transport, v1


def post(
    server: str, src: str, path: str, body: bytes, timeout: float = 15, user_agent: str = ""
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(server, 80, timeout=timeout, source_address=(src, 0))
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if user_agent:
        headers["User-Agent"] = user_agent
    try:
        conn.request("POST", path, body, headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def sealed(keys: v1.Keys, data: bytes) -> bytes:
    return b"data=" + transport.encode_field(v1.encode(keys, data)).encode()


def exchange(keys: v1.Keys, req: dict[str, Any], data: bytes) -> dict[str, Any]:
    status, body = post(
        req["server"],
        req["src"],
        req.get("path", "/webknock"),
        sealed(keys, data),
        user_agent=req.get("user_agent", ""),
    )
    reply = json.loads(v1.decode(keys, body)) if status == 200 else None
    return {"status": status, "reply": reply}


def tcp(req: dict[str, Any]) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in req["server"] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(req.get("timeout", 1.0))
        s.bind((req["src"], 0))
        try:
            s.connect((req["server"], req["port"]))
        except OSError:
            return {"open": False}
        return {"open": True}


def udp(req: dict[str, Any]) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in req["server"] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.settimeout(req.get("timeout", 1.0))
        s.bind((req["src"], 0))
        s.sendto(b"ping", (req["server"], req["port"]))
        try:
            data, _ = s.recvfrom(64)
        except OSError:
            return {"open": False}
        return {"open": data == b"ping"}


def hold(req: dict[str, Any]) -> dict[str, Any]:
    """Open a TCP connection, echo once, wait for a line on stdin, echo again (survival test)."""
    family = socket.AF_INET6 if ":" in req["server"] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(req.get("timeout", 2.0))
        s.bind((req["src"], 0))
        s.connect((req["server"], req["port"]))
        s.sendall(b"before")
        first = s.recv(64) == b"before"
        print("connected", flush=True)
        sys.stdin.readline()
        try:
            s.sendall(b"after")
            second = s.recv(64) == b"after"
        except OSError:
            second = False
        return {"first": first, "second": second}


def main() -> int:
    req = json.loads(sys.stdin.readline())
    keys = v1.Keys.from_hex(req["keys"])
    now = int(time.time()) + int(req.get("skew", 0))
    action = req["action"]
    if action == "getinfo":
        result = exchange(keys, req, messages.getinfo_request(now))
    elif action == "openports":
        ports = [(p, n) for p, n in req["ports"]]
        data = messages.openports_request(req["ip"], ports, req["time"], now)
        result = exchange(keys, req, data)
    elif action == "raw":
        status, body = post(
            req["server"], req["src"], req.get("path", "/webknock"), req["body"].encode("latin-1")
        )
        result = {"status": status, "body_len": len(body)}
    elif action == "tcp":
        result = tcp(req)
    elif action == "udp":
        result = udp(req)
    elif action == "hold":
        result = hold(req)
    else:
        raise SystemExit(f"unknown action {action}")
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
