"""INI files (server config, keys, client profiles) read with errors that name the file."""

from __future__ import annotations

import configparser
from pathlib import Path


def parse_ini(
    path: Path, text: str, error: type[Exception], *, inline_comments: bool = False
) -> configparser.ConfigParser:
    """Parse `text` read from `path`; a syntax error raises `error` naming the file."""
    prefixes = ("#", ";") if inline_comments else None
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=prefixes)
    try:
        parser.read_string(text, source=str(path))
    except configparser.Error as exc:
        raise error(f"{path}: not a valid INI file: {str(exc).splitlines()[0]}") from None
    return parser


def read_ini(
    path: Path, error: type[Exception], *, inline_comments: bool = False
) -> configparser.ConfigParser:
    """Read and parse a UTF-8 INI file; any failure raises `error` naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise error(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise error(f"{path}: not a UTF-8 text file") from None
    return parse_ini(path, text, error, inline_comments=inline_comments)
