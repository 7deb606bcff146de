"""The URL space of the web pages.

These prefixes must be the ones that ``medcollab.api.middleware.content_security_policy`` gives the
page policy; ``tests/unit/web`` checks that every page route lies under one of them.
"""

from __future__ import annotations

from typing import Final

WEB_PREFIXES: Final = (
    "/login",
    "/logout",
    "/lang",
    "/session",
    "/account",
    "/my",
    "/clinic",
    "/org",
    "/static",
)


def is_web_path(path: str) -> bool:
    """Whether ``path`` belongs to the pages (matched by whole path segments)."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in WEB_PREFIXES)
