"""Mail about newly opened grants: one message per batch, by SMTP or local sendmail."""

from __future__ import annotations

import email.utils
import logging
import smtplib
import ssl
import subprocess
import time
from collections.abc import Sequence
from email.message import EmailMessage

from webknock.server.events import Event
from webknock.server.notify.settings import NotifySettings, read_credentials

log = logging.getLogger("webknock.server.notify")


def _when(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(ts))


def _printable(text: str) -> str:
    """A client's text without control characters (it comes from the network)."""
    return "".join(c if c.isprintable() else "?" for c in text)


def compose(settings: NotifySettings, events: Sequence[Event]) -> EmailMessage:
    """One message listing every open of the batch, grouped by address."""
    by_ip: dict[str, list[Event]] = {}
    for ev in events:
        by_ip.setdefault(ev.ip, []).append(ev)
    if len(by_ip) == 1:
        ((ip, evs),) = by_ip.items()
        ports = ", ".join(f"{e.proto}/{e.port}" for e in evs)
        who = sorted({e.client for e in evs if e.client})
        by = f" (client {', '.join(who)})" if who else ""
        subject = f"webknock {settings.instance}: {ip}{by} opened {ports}"
    else:
        subject = f"webknock {settings.instance}: {len(events)} grant(s) for {len(by_ip)} addresses"
    lines = [f"New grants on webknock instance {settings.instance}:", ""]
    for ip, evs in by_ip.items():
        lines.append(f"{ip}")
        for e in evs:
            until = f" until {_when(e.expires)}" if e.expires is not None else ""
            lines.append(f"    {e.proto}/{e.port} opened {_when(e.time)}{until}")
        for name in sorted({e.client for e in evs if e.client}):
            lines.append(f"    enrolled client: {name}")
        for peer in sorted({str(e.extra["peer"]) for e in evs if e.extra.get("peer")}):
            lines.append(f"    knocked from: {peer} (the network {ip} is open)")
        agents = sorted({_printable(e.user_agent) for e in evs if e.user_agent})
        for ua in agents:
            lines.append(f"    user agent: {ua}")
        lines.append("")
    lines.append("Revoke with: webknockctl revoke ADDRESS (or --client NAME)")
    msg = EmailMessage()
    msg["From"] = settings.email_from
    msg["To"] = ", ".join(settings.email_to)
    msg["Subject"] = subject
    msg["Date"] = email.utils.formatdate(localtime=True)
    msg["Message-ID"] = email.utils.make_msgid(domain=settings.email_from.rpartition("@")[2])
    msg["Auto-Submitted"] = "auto-generated"
    msg.set_content("\n".join(lines))
    return msg


def _smtp(settings: NotifySettings, msg: EmailMessage) -> None:
    context = ssl.create_default_context(
        cafile=str(settings.smtp_cafile) if settings.smtp_cafile else None
    )
    host, port, timeout = settings.smtp_host, settings.smtp_port, settings.smtp_timeout
    client: smtplib.SMTP
    if settings.smtp_security == "tls":
        client = smtplib.SMTP_SSL(host, port, timeout=timeout, context=context)
    else:
        client = smtplib.SMTP(host, port, timeout=timeout)
    with client:
        if settings.smtp_security == "starttls":
            client.starttls(context=context)
        if settings.smtp_credentials:
            cred = read_credentials(settings.smtp_credentials)
            client.login(cred.user, cred.password)
        client.send_message(msg)


def _sendmail(settings: NotifySettings, msg: EmailMessage) -> None:
    proc = subprocess.run(
        [str(settings.sendmail), "-t", "-oi"],
        input=msg.as_bytes(),
        capture_output=True,
        timeout=settings.smtp_timeout,
        check=False,
    )
    if proc.returncode:
        err = proc.stderr.decode(errors="replace").strip().splitlines()
        raise OSError(f"{settings.sendmail} exited {proc.returncode}: {err[-1] if err else ''}")


class Mailer:
    """Delivers one batch of open events as one message (raises on failure)."""

    def __init__(self, settings: NotifySettings) -> None:
        self.settings = settings

    def __call__(self, events: Sequence[Event]) -> None:
        msg = compose(self.settings, events)
        if self.settings.mail_transport == "sendmail":
            _sendmail(self.settings, msg)
        else:
            _smtp(self.settings, msg)
        log.info("mailed %d new grant(s) to %s", len(events), msg["To"])
