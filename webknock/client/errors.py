"""Client failures, each with the exit code the command line returns for it."""

from __future__ import annotations

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_CONFIG = 2
EXIT_UNREACHABLE = 3
EXIT_SERVER = 4

EXIT_CODES_HELP = """exit codes:
  0  the ports are open (info: the server answered)
  1  the server refused the knock (HTTP 400/403/405/413/429, or it answered "not granted")
  2  bad configuration or usage (profile, keys file, options)
  3  cannot reach the server (name resolution, connection, TLS, timeout)
  4  the server failed (HTTP 500/503/504 or another status, undecodable reply)
exec returns the command's own status once it ran (128+N when a signal N ended it)."""


class ClientError(Exception):
    """A failure reported as one line; `code` is the exit status."""

    code = EXIT_SERVER

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(ClientError):
    """The profile, the keys file or an option is wrong."""

    code = EXIT_CONFIG


class Refused(ClientError):
    """The server understood and refused.

    `status` is the HTTP status, or 0 for a refusal reply with its `errorcode`.
    """

    code = EXIT_REFUSED

    def __init__(self, message: str, status: int = 0, errorcode: str = "") -> None:
        super().__init__(message)
        self.status, self.errorcode = status, errorcode


class Unreachable(ClientError):
    """No answer: name resolution, connection, TLS or timeout."""

    code = EXIT_UNREACHABLE


class ServerFailed(ClientError):
    """The server answered but could not do it, or its reply is unusable."""

    code = EXIT_SERVER
