"""``webknockctl check-config`` for the audit trail and the ``[notify]`` section."""

from __future__ import annotations

import os

from webknock.config import ConfigError, ServerConfig
from webknock.filemodes import Problem, mode_problems
from webknock.server.notify.settings import load_notify, read_credentials


def notify_problems(cfg: ServerConfig) -> list[Problem]:
    """[notify] values, the credentials file, sendmail, and the audit log's file modes."""
    problems: list[Problem] = []
    if cfg.audit_log is not None:
        problems += mode_problems(
            cfg.audit_log.parent, uid=0, gid=None, mode=0o755, what="audit log directory"
        )
        problems += mode_problems(
            cfg.audit_log, uid=0, gid=None, mode=0o640, what="audit log", optional=True
        )
    try:
        settings = load_notify(cfg)
    except ConfigError as exc:
        return [*problems, ("error", str(exc))]
    if settings.smtp_credentials is not None and settings.mail:
        problems += mode_problems(
            settings.smtp_credentials, uid=0, gid=None, mode=0o600, what="SMTP credentials file"
        )
        if settings.smtp_credentials.exists():
            try:
                read_credentials(settings.smtp_credentials)
            except ConfigError as exc:
                problems.append(("error", str(exc)))
    if settings.smtp_cafile is not None and settings.mail and not settings.smtp_cafile.is_file():
        problems.append(
            ("error", f"{cfg.source}: [notify] smtp_cafile: {settings.smtp_cafile} is not a file")
        )
    if (
        settings.mail
        and settings.mail_transport == "sendmail"
        and not os.access(settings.sendmail, os.X_OK)
    ):
        problems.append(
            (
                "error",
                f"{cfg.source}: [notify] sendmail: {settings.sendmail} is not an executable "
                "(install a mail transfer agent or use mail_transport = smtp)",
            )
        )
    return problems
