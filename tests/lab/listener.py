"""Stand-in services for lab tests: TCP echo and UDP echo, dual-stack.

Usage: listener.py '{"tcp": [22, 2222], "udp": [51820]}'
"""

from __future__ import annotations

import json
import selectors
import socket
import sys


def main() -> int:
    ports = json.loads(sys.argv[1])
    sel = selectors.DefaultSelector()
    for proto, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        for port in ports.get(proto, []):
            sock = socket.socket(socket.AF_INET6, kind)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            if kind == socket.SOCK_STREAM:
                sock.listen(128)
            sel.register(sock, selectors.EVENT_READ, proto)
    while True:
        for key, _ in sel.select():
            ready = key.fileobj
            assert isinstance(ready, socket.socket)
            if key.data == "tcp":
                conn, _ = ready.accept()
                sel.register(conn, selectors.EVENT_READ, "conn")
            elif key.data == "conn":
                try:
                    data = ready.recv(4096)
                except OSError:
                    data = b""
                if data:
                    ready.sendall(data)
                else:
                    sel.unregister(ready)
                    ready.close()
            else:
                data, addr = ready.recvfrom(2048)
                ready.sendto(data, addr)


if __name__ == "__main__":
    sys.exit(main())
