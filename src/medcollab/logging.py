"""Structured logs that hold no secrets.

:func:`configure_logging` makes every log line one JSON object (``time``, ``level``, ``logger``,
``message`` and the record's ``extra`` fields), for the platform's own loggers and for uvicorn's. A
redaction filter masks the values of fields whose names say they hold a credential (password, token,
secret, code, authorization, cookie, ...), in ``extra`` fields, in mapping arguments and in
``key=value`` pairs inside the message text.

Exceptions are logged as their type and stack frames only, never their text: an exception message
may quote SQL parameters, a request body or a header.

Personal data cannot be recognised by a filter; the rule that keeps it out of logs is that callers
only log identifiers, route templates and counts (see :mod:`medcollab.api.middleware`).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

#: Name fragments that mark a field as a credential. A key is split on ``_``, ``-``, ``.`` and
#: spaces; any part in this set, or the whole key with separators removed, marks it sensitive.
SENSITIVE_PARTS: Final = frozenset(
    {
        "password",
        "passwd",
        "pwd",
        "passphrase",
        "token",
        "tokens",
        "secret",
        "secrets",
        "code",
        "codes",
        "otp",
        "totp",
        "authorization",
        "auth",
        "cookie",
        "cookies",
        "setcookie",
        "apikey",
        "credential",
        "credentials",
        "session",
        "csrf",
    }
)
#: Keys that contain a sensitive part but name public, non-secret values.
SAFE_KEYS: Final = frozenset({"status_code", "error_code", "exit_code"})
REDACTED: Final = "[redacted]"

#: Attributes every LogRecord has; everything else on a record came from ``extra``.
_RECORD_ATTRIBUTES: Final = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None))
) | {"message", "asctime", "taskName", "color_message"}
_SPLIT: Final = re.compile(r"[_\-.\s]+")
# ``name=value`` or ``name: value`` inside free text, optionally quoted as in a dict's repr.
_INLINE_PAIR: Final = re.compile(
    r"""(?P<key>[A-Za-z][\w\-.]*)(?P<sep>["']?\s*[:=]\s*)(?P<value>"[^"]*"|'[^']*'|[^\s,;&"']+)"""
)
_MAX_DEPTH: Final = 6
_HANDLER_MARK: Final = "_medcollab_json_handler"
#: uvicorn's loggers; they are emptied and made to propagate so the root handler formats them.
UVICORN_LOGGERS: Final = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")


def is_sensitive_key(key: str) -> bool:
    """Whether a field named ``key`` may hold a credential and must not be logged."""
    lowered = key.lower()
    if lowered in SAFE_KEYS:
        return False
    parts = [part for part in _SPLIT.split(lowered) if part]
    return any(part in SENSITIVE_PARTS for part in parts) or "".join(parts) in SENSITIVE_PARTS


def redact(value: Any, _depth: int = 0) -> Any:
    """A copy of ``value`` with the values of sensitive keys masked, through nested containers."""
    if _depth > _MAX_DEPTH:
        return "[nested]"
    if isinstance(value, Mapping):
        return {
            key: REDACTED if is_sensitive_key(str(key)) else redact(item, _depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [redact(item, _depth + 1) for item in value]
    if isinstance(value, str):
        return redact_text(value)
    return value


def redact_text(text: str) -> str:
    """Mask the value of every ``key=value`` / ``key: value`` pair whose key is sensitive."""

    def mask(match: re.Match[str]) -> str:
        if not is_sensitive_key(match["key"]):
            return match[0]
        return f"{match['key']}{match['sep']}{REDACTED}"

    return _INLINE_PAIR.sub(mask, text)


class RedactionFilter(logging.Filter):
    """Masks credentials in a record before any handler formats it; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in list(vars(record).items()):
            if key in _RECORD_ATTRIBUTES:
                continue
            setattr(record, key, REDACTED if is_sensitive_key(key) else redact(value))
        if isinstance(record.args, Mapping):
            record.args = redact(record.args)
        # The message is formatted here, once, so that a credential passed as a positional
        # argument is masked too; the formatted text replaces the template and its arguments.
        try:
            message = record.getMessage()
        except (TypeError, ValueError):
            message = str(record.msg)
        record.msg = redact_text(message)
        record.args = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; ``extra`` fields become top-level keys."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in entry:
                entry[key] = value
        if record.exc_info and record.exc_info[0] is not None:
            error_type, _error, trace = record.exc_info
            # Type and frames only: the exception's text may quote data (see the module docstring).
            entry["error_type"] = error_type.__name__
            entry["frames"] = "".join(traceback.format_tb(trace))
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, ensure_ascii=False, default=str, separators=(",", ":"))


def configure_logging(level: str) -> None:
    """Send every log record, uvicorn's included, through one redacting JSON handler on stderr.

    Calling it again replaces the handler it installed before and changes the level; handlers that
    others installed (a test's log capture, for instance) stay.
    """
    root = logging.getLogger()
    for existing in list(root.handlers):
        if getattr(existing, _HANDLER_MARK, False):
            root.removeHandler(existing)
            existing.close()
    handler = logging.StreamHandler(sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter())
    # On the handler, not a logger: a logger's filters only see records logged on that very
    # logger, while the handler sees every record that propagates to the root.
    handler.addFilter(RedactionFilter())
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in UVICORN_LOGGERS:
        uvicorn_logger = logging.getLogger(name)
        for existing in list(uvicorn_logger.handlers):
            uvicorn_logger.removeHandler(existing)
        uvicorn_logger.propagate = True
