"""Secrets in URLs: read a Redis URL from a file or an environment variable, and redact credentials for printing.

A Redis URL may carry a password (``redis://:PASSWORD@host:6379/0``, ``redis://user:PASSWORD@...``,
``...?password=PASSWORD``). Passing it on the command line shows it to anyone who can run ``ps``; so the server
also takes ``file:PATH`` (the URL is the file's content) and ``env:NAME`` (the URL is environment variable
``NAME``), and everything it prints goes through :func:`redact_url` / :func:`redact_text`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = ["SecretError", "resolve_url", "redact_url", "redact_text", "url_secrets"]

REDACTED = "***"
_SECRET_PARAMS = {"password", "pass", "pwd", "token", "secret"}


class SecretError(ValueError):
    """A secret reference (``file:``/``env:``) cannot be resolved."""


def resolve_url(value: str) -> str:
    """The URL behind ``value``: ``file:PATH`` reads a file, ``env:NAME`` an environment variable, else itself.

    Raises
    ------
    SecretError
        If the file cannot be read, the variable is unset, or the result is empty.
    """
    if value.startswith("file:"):
        path = Path(value[5:]).expanduser()
        try:
            url = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SecretError(f"cannot read the Redis URL file {path}: {exc}") from exc
        source = f"file {path}"
    elif value.startswith("env:"):
        name = value[4:]
        if not name:
            raise SecretError("env: needs a variable name, e.g. env:KVRECALL_REDIS_URL")
        url = os.environ.get(name, "").strip()
        source = f"environment variable {name}"
    else:
        return value
    if not url:
        raise SecretError(f"the Redis URL from {source} is empty or unset")
    return url


def url_secrets(url: str) -> list[str]:
    """The credential strings inside ``url`` (user-info password, secret query parameters)."""
    try:
        parts = urlsplit(url)
        out = [parts.password] if parts.password else []
        userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
        if userinfo and ":" not in userinfo:
            out.append(userinfo)  # redacted as a whole by redact_url
        out += [v for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() in _SECRET_PARAMS and v]
    except ValueError:
        return []
    return out


def redact_url(url: str) -> str:
    """``url`` with its password (user-info or query parameter) replaced by ``***``; safe to log."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user = userinfo.split(":", 1)[0] if ":" in userinfo else ""
            # "redis://secret@host" (no colon) is a password for redis-py too: hide the whole user-info.
            netloc = f"{user}:{REDACTED}@{host}" if user or ":" in userinfo else f"{REDACTED}@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, REDACTED if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="*")
        return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
    except ValueError:
        return REDACTED


def redact_text(text: str, url: str) -> str:
    """``text`` (e.g. an exception message) with the URL and each of its secrets replaced by redacted forms."""
    text = text.replace(url, redact_url(url))
    for secret in url_secrets(url):
        text = re.sub(re.escape(secret), REDACTED, text)
    return text
