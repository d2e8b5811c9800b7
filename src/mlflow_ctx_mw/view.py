"""What the middleware sees of a request, the same under every adapter (and given to user hooks).

A module of its own so that options, users and the mapper can all name it without importing
each other.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["RequestView"]


@dataclass(frozen=True)
class RequestView:
    """A framework-neutral look at one request."""

    method: str
    #: The path as the client sent it, mount prefixes included (SCRIPT_NAME, root_path), decoded.
    path: str
    query_string: str
    #: Case-insensitive or lower-case-keyed header mapping.
    headers: Mapping[str, str]
    #: The framework's own request object (ASGI scope, WSGI environ, Django HttpRequest).
    native: Any = None
    #: The peer's address (for trusted-peer rules and rate limits), when the server gives it.
    client: str | None = None
