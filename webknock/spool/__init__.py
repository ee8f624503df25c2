"""The spool's layout: every name and limit the CGI (web user) and webknockd (root) share.

Under ``spool_dir`` (its own size-bounded tmpfs, see :mod:`webknock.spool.mount`)::

    requests/  root:WEBGROUP 1730  CGI writes a dot temp file, then renames it to ``<id>.req``
    claimed/   root:root     0700  daemon renames a request here before reading it; from then
                                   on the CGI can no longer withdraw it (it waits for the answer)
    rejected/  root:root     0700  invalid requests moved aside for the admin
    waits/     root:WEBGROUP 1730  CGI's doorbell ``<id>`` (a FIFO), through which the daemon
                                   hands it the answer (:mod:`webknock.spool.doorbell`)
    server.pub root:root     0644  the server's v2 public key, for the browser page

The writer is :mod:`webknock.spool.request` (CGI), the reader :mod:`webknock.spool.reader`
and the cleaner :mod:`webknock.spool.housekeeping` (webknockd). This module is on the CGI's
path: it imports nothing.
"""

#: First line of every request frame; the version changes with the frame's layout.
MAGIC = b"webknock-spool 2\n"
#: Header lines of a frame, in this order, then an empty line and the packet.
HEADERS = ("field", "remote", "forwarded", "agent")
#: Longest value the CGI writes (longer ones are cut) and the reader accepts per header.
HEADER_LIMITS = {"field": 8, "remote": 64, "forwarded": 1024, "agent": 200}
#: Form fields a packet may come in, and the protocol each carries.
FIELDS = {"data": "v1", "v2": "v2"}
MAX_PACKET_BYTES = 4096
MAX_REQUEST_BYTES = len(MAGIC) + sum(len(h) + 2 + n for h, n in HEADER_LIMITS.items()) + 1
MAX_REQUEST_BYTES += MAX_PACKET_BYTES
#: The spool's sub-directories (:class:`webknock.config.SpoolPaths` builds their paths).
REQUESTS_DIR, CLAIMED_DIR, REJECTED_DIR, WAITS_DIR = "requests", "claimed", "rejected", "waits"
#: The server's v2 public key text, published by webknockd (root, 0644) for the browser
#: page (:mod:`webknock.cgi.relay` embeds it); absent while v2 is off.
SERVER_KEY_NAME = "server.pub"
REQUEST_SUFFIX = ".req"
TEMP_SUFFIX = ".tmp"
#: Request ids: 32 lowercase hex digits (16 random bytes).
ID_LENGTH = 32
#: The doorbell's mode: the web user's, and writable by "others" for root alone. webknockd
#: runs without CAP_DAC_OVERRIDE (the unit's bounding set), so root may write only where
#: the mode lets anyone; and nobody but root and the web group can reach the bell: the
#: spool is 0750 root:WEBGROUP and waits/ 1730.
BELL_MODE = 0o602
