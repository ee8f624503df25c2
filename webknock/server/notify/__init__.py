"""Event sinks beyond the log: the audit trail (always), mail and webhook (when configured).

``webknockd`` and ``webknockctl`` add :func:`sinks_for` to their event bus.
"""

from __future__ import annotations

import logging

from webknock.config import ServerConfig
from webknock.server.events import Event, Sink
from webknock.server.notify.settings import NotifySettings, load_notify
from webknock.server.notify.worker import BackgroundSender

log = logging.getLogger("webknock.server.notify")

__all__ = ["NotifySettings", "load_notify", "mail_sender", "sinks_for", "webhook_sender"]


def _is_open(event: Event) -> bool:
    return event.kind == "open"


def mail_sender(settings: NotifySettings) -> BackgroundSender:
    """One mail per batch of new grants (renewals never mail)."""
    from webknock.server.notify.mail import Mailer

    return BackgroundSender(
        "mail",
        Mailer(settings),
        accept=_is_open,
        window=settings.batch_window,
        retries=settings.retries,
        retry_delay=settings.retry_delay,
    )


def webhook_sender(settings: NotifySettings) -> BackgroundSender:
    """One POST per event of the kinds in ``webhook_events``."""
    from webknock.server.notify.webhook import Webhook

    kinds = settings.webhook_events
    return BackgroundSender(
        "webhook",
        Webhook(settings),
        accept=lambda ev: ev.kind in kinds,
        max_batch=1,
        retries=settings.retries,
        retry_delay=settings.retry_delay,
    )


def sinks_for(cfg: ServerConfig) -> list[Sink]:
    """The audit sink, plus mail and webhook senders when ``[notify]`` asks for them.

    Raises ConfigError (naming file, section and key) for an invalid ``[notify]``.
    """
    from webknock.server.audit import AuditSink

    settings = load_notify(cfg)
    sinks: list[Sink] = [AuditSink(cfg.audit_log)]
    log.debug("audit trail: %s", cfg.audit_log or "journal (logger webknock.server.audit)")
    if settings.mail:
        sinks.append(mail_sender(settings))
        via = (
            f"{settings.sendmail}"
            if settings.mail_transport == "sendmail"
            else f"{settings.smtp_host}:{settings.smtp_port} ({settings.smtp_security})"
        )
        log.debug("new grants are mailed to %s via %s", ", ".join(settings.email_to), via)
    if settings.webhook:
        sinks.append(webhook_sender(settings))
        log.debug(
            "%s events go to %s", ", ".join(sorted(settings.webhook_events)), settings.webhook_url
        )
    return sinks
