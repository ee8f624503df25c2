"""A knock through nginx reaches the mailbox and the audit trail.

webknockd runs in the server namespace with audit_log and a [notify] section pointing at
an aiosmtpd on that namespace's loopback; the client knocks with its own User-Agent.
"""

from __future__ import annotations

import json
import mailbox
import time
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

from tests.lab import CLIENT4, SERVER4, deployment, stop_process

UA = "webknock-e2e/1.0 (lab agent)"
SMTP_PORT = 2525


def wait_for(cond: Callable[[], bool], timeout: float = 15.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.1)
    return cond()


def test_knock_sends_one_mail_and_writes_audit_lines_with_the_user_agent() -> None:
    with deployment("nginx") as d:
        site, ns = d.site, d.lab.server
        maildir = site.root / "maildir"
        smtp = ns.popen(
            [
                str(site.python),
                "-m",
                "aiosmtpd",
                "-n",
                "-l",
                f"127.0.0.1:{SMTP_PORT}",
                "-c",
                "aiosmtpd.handlers.Mailbox",
                str(maildir),
            ],
            log=site.root / "smtp.log",
        )
        try:
            probe = f"import socket; socket.create_connection(('127.0.0.1', {SMTP_PORT}), 1)"
            assert wait_for(
                lambda: ns.run([str(site.python), "-c", probe], check=False).returncode == 0
            ), (site.root / "smtp.log").read_text()
            audit = site.root / "log" / "webknock.jsonl"
            site.stop_daemon()
            site.write_config({**site.settings, "audit_log": str(audit)})
            with open(site.config, "a") as fh:
                fh.write(
                    "[notify]\nemail_to = admin@example.org\nemail_from = wk@example.org\n"
                    f"smtp_host = 127.0.0.1\nsmtp_port = {SMTP_PORT}\nbatch_window = 1\n"
                )
            site.start_daemon(ns)

            def knock() -> dict[str, Any]:
                result: dict[str, Any] = d.agent.call(
                    "openports",
                    server=SERVER4,
                    src=CLIENT4,
                    ports=[("tcp", 22), ("udp", 51820)],
                    time=600,
                    ip=CLIENT4,
                    path="/webknock",
                    user_agent=UA,
                )
                return result

            assert knock()["reply"]["success"] is True
            assert knock()["reply"]["success"] is True  # a renewal: no second mail

            box = mailbox.Maildir(maildir, create=False)
            assert wait_for(lambda: len(box) >= 1), site.log_tail()
            time.sleep(2.5)  # more than the batch window: anything else would be here now
            assert len(box) == 1
            msg = message_from_bytes(box.get_bytes(box.keys()[0]), policy=policy.default)
            assert isinstance(msg, EmailMessage)
            assert msg["To"] == "admin@example.org"
            assert msg["Subject"] == f"webknock webknock: {CLIENT4} opened tcp/22, udp/51820"
            assert UA in msg.get_content()

            got = json.loads(d.ctl("log", "--json").stdout)
            assert [(r["event"], r["proto"], r["port"]) for r in got] == [
                ("open", "tcp", 22),
                ("open", "udp", 51820),
                ("renew", "tcp", 22),
                ("renew", "udp", 51820),
            ]
            assert all(r["ip"] == CLIENT4 and r["user_agent"] == UA for r in got)

            d.ctl("revoke", CLIENT4)  # webknockctl writes to the same trail
            revoked = json.loads(
                d.ctl("log", "--event", "revoke", "--ip", CLIENT4, "--json").stdout
            )
            assert [(r["proto"], r["port"]) for r in revoked] == [("tcp", 22), ("udp", 51820)]
            table = d.ctl("log", "--since", "10m").stdout.splitlines()
            assert len(table) == 7 and table[0].startswith("TIME")
        finally:
            stop_process(smtp)
